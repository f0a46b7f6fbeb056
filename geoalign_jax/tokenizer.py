"""The CLIP byte-pair tokenizer, offline and without torch.

Gives exactly the ids of ``open_clip.tokenize`` (OpenAI's CLIP BPE, 49408 ids: SOT 49406, EOT 49407, zero
padding, truncation that keeps EOT as the last token), so that checkpoints converted from open_clip see the
text they were trained on. The vocabulary is the MIT-licensed ``bpe_simple_vocab_16e6.txt.gz`` shipped in
``geoalign_jax/assets``; nothing is downloaded.

Why not the Rust ``tokenizers`` library: open_clip cleans text with ``ftfy.fix_text`` and a double
``html.unescape`` before BPE, which has to stay in Python anyway, and the remaining work (a regex split and a
dictionary look-up per word, with a per-process word cache) is cheap enough in Python (see
``tools/bench_tokenizer.py``). The cost that matters, ftfy, is skipped for text it provably leaves unchanged
(plain printable ASCII without ``&``), which is almost every remote-sensing caption.

Processes (grain workers) each load the vocabulary once, lazily, on first use; ``Tokenizer`` objects only hold
their context length, so they pickle and construct for free.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import html
import json
import pathlib
from typing import Sequence

import ftfy
import numpy as np
import regex

SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
VOCAB_SIZE = 49408
DEFAULT_CONTEXT_LENGTH = 77

# open_clip keeps the first 49152 - 256 - 2 merges of the file (line 0 is a header): 256 byte symbols, their
# 256 end-of-word variants, 48894 merged symbols and the 2 special tokens make the 49408 ids.
_NUM_MERGES = 49152 - 256 - 2
# open_clip's names for the special tokens; they are matched literally inside the text, as open_clip does.
_OPEN_CLIP_SOT = "<start_of_text>"
_OPEN_CLIP_EOT = "<end_of_text>"
# Hugging Face's names for the same two ids (vocab.json of openai/clip-vit-*).
_HF_SOT = "<|startoftext|>"
_HF_EOT = "<|endoftext|>"

# open_clip's word split (with IGNORECASE, as there), applied to cleaned, lower-cased text.
_WORD_PATTERN = regex.compile(
    _OPEN_CLIP_SOT + "|" + _OPEN_CLIP_EOT + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# A character that ftfy.fix_text or html.unescape might change: anything but printable ASCII, tab and newline
# ('\r', controls, escapes, non-ASCII), and '&' (an HTML entity may start). Text without one skips both.
_NEEDS_FTFY = regex.compile(r"[^\x20-\x25\x27-\x7e\t\n]")

# Words are few (a caption corpus has some ten thousand); the bound only keeps adversarial streams in check.
_WORD_CACHE_LIMIT = 500_000
_word_ids_cache: dict[str, tuple[int, ...]] = {}


@dataclasses.dataclass(frozen=True)
class _Vocabulary:
    """Everything loaded from the BPE file: built once per process."""

    byte_encoder: tuple[str, ...]  # byte value -> the printable unicode symbol standing for it
    byte_decoder: dict[str, int]
    merges: tuple[tuple[str, str], ...]
    merge_ranks: dict[tuple[str, str], int]
    encoder: dict[str, int]  # symbol (with "</w>" at word ends) -> id
    decoder: tuple[str, ...]  # id -> symbol


def bpe_vocab_path() -> pathlib.Path:
    """Path of the bundled OpenAI CLIP BPE merges file (the same file open_clip ships)."""
    return pathlib.Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> tuple[str, ...]:
    """OpenAI's reversible byte -> printable-character map, so that BPE never sees whitespace or controls."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    symbols = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = chr(256 + shift)
            shift += 1
    return tuple(symbols[byte] for byte in range(256))


def _symbol_order(byte_encoder: tuple[str, ...]) -> list[str]:
    """The 256 byte symbols in open_clip's vocabulary order (printable ranges first, then the remapped rest)."""
    printable = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    printable += [chr(c) for c in range(ord("¡"), ord("¬") + 1)]
    printable += [chr(c) for c in range(ord("®"), ord("ÿ") + 1)]
    printable_set = set(printable)
    remapped = [symbol for symbol in byte_encoder if symbol not in printable_set]
    return printable + remapped


