"""Shared helpers of the parity tests: random CLIP parameters, jitted embedders, captions and tree
comparison (imported by the test modules; not a test module)."""
from __future__ import annotations

import functools

import jax
import numpy as np

from geoalign_jax.convert import layout
from geoalign_jax.models.clip import CLIPConfig, Params, encode_image, encode_text
from geoalign_jax.params_checkpoint import abstract_params

# Tolerance of fp32 embedding parity against PyTorch.
ATOL = 1e-4
# Captions for text parity: a plain one, one with punctuation, one longer than 77 tokens (truncated with
# EOT kept last; the Long-CLIP tests use it to exercise positions beyond 77), a short one.
CAPTIONS = [
    "Many boats are docked in the harbour next to a long pier.",
    "!! a baseball field beside two tennis courts",
    "Dense residential area with red roofs and green trees; " * 12,
    "storage tanks",
]


def random_params(config: CLIPConfig, seed: int) -> Params:
    """Random weights everywhere (biases and LayerNorms too, so a misplaced bias cannot hide)."""
    flat = layout.flatten_params(abstract_params(config))
    sizes = [int(np.prod(leaf.shape)) for leaf in flat.values()]
    # One draw for all leaves (one small XLA program), then cut into the leaves.
    noise = np.asarray(jax.random.normal(jax.random.key(seed), (sum(sizes),), np.float32)) * np.float32(0.02)
    offsets = np.cumsum([0] + sizes)
    params = layout.unflatten_params({
        # LayerNorm scales around 1, everything else around 0.
        path: noise[start:stop].reshape(leaf.shape) + np.float32(1.0 if path.endswith("/scale") else 0.0)
        for (path, leaf), start, stop in zip(flat.items(), offsets[:-1], offsets[1:])
    })
    params["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
    return params


@functools.partial(jax.jit, static_argnums=0)
def embed_images(config: CLIPConfig, params: Params, images: jax.Array) -> jax.Array:
    """Image embeddings (unnormalised) of NHWC images."""
    return encode_image(config, params, images)[0]


@functools.partial(jax.jit, static_argnums=0)
def embed_texts(config: CLIPConfig, params: Params, tokens: jax.Array) -> jax.Array:
    """Text embeddings (unnormalised) of token ids."""
    return encode_text(config, params, tokens)[0]


def assert_trees_equal(expected: Params, actual: Params) -> None:
    """Same parameter paths, and every leaf float32 with the same shape and bit-identical values."""
    flat_expected, flat_actual = layout.flatten_params(expected), layout.flatten_params(actual)
    assert flat_expected.keys() == flat_actual.keys()
    for key, value in flat_expected.items():
        got = np.asarray(flat_actual[key])
        assert got.dtype == np.float32 and got.shape == np.shape(value), key
        assert np.array_equal(np.asarray(value), got), f"{key} differs"
