"""Position-embedding resizing: open_clip's image resize and Long-CLIP's text stretch.

Both are pure array functions used by the towers (image sizes other than the trained one) and by the
converters (checkpoints saved at another size or context length).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# Long-CLIP's "knowledge-preserved stretching": keep the first 20 well-trained positions and
# interpolate the rest 4x, giving 4 * 77 - 3 * 20 = 248 positions.
LONG_CLIP_KEEP = 20
LONG_CLIP_RATIO = 4


def resize_image_posemb(posemb: Array, new_grid: tuple[int, int]) -> Array:
    """Resizes a ViT position embedding [1 + g*g, D] (class token first) to a new patch grid.

    Matches open_clip's `resize_pos_embed` (bicubic, antialias=True, align_corners=False, class token
    kept as is): torch's antialiased bicubic uses the same a=-0.5 Keys kernel as `jax.image.resize`.
    """
    num_patches = posemb.shape[0] - 1
    old = int(round(num_patches**0.5))
    if old * old != num_patches:
        raise ValueError(f"position embedding of {posemb.shape[0]} rows is not 1 + a square grid")
    gh, gw = new_grid
    if (gh, gw) == (old, old):
        return posemb
    grid = posemb[1:].reshape(old, old, -1).astype(jnp.float32)
    resized = jax.image.resize(grid, (gh, gw, grid.shape[-1]), method="cubic", antialias=True)
    return jnp.concatenate([posemb[:1], resized.reshape(gh * gw, -1).astype(posemb.dtype)], axis=0)


def stretch_text_posemb(
    posemb: Array | np.ndarray, keep: int = LONG_CLIP_KEEP, ratio: int = LONG_CLIP_RATIO
) -> np.ndarray:
    """Long-CLIP stretch of a text position embedding [L, D] to [ratio * L - (ratio - 1) * keep, D].

    Rows < keep are copied; each later gap (i, i+1) is filled by `ratio` linear steps; the last
    `ratio` rows extrapolate linearly from the last two (Long-CLIP `load_from_clip`).
    """
    old = np.asarray(posemb, dtype=np.float32)
    length = old.shape[0]
    if not 0 < keep < length:
        raise ValueError(f"keep={keep} must be in (0, {length})")
    rows = [old[:keep]]
    for i in range(keep, length - 1):
        for r in range(ratio):
            rows.append(((ratio - r) * old[i] + r * old[i + 1])[None] / ratio)
    for r in range(ratio):
        rows.append((old[-1] + r * (old[-1] - old[-2]) / ratio)[None])
    return np.concatenate(rows, axis=0)
