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


def _grid_side(posemb: Array) -> int:
    """g of a ViT position embedding [1 + g*g, D] (class token first); ValueError when it is not one."""
    num_patches = posemb.shape[0] - 1
    side = int(round(num_patches**0.5))
    if side * side != num_patches:
        raise ValueError(f"position embedding of {posemb.shape[0]} rows is not 1 + a square grid")
    return side


def resize_image_posemb(posemb: Array, new_grid: tuple[int, int]) -> Array:
    """Resizes a ViT position embedding [1 + g*g, D] (class token first) to a new patch grid.

    Matches open_clip's `resize_pos_embed` (bicubic, antialias=True, align_corners=False, class token
    kept as is): torch's antialiased bicubic uses the same a=-0.5 Keys kernel as `jax.image.resize`.
    """
    old = _grid_side(posemb)
    gh, gw = new_grid
    if (gh, gw) == (old, old):
        return posemb
    grid = posemb[1:].reshape(old, old, -1).astype(jnp.float32)
    resized = jax.image.resize(grid, (gh, gw, grid.shape[-1]), method="cubic", antialias=True)
    return jnp.concatenate([posemb[:1], resized.reshape(gh * gw, -1).astype(posemb.dtype)], axis=0)


#: torch's bicubic kernel without antialiasing (``upsample_bicubic2d``: A = -0.75).
_TORCH_CUBIC_A = -0.75
#: How a window of another size than the trained one gets its position embedding.
POSEMB_RESIZES = ("open_clip", "segearth")


def _torch_cubic_weights(t: np.ndarray) -> np.ndarray:
    """[n, 4] weights of the taps at floor(src) - 1 .. + 2 for fractional offsets t (torch's cubic convolution)."""
    a = _TORCH_CUBIC_A

    def near(x: np.ndarray) -> np.ndarray:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: np.ndarray) -> np.ndarray:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def torch_bicubic_matrix(in_size: int, out_size: int, scale_factor: float) -> np.ndarray:
    """[out, in] float32 matrix of ``F.interpolate(mode="bicubic", scale_factor=s, align_corners=False)`` along
    one axis (no antialiasing): source = (i + 0.5) / s - 0.5, not clamped; taps clamped to the border."""
    source = (np.arange(out_size, dtype=np.float64) + 0.5) / scale_factor - 0.5
    low = np.floor(source)
    weights = _torch_cubic_weights(source - low)
    taps = np.clip(low[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
    return matrix.astype(np.float32)


def resize_image_posemb_segearth(posemb: Array, new_grid: tuple[int, int]) -> Array:
    """SegEarth-OV's ``interpolate_pos_encoding`` (open_clip/transformer.py @ 3e22a96), which its sliding windows
    use, instead of open_clip's resize: torch bicubic without antialiasing at scale factor (g + 0.1) / old per
    axis (the 0.1 keeps the output size g), class token kept. Differs from `resize_image_posemb` by ~20% of
    the embedding's norm for 14 -> 13."""
    old = _grid_side(posemb)
    gh, gw = new_grid
    if (gh, gw) == (old, old):
        return posemb
    rows = jnp.asarray(torch_bicubic_matrix(old, gh, (gh + 0.1) / old))
    cols = jnp.asarray(torch_bicubic_matrix(old, gw, (gw + 0.1) / old))
    grid = posemb[1:].reshape(old, old, -1).astype(jnp.float32)
    resized = jnp.einsum("yh,xw,hwd->yxd", rows, cols, grid, precision=jax.lax.Precision.HIGHEST)
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
