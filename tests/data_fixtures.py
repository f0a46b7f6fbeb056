"""Test helpers shared by the data and evaluation tests (imported by the test modules; not a test module).

``from data_fixtures import eval_records`` in a test module registers the fixture there (pytest collects
fixtures from a module's namespace); ``load_demo_module()`` loads tools/make_demo_data.py, which is a script
rather than a package module.
"""
from __future__ import annotations

import importlib.util
import pathlib
import sys
from types import ModuleType

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_demo_module() -> ModuleType:
    """tools/make_demo_data.py as the module ``make_demo_data`` (loaded once per process)."""
    if "make_demo_data" in sys.modules and getattr(sys.modules["make_demo_data"], "make_demo_data", None):
        return sys.modules["make_demo_data"]
    spec = importlib.util.spec_from_file_location("make_demo_data", REPO_ROOT / "tools" / "make_demo_data.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["make_demo_data"] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def records(shared_data, tmp_path_factory) -> dict[str, pathlib.Path]:
    """The real AID sample (class folders), RSICD sample (Karpathy JSON) and DOTA sample (oriented boxes)
    converted to record folders."""
    from geoalign_jax.data import prepare_detection, prepare_formats

    out = tmp_path_factory.mktemp("eval_records")
    prepare_formats.prepare_folders(shared_data / "aid_sample", out / "aid", name="aid", progress=False)
    prepare_formats.prepare_karpathy(shared_data / "rsicd_sample" / "dataset_rsicd.json",
                                shared_data / "rsicd_sample" / "images", out / "rsicd", name="rsicd", progress=False)
    prepare_detection.prepare_dota(shared_data / "dota_sample" / "images", shared_data / "dota_sample" / "labelTxt",
                            out / "dota", progress=False)
    return {"aid": out / "aid", "rsicd": out / "rsicd", "dota": out / "dota"}


class MeanEmbedder:
    """A model-free backend: the mean pixel as the image embedding, a fixed vector per text."""

    image_size = 16

    def embed_images(self, images, *, pad_to=None):
        return images.mean(axis=(1, 2))

    def embed_texts(self, texts):
        return np.stack([np.array([len(t) % 3, 1.0, len(t) % 5], np.float32) for t in texts])


def small_data_config(train_shards, **overrides):
    """The data config the pipeline tests start from: small batches and images, few read threads."""
    from geoalign_jax.data import pipeline

    config = pipeline.default_data_config()
    config.train_shards = str(train_shards)
    config.batch_size = 4
    config.image_size = 32
    config.read_threads = 2
    config.read_buffer_size = 8
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def assert_batches_equal(expected, actual):
    """Two lists of host batches hold the same keys and bitwise equal arrays."""
    assert len(expected) == len(actual)
    for step, (a, b) in enumerate(zip(expected, actual)):
        assert sorted(a) == sorted(b), f"batch {step}: keys differ"
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"batch {step} key {key}")