def _read_merges(path: pathlib.Path) -> tuple[tuple[str, str], ...]:
    """The merges open_clip uses: lines 1 .. 48894 of the gzip file, each 'left right'."""
    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read the CLIP BPE vocabulary {path}: {error}") from error
    merge_lines = lines[1 : _NUM_MERGES + 1]
    if len(merge_lines) != _NUM_MERGES:
        raise ValueError(f"CLIP BPE vocabulary {path} holds {len(merge_lines)} merges, need {_NUM_MERGES}")
    merges = []
    for line_number, line in enumerate(merge_lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"CLIP BPE vocabulary {path} line {line_number} is not a merge pair: {line!r}")
        merges.append((parts[0], parts[1]))
    return tuple(merges)


@functools.lru_cache(maxsize=None)
def _vocabulary() -> _Vocabulary:
    """Load the BPE file once per process (lazily: importing this module stays cheap)."""
    byte_encoder = _bytes_to_unicode()
    merges = _read_merges(bpe_vocab_path())
    byte_symbols = _symbol_order(byte_encoder)
    symbols = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    symbols += [_OPEN_CLIP_SOT, _OPEN_CLIP_EOT]
    if len(symbols) != VOCAB_SIZE:
        raise ValueError(f"CLIP BPE vocabulary has {len(symbols)} symbols, expected {VOCAB_SIZE}")
    return _Vocabulary(
        byte_encoder=byte_encoder,
        byte_decoder={symbol: byte for byte, symbol in enumerate(byte_encoder)},
        merges=merges,
        merge_ranks={merge: rank for rank, merge in enumerate(merges)},
        encoder={symbol: index for index, symbol in enumerate(symbols)},
        decoder=tuple(symbols),
    )


def clean_text(text: str) -> str:
    """open_clip's "lower" cleaning: ftfy.fix_text, html.unescape twice, whitespace collapse, lower case.

    ftfy and html.unescape are skipped for text they cannot change (see ``_NEEDS_FTFY``): ftfy costs ~20x the
    rest of tokenising a short caption.
    """
    if _NEEDS_FTFY.search(text) is not None:
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


def _merge_word(symbols: tuple[str, ...], merge_ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """Greedy BPE as in OpenAI CLIP: repeatedly merge every occurrence of the lowest-ranked adjacent pair."""
    while len(symbols) > 1:
        pairs = set(zip(symbols, symbols[1:]))
        best = min(pairs, key=lambda pair: merge_ranks.get(pair, _NUM_MERGES))
        if best not in merge_ranks:
            break
        first, second = best
        merged: list[str] = []
        position = 0
        while position < len(symbols):
            if position < len(symbols) - 1 and symbols[position] == first and symbols[position + 1] == second:
                merged.append(first + second)
                position += 2
            else:
                merged.append(symbols[position])
                position += 1
        symbols = tuple(merged)
    return symbols


def _word_ids(word: str) -> tuple[int, ...]:
    """BPE ids of one word of the split (cached per process)."""
    cached = _word_ids_cache.get(word)
    if cached is not None:
        return cached
    vocabulary = _vocabulary()
    if word == _OPEN_CLIP_SOT or word == _OPEN_CLIP_EOT:
        # open_clip's pattern matches its special-token names as words and maps them to their ids.
        ids: tuple[int, ...] = (vocabulary.encoder[word],)
    else:
        byte_symbols = tuple(vocabulary.byte_encoder[b] for b in word.encode("utf-8"))
        symbols = byte_symbols[:-1] + (byte_symbols[-1] + "</w>",)
        ids = tuple(vocabulary.encoder[s] for s in _merge_word(symbols, vocabulary.merge_ranks))
    if len(_word_ids_cache) >= _WORD_CACHE_LIMIT:
        _word_ids_cache.clear()
    _word_ids_cache[word] = ids
    return ids


def encode(text: str) -> list[int]:
    """BPE ids of ``text`` after open_clip's cleaning, without SOT/EOT and without truncation."""
    if not isinstance(text, str):
        raise TypeError(f"text to tokenize must be str, got {type(text).__name__}: {text!r:.80}")
    ids: list[int] = []
    cache = _word_ids_cache
    for word in _WORD_PATTERN.findall(clean_text(text)):
        word_ids = cache.get(word)
        ids.extend(word_ids if word_ids is not None else _word_ids(word))
    return ids


def count_tokens(text: str) -> int:
    """Untruncated token count of ``text`` including SOT and EOT: above the context length means truncated."""
    return len(encode(text)) + 2


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
        raise TypeError(f"context_length must be an int, got {type(context_length).__name__}")
    if context_length < 2:
        raise ValueError(f"context_length must be at least 2 (room for SOT and EOT), got {context_length}")
    return int(context_length)


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH) -> np.ndarray:
    """Token ids [N, context_length] int32, equal to ``open_clip.tokenize(texts, context_length)``.

    Each row is SOT, the BPE ids, EOT, then zeros; a text too long keeps its first ``context_length - 1``
    tokens and EOT in the last position (so the EOT-pooled embedding still exists). Id 0 is also a real
    token ("!"), so a row's length is the first EOT position + 1, not its count of non-zero ids; a text that
    literally contains "<end_of_text>" gets an EOT there too, as in open_clip.
    """
    context_length = _check_context_length(context_length)
    if isinstance(texts, str):
        texts = [texts]
    result = np.zeros((len(texts), context_length), dtype=np.int32)
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{row}] must be str, got {type(text).__name__}: {text!r:.80}")
        ids = encode(text)
        if len(ids) > context_length - 2:
            ids = ids[: context_length - 2]
        result[row, 0] = SOT_TOKEN_ID
        result[row, 1 : len(ids) + 1] = ids
        result[row, len(ids) + 1] = EOT_TOKEN_ID
    return result


