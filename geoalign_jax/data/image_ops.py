"""Image geometry and pixels of the data pipeline, as small pure numpy functions: crop parameters (random resized
crops, crops within a box), what a crop and a flip do to boxes, crop + resize, CLIP normalisation, and decoding
a stored image at the smallest draft scale that still serves every output. `transforms.py` strings them into
one training example; the evaluation's preprocessing reuses `normalise` and `crop_resize`.

Coordinates: continuous pixel coordinates, pixel ``k`` covers ``[k, k + 1)``; boxes are ``(x1, y1, x2, y2)``.
PIL's ``resize(box=...)`` uses the same convention, so a crop ``(x0, y0, w, h)`` maps a source point ``x`` to
``(x - x0) / w`` of the output width.
"""
from __future__ import annotations

import dataclasses
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from geoalign_jax.batch_contract import OPENAI_MEAN, OPENAI_STD

#: Resampling filters for the data config's ``interpolation`` (bicubic = open_clip / FarSLIP training).
RESAMPLING = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


@dataclasses.dataclass(frozen=True)
class Crop:
    """A crop rectangle in source pixel coordinates: left, top, width, height (floats allowed)."""

    x0: float
    y0: float
    width: float
    height: float

    @property
    def box(self) -> tuple[float, float, float, float]:
        """``(x1, y1, x2, y2)`` as PIL's ``resize(box=...)`` wants it."""
        return (self.x0, self.y0, self.x0 + self.width, self.y0 + self.height)

    def scaled(self, scale_x: float, scale_y: float) -> Crop:
        """The same rectangle in an image resized by ``(scale_x, scale_y)`` (e.g. a JPEG decoded with draft)."""
        return Crop(self.x0 * scale_x, self.y0 * scale_y, self.width * scale_x, self.height * scale_y)


def full_crop(width: int, height: int) -> Crop:
    """The whole image (the global view without random resized crop: a squash resize, as FarSLIP does)."""
    return Crop(0.0, 0.0, float(width), float(height))


