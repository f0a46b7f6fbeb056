"""Small array helpers shared by the loss tests (imported by test modules; not a test module)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np


def random_normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Reproducible float32 standard-normal data."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def assert_close(a, b, tol: float = 1e-5) -> None:
    """Elementwise |a - b| <= tol + tol * |b|, compared in float64."""
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)


def dot_general_precisions(fn, *args) -> list[str]:
    """The operand precisions of every dot_general in the StableHLO of `jax.jit(fn)(*args)`, e.g.
    "HIGHEST, HIGHEST"; "" for a dot_general without one (the backend default: TF32/bf16 on GPU/TPU)."""
    text = jax.jit(fn).lower(*args).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    return [match.group(1) if (match := re.search(r"precision = \[([^\]]*)\]", line)) else "" for line in dots]


class ElementwiseTowers:
    """Stand-in towers without a single matmul (so every dot_general of an objective is a loss's own).

    encode_image: 2x2-pooled pixels tiled to `dim` channels -> patch tokens, their mean -> embedding;
    encode_text: a token-table lookup, mean over tokens. Both differentiable in params.
    """

    def __init__(self, dim: int = 6):
        if dim % 3:
            raise ValueError(f"dim must be a multiple of 3, got {dim}")
        self.dim = dim

    def params(self, vocab: int, seed: int = 0) -> dict:
        keys = jax.random.split(jax.random.key(seed), 2)
        return {
            "pixel_scale": jax.random.normal(keys[0], (self.dim,)),
            "token_table": jax.random.normal(keys[1], (vocab, self.dim)),
            "logit_scale": jnp.float32(np.log(1 / 0.07)),
        }

    def encode_image(self, config, params, image, *, dense="last"):
        n, h, w, _ = image.shape
        pooled = image.reshape(n, h // 2, 2, w // 2, 2, 3).mean(axis=(2, 4))
        patches = jnp.tanh(jnp.tile(pooled, self.dim // 3) * params["pixel_scale"])
        return patches.mean(axis=(1, 2)), patches

    def encode_text(self, config, params, tokens):
        states = params["token_table"][tokens]
        return states.mean(axis=1), states
