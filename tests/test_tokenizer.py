"""The offline CLIP tokenizer gives open_clip's ids exactly, and HF's CLIPTokenizer built from our files agrees.

open_clip and transformers are the references here (test-only dependencies); the tokenizer itself must not need
them, which a subprocess check enforces.
"""
from __future__ import annotations

import hashlib
import json
import pathlib
import pickle
import subprocess
import sys

import ftfy
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import transformers

from geoalign_jax import tokenizer

import open_clip
from open_clip import tokenizer as open_clip_tokenizer  # noqa: E402

CONTEXT_LENGTHS = (77, 248)
LONG_CAPTION = " ".join(
    f"there are {index} white planes parked near the {index}th terminal of the busy airport" for index in range(20)
)  # 280 words, 322 tokens: over 248

HARD_CASES = [
    "3 planes, 12.5m apart",
    "1,000 cars; 2.5 km^2 (approx.)",
    "Wow!! so many ships!!!",
    "a-b/c road_x and y\\z",
    "it's a port; they're docked, we've seen, I'm sure, you'll see, he'd go, don't",
    "IT'S LOUD, THEY'RE HERE",
    "café near the Ëiffel tower",
    "日本の空港 with planes",
    "emoji 🙂 and family 👨‍👩‍👧 and flag 🇫🇷",
    "Arabic مطار and Greek αεροδρόμιο",
    "&amp; &lt;b&gt; &amp;amp; &#39;quoted&#39; &nbsp;x",
    "&lt;b&gt; with a raw <tag> & an ampersand",
    "mojibake: cafÃ© and donâ€™t and â€œquotesâ€",
    "   leading and trailing whitespace\t\n  ",
    "",
    "   \t\n  ",
    "multi\nline\r\ncaption\rhere",
    "controls a\x1cb a\x0bb a\x0cb a\x00b a\x7fb \x1b[31mred\x1b[0m",
    "fullwidth ＡＢＣ１２３ and ligature ﬁne ﬂow",
    "curly “quotes” and ‘single’ and an ellipsis…",
    "İstanbul STRASSE straße ǅ",
    "combining e\u0301 vs é, zero\u200bwidth, nbsp\xa0here",
    "literal <start_of_text> and <END_OF_TEXT> and <|endoftext|> names",
    "## #: #... #@ #… hashtags #rs",
    "a" * 300,
    "x" + "!" * 200,
    "!#$% starts with id 0",
    LONG_CAPTION,
]


def _karpathy_captions(path: pathlib.Path) -> list[str]:
    with open(path, encoding="utf-8") as file:
        dataset = json.load(file)
    return [sentence["raw"] for image in dataset["images"] for sentence in image["sentences"]]


@pytest.fixture(scope="module")
def real_captions(shared_data: pathlib.Path) -> list[str]:
    """Every caption of RSITMD, UCM, Sydney and the RSICD sample (~37k)."""
    paths = [shared_data / "captions" / f"dataset_{name}.json" for name in ("rsitmd", "ucm", "sydney")]
    paths.append(shared_data / "rsicd_sample" / "dataset_rsicd.json")
    captions = [caption for path in paths for caption in _karpathy_captions(path)]
    assert len(captions) > 30_000
    return captions


def _open_clip_ids(texts, context_length: int) -> np.ndarray:
    return open_clip.tokenize(texts, context_length=context_length).numpy()


@pytest.mark.parametrize("context_length", CONTEXT_LENGTHS)
def test_matches_open_clip_on_every_real_caption(real_captions, context_length):
    ours = tokenizer.tokenize(real_captions, context_length)
    reference = _open_clip_ids(real_captions, context_length)
    assert ours.dtype == np.int32 and ours.shape == (len(real_captions), context_length)
    mismatched = np.flatnonzero((ours != reference).any(axis=1))
    assert mismatched.size == 0, f"{mismatched.size} captions differ, first: {real_captions[mismatched[0]]!r}"


@pytest.mark.parametrize("context_length", CONTEXT_LENGTHS)
@pytest.mark.parametrize("text", HARD_CASES, ids=range(len(HARD_CASES)))
def test_matches_open_clip_on_hard_cases(text, context_length):
    np.testing.assert_array_equal(tokenizer.tokenize(text, context_length), _open_clip_ids(text, context_length))


