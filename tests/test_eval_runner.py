"""The evaluation library and CLI on the real samples (AID classes, RSICD captions) via the converters'
records, checked against independent computations straight from the source files."""
from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

import data_fixtures
from geoalign_jax import tokenizer
from geoalign_jax.eval import embed, runner, preprocess
from geoalign_jax.models import clip

CONFIG = clip.get_model_config("tiny")
records = data_fixtures.records  # the module-scoped fixture (real AID + RSICD samples as records)


@pytest.fixture(scope="module")
def params():
    return clip.init_params(CONFIG, jax.random.key(3))


_encode_image = jax.jit(lambda params, pixels: clip.encode_image(CONFIG, params, pixels)[0])
_encode_text = jax.jit(lambda params, tokens: clip.encode_text(CONFIG, params, tokens)[0])


def _direct_image_embeddings(params, paths: list[pathlib.Path]) -> np.ndarray:
    """All images in one call (no padding, no batching), straight from the files."""
    pixels = np.stack([preprocess.preprocess_pil(Image.open(p), CONFIG.vision.image_size) for p in paths])
    return np.asarray(_encode_image(params, pixels))


def _direct_text_embeddings(params, texts: list[str]) -> np.ndarray:
    return np.asarray(_encode_text(params, tokenizer.tokenize(texts)))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def aid_report(records, params):
    return runner.run_tasks(CONFIG, params, [f"zeroshot:aid={records['aid']}"], batch_size=16, progress=False)


def test_zero_shot_on_aid_records_matches_a_direct_computation(shared_data, aid_report, params):
    report = aid_report
    folders = sorted(p for p in (shared_data / "aid_sample").iterdir() if p.is_dir())
    paths = [f for folder in folders for f in sorted(folder.iterdir())]
    labels = np.array([i for i, folder in enumerate(folders) for _ in sorted(folder.iterdir())])
    names = [" ".join(__import__("re").findall(r"[A-Z][a-z]*", folder.name)).lower() for folder in folders]
    templates = ["a satellite photo of {}.", "a satellite image of {}"]
    per_template = [_unit(_direct_text_embeddings(params, [t.format(n) for n in names])) for t in templates]
    classifier = _unit(sum(per_template) / len(templates))
    scores = _unit(_direct_image_embeddings(params, paths)) @ classifier.T
    ranks = (scores > scores[np.arange(len(labels)), labels][:, None]).sum(axis=1)
    metrics = report.metrics
    assert metrics["zeroshot/aid/num_samples"] == 120
    assert metrics["zeroshot/aid/top1"] == pytest.approx(100 * np.mean(ranks < 1))
    assert metrics["zeroshot/aid/top5"] == pytest.approx(100 * np.mean(ranks < 5))
    airport = [i for i, f in enumerate(folders) if f.name == "Airport"][0]
    assert metrics["zeroshot/aid/class/Airport"] == pytest.approx(100 * np.mean(ranks[labels == airport] < 1))


def test_retrieval_on_rsicd_records_matches_brute_force_from_the_json(shared_data, records, params):
    report = runner.run_tasks(CONFIG, params, [f"retrieval:rsicd={records['rsicd']},split=train,protocol=both"],
                               batch_size=32, progress=False, allow_train_split=True)
    raw = json.loads((shared_data / "rsicd_sample" / "dataset_rsicd.json").read_text())
    entries = [e for e in raw["images"] if e["split"] == "train"]
    images = _direct_image_embeddings(params, [shared_data / "rsicd_sample" / "images" / e["filename"] for e in entries])
    captions = [[s["raw"] for s in e["sentences"]] for e in entries]

    # Standard protocol, plain loops: every caption a query; an image hits with any of its captions.
    texts = [c for cs in captions for c in cs]
    owner = [i for i, cs in enumerate(captions) for _ in cs]
    text_emb = _unit(_direct_text_embeddings(params, texts))
    sims = (_unit(images) @ text_emb.T).tolist()
    for k in (1, 5, 10):
        i2t = sum(any(owner[t] == i for t in sorted(range(len(texts)), key=lambda t: -sims[i][t])[:k])
                  for i in range(len(entries))) / len(entries)
        t2i = sum(owner[t] in sorted(range(len(entries)), key=lambda i: -sims[i][t])[:k]
                  for t in range(len(texts))) / len(texts)
        assert report.metrics[f"retrieval/rsicd/standard/i2t_R@{k}"] == pytest.approx(100 * i2t, abs=1e-6)
        assert report.metrics[f"retrieval/rsicd/standard/t2i_R@{k}"] == pytest.approx(100 * t2i, abs=1e-6)
    assert report.metrics["retrieval/rsicd/standard/num_texts"] == 5 * len(entries)

    # SkyScript protocol: RSICD repeats captions inside an image, so texts shrink once de-duplicated.
    unique = sorted({"a satellite image. " + c for cs in captions for c in cs})
    unique_emb = _unit(_direct_text_embeddings(params, unique))
    sims = (_unit(images) @ unique_emb.T).tolist()
    gt = [{unique.index("a satellite image. " + c) for c in cs} for cs in captions]
    for k in (1, 5, 10):
        i2t = sum(bool(gt[i] & set(sorted(range(len(unique)), key=lambda t: -sims[i][t])[:k]))
                  for i in range(len(entries))) / len(entries)
        t2i = sum(any(t in gt[i] for i in sorted(range(len(entries)), key=lambda i: -sims[i][t])[:k])
                  for t in range(len(unique))) / len(unique)
        assert report.metrics[f"retrieval/rsicd/skyscript/i2t_R@{k}"] == pytest.approx(100 * i2t, abs=1e-6)
        assert report.metrics[f"retrieval/rsicd/skyscript/t2i_R@{k}"] == pytest.approx(100 * t2i, abs=1e-6)
    assert report.metrics["retrieval/rsicd/skyscript/num_texts"] == len(unique) < len(texts)


