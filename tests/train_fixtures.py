"""Shared helpers of the trainer tests (imported by the test modules and the subprocess workers; not a test
module): a tiny scene-only experiment config, demo data, tree comparison.

The trainer compiles one XLA program per (config, mesh); the tests run the same program several times (an
uninterrupted run, a preempted one, its resumption, in this process or in subprocesses): the session's
persistent compilation cache (tests/conftest.py) stores the first compile's executable and the later ones load
it. The numbers are the same either way.
"""
from __future__ import annotations

import pathlib
import sys
from typing import Any

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "tests"))


def make_data(out: pathlib.Path, *, num_train: int = 48, image_size: int = 32) -> str:
    """Demo scenes (train split) written through the real converters; returns the record folder."""
    import data_fixtures

    written = data_fixtures.load_demo_module().make_demo_data(
        out, num_train=num_train, num_val=0, num_per_class=0, image_size=image_size
    )
    return written["scenes"]


def tiny_config(train_shards: str, **overrides: Any):
    """The tiny CLIP (32 px, 77 tokens), scene InfoNCE only, global batch 8, checkpoints every 2 steps.

    `overrides`: dotted field -> value, e.g. {"train.num_steps": 4}.
    """
    from geoalign_jax.train import experiment

    config = experiment.get_config()
    config.model.name = "tiny"
    config.data.train_shards = train_shards
    config.data.batch_size = 8
    config.data.image_size = 32
    config.data.read_threads = 2
    config.data.read_buffer_size = 8
    config.train.num_steps = 6
    config.train.log_every = 1
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 2
    config.checkpoint.every_steps = 2
    config.checkpoint.keep = 2
    for dotted, value in overrides.items():
        section, field = dotted.split(".", 1)
        config[section][field] = value
    return config


def flat(tree: Any) -> dict[str, np.ndarray]:
    """Any pytree (state, optimizer state) -> {path: numpy value}."""
    import jax

    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


def assert_bitwise_equal(expected: Any, actual: Any) -> None:
    """Same leaves, same dtypes, identical bits."""
    a, b = flat(expected), flat(actual)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape and a[key].tobytes() == b[key].tobytes(), f"{key} differs"