def sample_resized_crop(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    attempts: int = 10,
) -> Crop:
    """torchvision's ``RandomResizedCrop.get_params`` (integer crop of a ``width x height`` image).

    Same algorithm (10 tries of area fraction ~ U(scale) and log-uniform aspect ratio, then a centre crop with
    the ratio clamped), so the crop statistics match the PyTorch recipes we reproduce; the RNG is numpy's.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        crop_w = int(round(math.sqrt(target_area * aspect)))
        crop_h = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(rng.integers(0, height - crop_h + 1))
            left = int(rng.integers(0, width - crop_w + 1))
            return Crop(float(left), float(top), float(crop_w), float(crop_h))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        crop_w, crop_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        crop_w, crop_h = int(round(height * ratio[1])), height
    else:
        crop_w, crop_h = width, height
    return Crop(float((width - crop_w) // 2), float((height - crop_h) // 2), float(crop_w), float(crop_h))


def sample_crop_within(
    rng: np.random.Generator, parent: Crop, scale: tuple[float, float], ratio: tuple[float, float]
) -> Crop:
    """A random resized crop of the region ``parent`` (source coordinates).

    Used for the local crops: sampling inside the global view keeps every local crop box within [0, 1] of the
    global view, which the patch-to-patch distillation needs (RoI-Align on the global patch map). With the
    global view being the whole image this is exactly FarSLIP's multicrop.
    """
    inner = sample_resized_crop(
        rng, max(1, int(round(parent.width))), max(1, int(round(parent.height))), scale, ratio
    )
    fx = parent.width / max(1, int(round(parent.width)))
    fy = parent.height / max(1, int(round(parent.height)))
    return Crop(parent.x0 + inner.x0 * fx, parent.y0 + inner.y0 * fy, inner.width * fx, inner.height * fy)


def transform_boxes(
    boxes: np.ndarray,
    crop: Crop,
    flip: bool,
    out_size: tuple[int, int],
    *,
    min_visible_fraction: float = 0.25,
    min_size_px: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes of the source image -> boxes of the augmented view, and which of them survive.

    ``boxes`` [N, 4] source pixels (x1, y1, x2, y2); the view is ``crop`` resized to ``out_size`` = (width,
    height), then mirrored left-right when ``flip``. Each box is clipped to the crop; it is kept when the visible
    part is at least ``min_visible_fraction`` of its area and at least ``min_size_px`` output pixels wide and
    high (a sliver at the crop border teaches nothing and RoI-Align of it is noise).

    Returns ``(normalised [N, 4] float32 in [0, 1] of the view, keep [N] bool)``; rows of dropped boxes hold
    their clipped (possibly empty) value and must be ignored.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1c, y1c, x2c, y2c = crop.box
    clipped = np.stack(
        [
            np.clip(boxes[:, 0], x1c, x2c),
            np.clip(boxes[:, 1], y1c, y2c),
            np.clip(boxes[:, 2], x1c, x2c),
            np.clip(boxes[:, 3], y1c, y2c),
        ],
        axis=1,
    )
    visible_w = np.maximum(clipped[:, 2] - clipped[:, 0], 0.0)
    visible_h = np.maximum(clipped[:, 3] - clipped[:, 1], 0.0)
    full_area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 1e-12)
    out_w, out_h = out_size
    keep = (
        (visible_w * visible_h >= min_visible_fraction * full_area)
        & (visible_w * out_w / crop.width >= min_size_px)
        & (visible_h * out_h / crop.height >= min_size_px)
    )
    normalised = (clipped - np.array([x1c, y1c, x1c, y1c])) / np.array(
        [crop.width, crop.height, crop.width, crop.height]
    )
    if flip:
        normalised = np.stack(
            [1.0 - normalised[:, 2], normalised[:, 1], 1.0 - normalised[:, 0], normalised[:, 3]], axis=1
        )
    return np.clip(normalised, 0.0, 1.0).astype(np.float32), keep


def source_size_keep(boxes: np.ndarray, width: int, height: int, min_size: float, max_size: float) -> np.ndarray:
    """Which boxes ([N, 4] source pixels) FarSLIP's area filter keeps: the box clipped to the image, area in
    [min_size ** 2, max_size ** 2] source pixels (max_size 0 = no upper bound), as its data.py does before
    taking the crop."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    clipped_w = np.clip(boxes[:, 2], 0, width) - np.clip(boxes[:, 0], 0, width)
    clipped_h = np.clip(boxes[:, 3], 0, height) - np.clip(boxes[:, 1], 0, height)
    area = clipped_w * clipped_h
    keep = area >= min_size**2
    if max_size > 0:
        keep &= area <= max_size**2
    return keep


def visible_part(box: tuple[float, float, float, float] | np.ndarray, view: Crop) -> Crop:
    """The part of source box ``(x1, y1, x2, y2)`` inside the view's crop, in source pixels (may be empty).

    The same clip as ``transform_boxes``, so ``crop_box_in_view(visible_part(box, view), view, flip)`` is that
    box's row of the view boxes: the region a ``region_view_crops`` entry shows is the region RoI-Align pools.
    """
    x1c, y1c, x2c, y2c = view.box
    x1, y1, x2, y2 = (float(v) for v in np.asarray(box, dtype=np.float64).reshape(4))
    left, top = min(max(x1, x1c), x2c), min(max(y1, y1c), y2c)
    right, bottom = min(max(x2, x1c), x2c), min(max(y2, y1c), y2c)
    return Crop(left, top, max(right - left, 0.0), max(bottom - top, 0.0))


def crop_box_in_view(inner: Crop, view: Crop, flip: bool) -> np.ndarray:
    """Where the source rectangle ``inner`` lies in the (possibly flipped) view of ``view``: [4] in [0, 1]."""
    x1 = (inner.x0 - view.x0) / view.width
    x2 = (inner.x0 + inner.width - view.x0) / view.width
    y1 = (inner.y0 - view.y0) / view.height
    y2 = (inner.y0 + inner.height - view.y0) / view.height
    if flip:
        x1, x2 = 1.0 - x2, 1.0 - x1
    return np.clip(np.array([x1, y1, x2, y2], dtype=np.float32), 0.0, 1.0)