def test_jax_embedder_pads_to_one_compiled_shape(params):
    # Odd batch sizes no other test uses: the compiled functions are shared per config.
    embedder = embed.JaxEmbedder(CONFIG, params, batch_size=13, text_batch_size=7)
    image_compiles, text_compiles = embedder._image_fn._cache_size(), embedder._text_fn._cache_size()
    embedding_compiles = embedder._embedding_fn._cache_size()
    images = np.random.default_rng(0).normal(size=(37, 32, 32, 3)).astype(np.float32)
    batched = np.concatenate([embedder.embed_images(images[:5]), embedder.embed_images(images[5:])])
    direct = np.asarray(clip.encode_image(CONFIG, params, images)[0])
    np.testing.assert_allclose(batched, direct, atol=1e-5)
    texts = [f"caption number {i}" for i in range(11)]
    np.testing.assert_allclose(embedder.embed_texts(texts), _direct_text_embeddings(params, texts), atol=1e-5)
    embedder.embed_images_with_patches(images[:3])
    assert embedder._image_fn._cache_size() == image_compiles + 1
    assert embedder._embedding_fn._cache_size() == embedding_compiles + 1
    assert embedder._text_fn._cache_size() == text_compiles + 1  # 11 texts: batches of 7, last padded to 7
    np.testing.assert_allclose(embedder.embed_texts(texts[:3]), _direct_text_embeddings(params, texts[:3]),
                               atol=1e-5)  # one batch or less: padded to min(8, 7) = 7 rows, the same shape
    assert embedder._text_fn._cache_size() == text_compiles + 1
    assert [embed.text_rows(n, 256) for n in (1, 8, 9, 60, 200, 256, 5000)] == [8, 8, 16, 64, 256, 256, 256]
    with pytest.raises(ValueError, match=r"images must be \[n, 32, 32, 3\]"):
        embedder.embed_images(images[:, :16])


def test_a_stream_runs_even_batches_of_one_compiled_shape(params):
    from geoalign_jax.models import text

    assert [embed.even_batch_rows(n, 64) for n in (0, 1, 24, 64, 65, 600, 1000)] == [64, 1, 24, 64, 33, 60, 63]
    buckets = text.length_buckets(77)
    short, long = tokenizer.tokenize(["a satellite photo of a pond.", "x"]), tokenizer.tokenize(["word " * 40])
    assert embed.text_tokens_needed(short, buckets) == 32 and embed.text_tokens_needed(long, buckets) == 77
    embedder = embed.JaxEmbedder(CONFIG, params, batch_size=15)
    compiled, rows_run = embedder._embedding_fn, []
    embedder._embedding_fn = lambda p, x: rows_run.append(x.shape[0]) or compiled(p, x)
    images = np.random.default_rng(1).normal(size=(40, 32, 32, 3)).astype(np.float32)
    streamed = embed.embed_all(embedder, lambda i: images[i:i + 1], 40, 40, batch_size=15, progress=False)
    np.testing.assert_allclose(streamed, np.asarray(clip.encode_image(CONFIG, params, images)[0]), atol=1e-5)
    assert rows_run == [14, 14, 14]  # 14 + 14 + 12 padded to 14, not 15 + 15 + 10 padded to 15