def decode(token_ids: Sequence[int] | np.ndarray) -> str:
    """Text of one row of ids, for logs (e.g. what a truncated caption kept): SOT, EOT and the padding after
    EOT are dropped; words end in a space, as in open_clip's decode."""
    vocabulary = _vocabulary()
    symbols = []
    for token_id in np.asarray(token_ids).reshape(-1).tolist():
        if token_id == EOT_TOKEN_ID:
            break
        if not 0 <= token_id < VOCAB_SIZE:
            raise ValueError(f"token id {token_id} outside the CLIP vocabulary [0, {VOCAB_SIZE})")
        if token_id != SOT_TOKEN_ID:
            symbols.append(vocabulary.decoder[token_id])
    byte_values = bytearray(vocabulary.byte_decoder[char] for char in "".join(symbols))
    return byte_values.decode("utf-8", errors="replace").replace("</w>", " ")


@dataclasses.dataclass(frozen=True)
class Tokenizer:
    """``tokenize`` bound to a context length: a picklable, cheap transform for grain workers."""

    context_length: int = DEFAULT_CONTEXT_LENGTH

    def __post_init__(self) -> None:
        object.__setattr__(self, "context_length", _check_context_length(self.context_length))

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        return tokenize(texts, self.context_length)


def write_hf_tokenizer_files(
    out_dir: str | pathlib.Path, context_length: int = DEFAULT_CONTEXT_LENGTH
) -> list[pathlib.Path]:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json for
    ``transformers.CLIPTokenizer.from_pretrained(out_dir)``, built from the bundled BPE file (no download).

    The ids are ours up to EOT; Hugging Face pads with EOT (49407) where we pad with 0, and it does not run
    ftfy/html cleaning, so it can differ on mojibake or HTML entities.
    """
    context_length = _check_context_length(context_length)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocabulary = _vocabulary()
    hf_symbols = list(vocabulary.decoder[: VOCAB_SIZE - 2]) + [_HF_SOT, _HF_EOT]
    vocab = {symbol: index for index, symbol in enumerate(hf_symbols)}
    special_tokens = {"bos_token": _HF_SOT, "eos_token": _HF_EOT, "unk_token": _HF_EOT, "pad_token": _HF_EOT}
    tokenizer_config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special_tokens,
    }
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in vocabulary.merges),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
        "special_tokens_map.json": json.dumps(special_tokens, indent=2),
    }
    written = []
    for name, content in files.items():
        path = out_dir / name
        path.write_text(content, encoding="utf-8")
        written.append(path)
    return written
