"""Exponential moving average of the parameters for evaluation and export (`train.ema_decay`), apart from the
distillation teacher (whose momentum is loss.distill_ema_momentum).

After each applied update t (the optimizer's own count, so skipped non-finite steps do not move it):
    ema <- d_t * ema + (1 - d_t) * params,   d_t = min(ema_decay, (1 + t) / (10 + t))
The warm-up (TensorFlow's ExponentialMovingAverage with num_updates; timm's ModelEmaV2 keeps a fixed decay,
big_vision's EMA a warm-up of its own) keeps the first averages from being dominated by the random or
pretrained start: d_0 = 0.1, d_90 = 0.91, the full 0.9999 after about 90,000 updates.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from geoalign_jax.losses.consistency import ema_update


def ema_decay_at(ema_decay: float, updates: jax.Array) -> jax.Array:
    """d_t for `updates` updates applied before this one (a traced int)."""
    updates = jnp.asarray(updates, jnp.float32)
    return jnp.minimum(jnp.float32(ema_decay), (1.0 + updates) / (10.0 + updates))


def update_ema(ema: Any, params: Any, ema_decay: float, updates: jax.Array) -> Any:
    """The average after one more update of `params`, in the average's own dtypes."""
    moved = ema_update(ema, params, ema_decay_at(ema_decay, updates))
    return jax.tree.map(lambda new, old: new.astype(old.dtype), moved, ema)


__all__ = ["ema_decay_at", "update_ema"]