def test_texts_cut_to_the_bucket_of_their_last_eot_embed_as_at_full_length():
    """embed_texts runs only the shortest length bucket holding every EOT token: at each bucket's edge
    (EOT at index 31 fits 32 tokens, at 32 it needs 33) the embedding equals the untruncated tower's, here
    with a Long-CLIP context of 248 (buckets 32, 128, 248). The boundary of every bucket is checked on tokens."""
    from geoalign_jax.models import text as text_lib

    config = clip.get_model_config("tiny", text_width=text_lib.MIN_BUCKETED_WIDTH, text_heads=4,
                                   text_context_length=248)
    # Random values of init's shapes (eval_shape: compiling the whole init costs ~15 s on 2 busy cores).
    rng = np.random.default_rng(5)
    shapes = jax.eval_shape(lambda key: clip.init_params(config, key), jax.random.key(5))
    params = jax.tree_util.tree_map_with_path(lambda path, leaf: (
        np.ones(leaf.shape) if path[-1].key == "scale" else rng.normal(size=leaf.shape) * 0.05).astype(leaf.dtype),
        shapes)

    @jax.jit
    def full_length(params, tokens):  # no bucket and no switch: all 248 positions through every block
        def encode(module, tokens):
            _, pooled = module.text._encode(tokens, jax.numpy.argmax(tokens, -1))
            return module.text.ln_final(pooled) @ module.text.text_projection

        return clip.CLIP(config).apply({"params": params}, tokens, method=encode)

    embedder = embed.JaxEmbedder(config, params, text_batch_size=8)
    compiled, lengths_run = embedder._text_fn, []
    embedder._text_fn = lambda p, t: lengths_run.append(t.shape[1]) or compiled(p, t)
    for words, length in ((30, 32), (31, 128)):  # the longest text's EOT at index words + 1
        texts = ["a pond.", "word " * words]
        assert int(np.argmax(embedder._tokenize(texts)[1])) == words + 1
        expected = np.asarray(full_length(params, embedder._tokenize(texts)))
        np.testing.assert_allclose(embedder.embed_texts(texts), expected, atol=1e-5)
        assert lengths_run[-1] == length
    eot_at = lambda k: np.eye(1, 248, k, dtype=np.int32) * 49407  # noqa: E731
    assert [embed.text_tokens_needed(eot_at(k), text_lib.length_buckets(248)) for k in (0, 31, 32, 127, 128, 247)] \
        == [32, 32, 128, 128, 248, 248]


def test_rebatch_keeps_order_across_uneven_pieces():
    pieces = [np.arange(n0, n1) for n0, n1 in [(0, 3), (3, 3), (3, 10), (10, 11)]]
    batches = list(embed.rebatch(pieces, 4))
    assert [len(b) for b in batches] == [4, 4, 3]
    np.testing.assert_array_equal(np.concatenate(batches), np.arange(11))


def test_cli_writes_results_table_and_plots(records, aid_report, tmp_path, capsys):
    from geoalign_jax.evaluate import main

    out = tmp_path / "eval"
    code = main(["--model", "tiny", "--seed", "3", "--tasks", f"zeroshot:aid={records['aid']}",
                 f"retrieval:rsicd={records['rsicd']},protocol=skyscript,split=val", "--out", str(out),
                 "--batch_size", "16", "--no_progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "zeroshot/aid " in printed and "retrieval/rsicd/skyscript" in printed
    results = json.loads((out / "results.json").read_text())
    # --seed 3 gives the weights of the `params` fixture: the CLI reports what the library computed.
    zero_shot = {k: v for k, v in results["metrics"].items() if k.startswith("zeroshot/")}
    assert zero_shot == pytest.approx(aid_report.metrics)
    assert f"{results['metrics']['zeroshot/aid/top1']:.2f}" in printed
    assert results["run"]["model_config"]["embed_dim"] == 32
    for name in ("zeroshot_aid_per_class.png", "retrieval_rsicd_recall.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 200


def test_cli_rejects_a_missing_data_path(tmp_path, capsys):
    from geoalign_jax.evaluate import main

    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--tasks", f"zeroshot:aid={tmp_path / 'absent'}", "--out", str(tmp_path / "o")])
    assert "task zeroshot:aid: data path not found" in capsys.readouterr().err


def test_cli_reads_a_parameters_checkpoint(records, params, aid_report, tmp_path):
    from geoalign_jax.evaluate import main
    from geoalign_jax.params_checkpoint import save_params

    checkpoint = save_params(tmp_path / "params", CONFIG, params)
    out = tmp_path / "eval"
    assert main(["--checkpoint", str(checkpoint), "--tasks", f"zeroshot:aid={records['aid']}", "--out", str(out),
                 "--batch_size", "16", "--no_progress", "--no_plots"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["metrics"] == pytest.approx(aid_report.metrics)
    assert results["run"]["weights"] == f"checkpoint {checkpoint}"
    assert not list(out.glob("*.png"))
