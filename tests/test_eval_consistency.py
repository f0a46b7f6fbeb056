"""The same weights evaluated in JAX and as an open_clip export (embeddings computed by open_clip in
torch) give the same embeddings to 1e-4 and the same numbers, on the real samples."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import data_fixtures

from geoalign_jax.eval import datasets, embed, runner, preprocess
from geoalign_jax.models import clip

import open_clip
from geoalign_jax.convert.open_clip import export_open_clip  # noqa: E402

CONFIG = clip.get_model_config("tiny")


@pytest.fixture(scope="module")
def backends(tmp_path_factory):
    params = clip.init_params(CONFIG, jax.random.key(7))
    folder = tmp_path_factory.mktemp("open_clip_export")
    export_open_clip(CONFIG, params, folder)
    # Full float32 matmuls: on GPU/TPU JAX's default precision would not match torch's CPU float32 to 1e-4.
    return (embed.JaxEmbedder(CONFIG, params, batch_size=16, matmul_precision="highest"),
            embed.OpenClipEmbedder.from_dir(str(folder), batch_size=64))


records = data_fixtures.records


def test_embeddings_agree_on_identical_pixels(backends, records):
    jax_backend, torch_backend = backends
    assert torch_backend.image_size == jax_backend.image_size == 32
    data = datasets.load_classification(records["aid"])
    pixels = np.stack([preprocess.preprocess_bytes(data.images.image_bytes(i), 32) for i in range(0, 120, 7)])
    np.testing.assert_allclose(torch_backend.embed_images(pixels), jax_backend.embed_images(pixels), atol=1e-4)
    jax_embedding, jax_patches = jax_backend.embed_images_with_patches(pixels)
    torch_embedding, torch_patches = torch_backend.embed_images_with_patches(pixels)
    assert torch_patches.shape == jax_patches.shape == (len(pixels), 4, 4, 32)
    np.testing.assert_allclose(torch_patches, jax_patches, atol=1e-4)
    np.testing.assert_allclose(torch_embedding, jax_embedding, atol=1e-4)
    texts = ["a satellite photo of storage tanks.", "many green trees are around a pond !!",
             "a long caption " + "with many words " * 30]
    np.testing.assert_allclose(torch_backend.embed_texts(texts), jax_backend.embed_texts(texts), atol=1e-4)


def test_metrics_agree_between_backends(backends, records):
    tasks = [f"zeroshot:aid={records['aid']},templates=rs",
             f"retrieval:rsicd={records['rsicd']},split=train,protocol=both",
             f"regions:dota={records['dota']}"]
    jax_backend, torch_backend = backends
    from_jax = runner.evaluate(None, None, tasks, embedder=jax_backend, batch_size=16, progress=False,
                                allow_train_split=True)  # the samples' RSICD train split and DOTA's only split
    from_torch = runner.evaluate(None, None, tasks, embedder=torch_backend, batch_size=16, progress=False,
                                  allow_train_split=True)
    assert from_jax.keys() == from_torch.keys()
    different = {k: (from_jax[k], from_torch[k]) for k in from_jax if from_jax[k] != pytest.approx(from_torch[k])}
    assert not different
    assert from_jax["retrieval/rsicd/standard/num_texts"] == 495 and from_jax["regions/dota/roi/num_samples"] == 600


def test_cli_open_clip_backend_reports_the_jax_numbers(backends, records, tmp_path, monkeypatch):
    from geoalign_jax.evaluate import main

    jax_backend, _ = backends
    folder = tmp_path / "export"
    export_open_clip(CONFIG, jax_backend._params, folder)
    task = f"retrieval:rsicd={records['rsicd']},split=val,protocol=both"
    expected = runner.evaluate(None, None, [task], embedder=jax_backend, batch_size=16, progress=False)
    # Equal numbers alone would not show which backend computed them: JAX may not run inside the CLI.
    for method in ("embed_images", "embed_images_with_patches", "embed_texts"):
        monkeypatch.setattr(embed.JaxEmbedder, method, lambda *a, **k: pytest.fail("the CLI embedded with JAX"))
    assert main(["--open_clip", str(folder), "--backend", "open_clip", "--tasks", task, "--out", str(tmp_path / "o"),
                 "--batch_size", "16", "--no_progress", "--no_plots"]) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["run"]["backend"] == "open_clip"
    assert results["metrics"] == pytest.approx(expected)