@pytest.mark.parametrize("context_length", CONTEXT_LENGTHS)
def test_long_caption_is_truncated_with_eot_last(context_length):
    (row,) = tokenizer.tokenize([LONG_CAPTION], context_length)
    full = tokenizer.encode(LONG_CAPTION)
    assert tokenizer.count_tokens(LONG_CAPTION) == len(full) + 2 > context_length
    assert row[0] == tokenizer.SOT_TOKEN_ID and row[-1] == tokenizer.EOT_TOKEN_ID
    np.testing.assert_array_equal(row[1:-1], full[: context_length - 2])
    assert (row[:-1] != tokenizer.EOT_TOKEN_ID).all()


def test_rows_are_sot_ids_eot_then_zero_padding():
    rows = tokenizer.tokenize(["a plane", ""], 8)
    plane_ids = tokenizer.encode("a plane")
    assert rows.tolist() == [
        [tokenizer.SOT_TOKEN_ID, *plane_ids, tokenizer.EOT_TOKEN_ID] + [0] * (8 - 2 - len(plane_ids)),
        [tokenizer.SOT_TOKEN_ID, tokenizer.EOT_TOKEN_ID, 0, 0, 0, 0, 0, 0],
    ]


def test_exactly_full_context_is_not_truncated():
    text = " ".join(["plane"] * 5)  # "plane" is one token: SOT + 5 + EOT = 7
    assert tokenizer.count_tokens(text) == 7
    np.testing.assert_array_equal(tokenizer.tokenize(text, 7), _open_clip_ids(text, 7))
    assert tokenizer.tokenize(text, 7)[0, -1] == tokenizer.EOT_TOKEN_ID
    assert tokenizer.tokenize(text, 6)[0, -2] == tokenizer.encode("plane")[0]


def test_count_tokens_is_untruncated_length(real_captions):
    sample = real_captions[::50] + HARD_CASES
    counts = np.array([tokenizer.count_tokens(text) for text in sample])
    reference = np.array([len(open_clip_tokenizer._tokenizer.encode(text)) + 2 for text in sample])
    np.testing.assert_array_equal(counts, reference)
    rows = tokenizer.tokenize(sample, 248)
    fits = counts <= 248
    # Length from the last EOT, not from non-zero ids: id 0 is the symbol "!" (e.g. in "!#$%"), and a literal
    # "<end_of_text>" in a text is an earlier EOT.
    last_eot = 247 - np.argmax(rows[fits][:, ::-1] == tokenizer.EOT_TOKEN_ID, axis=1)
    np.testing.assert_array_equal(last_eot + 1, counts[fits])
    assert tokenizer.encode("!#$%")[0] == 0, "id 0 is a real token as well as the padding value"


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.sampled_from("\t\n")))
def test_ftfy_skip_is_exact_for_plain_ascii(text):
    """The fast path skips ftfy only where ftfy + html.unescape provably change nothing."""
    if tokenizer._NEEDS_FTFY.search(text) is None:
        assert ftfy.fix_text(text) == text
    assert tokenizer.clean_text(text) == open_clip_tokenizer._clean_lower(text)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.text(max_size=60))
def test_matches_open_clip_on_arbitrary_unicode(text):
    np.testing.assert_array_equal(tokenizer.tokenize(text, 77), _open_clip_ids(text, 77))


def test_bounded_word_cache_still_exact(monkeypatch, real_captions):
    monkeypatch.setattr(tokenizer, "_WORD_CACHE_LIMIT", 16)
    monkeypatch.setattr(tokenizer, "_word_ids_cache", {})
    sample = real_captions[:300]
    np.testing.assert_array_equal(tokenizer.tokenize(sample), _open_clip_ids(sample, 77))
    assert len(tokenizer._word_ids_cache) <= 16


