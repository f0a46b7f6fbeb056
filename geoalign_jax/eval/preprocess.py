"""Evaluation image preprocessing: decode, resize, crop, CLIP-normalise, as open_clip's eval transform.

``resize_mode="shortest"`` (open_clip's default eval transform): bicubic resize of the shortest side
to ``image_size`` (long side ``int(size * long / short)``, torchvision's rule), centre crop with
torchvision's rounding, then the data pipeline's CLIP normalisation (``data.image_ops.normalise``).
``"squash"`` resizes both sides to ``image_size`` (FarSLIP's region crops; whole images whose boxes
must keep their normalised coordinates).
Images are converted to RGB before resizing (open_clip converts after; identical for RGB and
greyscale sources, which is what RS benchmarks ship).

Arrays are channels-last float32 [S, S, 3], the layout of the JAX towers; the open_clip backend
transposes them, so both backends see the same pixels.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image

from geoalign_jax.data import image_ops
from geoalign_jax.data.image_ops import normalise

ResizeMode = Literal["shortest", "squash"]


def decode_image(data: bytes, *, where: str = "", expected_size: tuple[int, int] | None = None) -> Image.Image:
    """Encoded JPEG/PNG/TIFF bytes -> RGB PIL image, with the training pipeline's decoder
    (``data.image_ops.decode_image``). ``expected_size`` (width, height) is the record's size: a decoded
    image of another size raises naming ``where``, since region boxes are measured on the record's size."""
    return image_ops.decode_image(data, expected_size, where=where)[0]


def resize_shortest_center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """torchvision ``Resize(size)`` + ``CenterCrop(size)`` on a PIL image, bicubic."""
    width, height = image.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = image_size, int(image_size * long / short)
    new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
    resized = image.resize((new_width, new_height), Image.BICUBIC)
    top = int(round((new_height - image_size) / 2.0))
    left = int(round((new_width - image_size) / 2.0))
    return resized.crop((left, top, left + image_size, top + image_size))


def preprocess_pil(image: Image.Image, image_size: int, resize_mode: ResizeMode = "shortest") -> np.ndarray:
    """A decoded image -> the network input [S, S, 3] float32."""
    image = image.convert("RGB")
    if resize_mode == "shortest":
        image = resize_shortest_center_crop(image, image_size)
    elif resize_mode == "squash":
        image = image.resize((image_size, image_size), Image.BICUBIC)
    else:
        raise ValueError(f"resize_mode must be 'shortest' or 'squash', got {resize_mode!r}")
    return normalise(image)


def preprocess_bytes(data: bytes, image_size: int, resize_mode: ResizeMode = "shortest", *,
                     where: str = "", expected_size: tuple[int, int] | None = None) -> np.ndarray:
    """Encoded bytes -> the network input [S, S, 3] float32 (``expected_size``: see ``decode_image``)."""
    return preprocess_pil(decode_image(data, where=where, expected_size=expected_size), image_size, resize_mode)


def crop_box(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    """Crop a pixel box (x1, y1, x2, y2), widened outward to whole pixels and clipped to the image.

    Raises when nothing of the box lies inside the image, rather than returning an empty crop.
    """
    width, height = image.size
    x1, y1, x2, y2 = box
    left, top = max(0, int(np.floor(x1))), max(0, int(np.floor(y1)))
    right, bottom = min(width, int(np.ceil(x2))), min(height, int(np.ceil(y2)))
    if right <= left or bottom <= top:
        raise ValueError(f"box {tuple(box)} has no pixels inside the {width}x{height} image")
    return image.crop((left, top, right, bottom))
