"""Small array helpers shared by the loss tests (imported by test modules; not a test module)."""
from __future__ import annotations

import numpy as np


def random_normal(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Reproducible float32 standard-normal data."""
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def assert_close(a, b, tol: float = 1e-5) -> None:
    """Elementwise |a - b| <= tol + tol * |b|, compared in float64."""
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=tol, atol=tol)