def test_tokenizer_pickles_without_the_vocabulary():
    tok = tokenizer.Tokenizer(248)
    payload = pickle.dumps(tok)
    assert len(payload) < 200, "the vocabulary must be loaded per process, not pickled"
    restored = pickle.loads(payload)
    assert restored == tok and restored.context_length == 248
    np.testing.assert_array_equal(restored(HARD_CASES), tokenizer.tokenize(HARD_CASES, 248))
    assert restored("one caption").shape == (1, 248)


def test_bad_input_is_rejected_with_the_field_named():
    with pytest.raises(TypeError, match=r"texts\[1\] must be str, got int"):
        tokenizer.tokenize(["fine", 3])
    with pytest.raises(TypeError, match="got bytes"):
        tokenizer.count_tokens(b"bytes")
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        tokenizer.tokenize("x", 1)
    with pytest.raises(ValueError, match="context_length must be at least 2"):
        tokenizer.Tokenizer(0)
    with pytest.raises(TypeError, match="context_length must be an int"):
        tokenizer.Tokenizer(77.0)


def test_bundled_vocabulary_is_open_clips_file():
    assert tokenizer.bpe_vocab_path().is_file()
    ours = hashlib.sha256(tokenizer.bpe_vocab_path().read_bytes()).hexdigest()
    theirs = hashlib.sha256(pathlib.Path(open_clip_tokenizer.default_bpe()).read_bytes()).hexdigest()
    assert ours == theirs
    assert tokenizer.VOCAB_SIZE == open_clip_tokenizer._tokenizer.vocab_size
    assert tokenizer.SOT_TOKEN_ID == open_clip_tokenizer._tokenizer.sot_token_id
    assert tokenizer.EOT_TOKEN_ID == open_clip_tokenizer._tokenizer.eot_token_id


def test_decode_matches_open_clip(real_captions):
    for text in real_captions[:20] + HARD_CASES:
        (row,) = tokenizer.tokenize(text, 248)
        core = tokenizer.encode(text)[:246]
        if tokenizer.EOT_TOKEN_ID in core:  # a literal "<end_of_text>" in the text: decode stops there
            core = core[: core.index(tokenizer.EOT_TOKEN_ID)]
        core = [token_id for token_id in core if token_id != tokenizer.SOT_TOKEN_ID]
        assert tokenizer.decode(row) == open_clip_tokenizer._tokenizer.decode(core)
    assert tokenizer.decode(tokenizer.tokenize("two <end_of_text> planes")[0]) == "two "


def test_tokenizing_needs_neither_torch_nor_transformers():
    code = (
        "import sys; from geoalign_jax import tokenizer; "
        "assert tokenizer.tokenize(['two planes'], 248).shape == (1, 248); "
        "loaded = [m for m in ('torch', 'open_clip', 'transformers', 'tokenizers') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    repo_root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=repo_root)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("context_length", CONTEXT_LENGTHS)
def test_hf_tokenizer_files_give_our_ids(tmp_path, real_captions, context_length):
    tokenizer.write_hf_tokenizer_files(tmp_path, context_length)
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert hf_tokenizer.model_max_length == context_length
    hf_special_ids = (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id)
    assert hf_special_ids == (tokenizer.SOT_TOKEN_ID, tokenizer.EOT_TOKEN_ID)
    assert len(hf_tokenizer) == tokenizer.VOCAB_SIZE
    # HF does not run ftfy/html cleaning, so compare on text that cleaning leaves alone (all real captions).
    hard_texts = ["## #: #... #@ #… hashtags", "3 planes, 12.5m!! a-b/c café 日本", LONG_CAPTION]
    texts = real_captions[::120] + hard_texts
    hf_ids = hf_tokenizer(texts, padding="max_length", truncation=True)["input_ids"]
    ours = tokenizer.tokenize(texts, context_length)
    for text, our_row, hf_row in zip(texts, ours, hf_ids):
        length = int(np.argmax(our_row == tokenizer.EOT_TOKEN_ID)) + 1
        assert len(hf_row) == context_length
        assert hf_row[:length] == our_row[:length].tolist(), text
        assert set(hf_row[length:]) <= {tokenizer.EOT_TOKEN_ID}  # HF pads with EOT, we pad with 0
        assert not our_row[length:].any()
    assert len(texts) > 300