def crop_resize(
    image: Image.Image, crop: Crop, size: tuple[int, int], flip: bool = False, resample: int = Image.BICUBIC
) -> Image.Image:
    """The image op matching ``transform_boxes``: crop (float box), resize to ``size`` (w, h), mirror.

    PIL resizes straight from the crop box (no intermediate crop copy) and reduces large downscales first
    (``reducing_gap``), which keeps this fast for big aerial images.
    """
    out = image.resize(size, resample=resample, box=crop.box, reducing_gap=None if resample == Image.NEAREST else 3.0)
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return out


def normalise(image: Image.Image | np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> float32 CLIP-normalised (OpenAI mean/std), the model's input convention.

    A per-channel lookup table of the 256 possible values: the same numbers as ``(x / 255 - mean) / std`` in
    float32, at about half the cost of the arithmetic (this runs on every pixel of every view).
    """
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB pixels [H, W, 3], got {pixels.dtype} {pixels.shape}")
    out = np.empty(pixels.shape, np.float32)
    for channel in range(3):
        np.take(_NORM_TABLE[channel], pixels[..., channel], out=out[..., channel])
    return out


_NORM_SCALE = (1.0 / (255.0 * np.asarray(OPENAI_STD, dtype=np.float64))).astype(np.float32)
_NORM_SHIFT = (np.asarray(OPENAI_MEAN, dtype=np.float64) / np.asarray(OPENAI_STD, dtype=np.float64)).astype(
    np.float32
)
#: [3, 256] float32: normalised value of each uint8 level per channel.
_NORM_TABLE = np.ascontiguousarray(
    (np.arange(256, dtype=np.float32)[:, None] * _NORM_SCALE - _NORM_SHIFT).T.astype(np.float32)
)


def draft_scale_needed(crop: Crop, out_size: tuple[int, int]) -> float:
    """Smallest source scale at which ``crop`` still has at least ``out_size`` pixels (1 = full resolution)."""
    return min(1.0, max(out_size[0] / max(crop.width, 1e-6), out_size[1] / max(crop.height, 1e-6)))


def decode_image(
    data: bytes,
    expected_size: tuple[int, int] | None,
    min_scale: float = 1.0,
    *,
    where: str = "",
) -> tuple[Image.Image, float, float]:
    """Decode encoded image bytes to RGB, letting JPEG decode at a reduced scale >= ``min_scale``.

    The one image decoder of training and evaluation. Returns ``(image, scale_x, scale_y)`` (decoded size /
    ``expected_size``). Raises ``ValueError`` naming ``where`` (the record) when the bytes do not decode or the
    decoded size differs from ``expected_size`` (the record's width and height), so a broken record is skipped
    or reported, never used with boxes measured on another size. ``expected_size=None`` (image files that
    carry no size of their own) skips that check.
    """
    label = where or "(bytes)"
    try:
        image = Image.open(io.BytesIO(data))
    except Exception as error:  # PIL raises several unrelated types for data that is not an image
        raise ValueError(f"cannot decode image {label}: {error}") from error
    width, height = expected_size if expected_size is not None else image.size
    if image.size != (width, height):
        raise ValueError(f"{where + ': ' if where else ''}image is {image.size[0]}x{image.size[1]} "
                         f"but the record says {width}x{height}")
    if image.format == "JPEG" and min_scale < 0.5:
        image.draft("RGB", (max(1, math.ceil(width * min_scale)), max(1, math.ceil(height * min_scale))))
    try:
        image = image.convert("RGB") if image.mode != "RGB" else image
        image.load()
    except Exception as error:  # truncated or corrupt pixel data only shows when decoding
        raise ValueError(f"cannot decode image {label}: {error}") from error
    return image, image.size[0] / width, image.size[1] / height
