"""Region classification: each object box classified among category names, two ways.

- ``crop``: the box is cut from the original image, squashed to the model's input size (as FarSLIP
  feeds region crops) and encoded; the CLS embedding is classified.
- ``roi``: the whole image is squashed to the input size (so a box keeps its normalised coordinates,
  as in FG-CLIP's box classification), its patch tokens are RoI-aligned over the box (7x7 bins) and
  mean-pooled by ``models.roi_align.region_features``, the region feature the region losses train;
  that feature is classified.

Both compare against prompt-ensembled category embeddings (``zeroshot.build_classifier``). Model-free
apart from the embedder passed in.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import numpy as np

from geoalign_jax.eval import preprocess

REGION_METHODS = ("crop", "roi")


def normalised_boxes(boxes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Pixel boxes [R, 4] (x1, y1, x2, y2) of a width x height image -> [0, 1] coordinates."""
    width, height = size
    scale = np.array([width, height, width, height], dtype=np.float32)
    return np.clip(np.asarray(boxes, np.float32) / scale, 0.0, 1.0)


def _expected_size(images: Any, index: int) -> tuple[int, int] | None:
    """The record's (width, height) when the image source knows it (``RecordImages``), else None."""
    expected = getattr(images, "expected_size", None)
    return expected(index) if expected is not None else None


def crop_loader(images: Any, regions: Sequence[Sequence[tuple[tuple[float, ...], int]]],
                image_size: int) -> Callable[[int], np.ndarray]:
    """load(i) -> [R_i, S, S, 3]: every region crop of image i (decoded once per image; an image whose size
    differs from its record's raises naming the record, since the boxes are in the record's pixels)."""

    def load(index: int) -> np.ndarray:
        if not regions[index]:
            return np.zeros((0, image_size, image_size, 3), np.float32)
        image = preprocess.decode_image(images.image_bytes(index), where=images.where(index),
                                        expected_size=_expected_size(images, index))
        crops = [preprocess.preprocess_pil(preprocess.crop_box(image, box), image_size, "squash")
                 for box, _ in regions[index]]
        return np.stack(crops)

    return load


def whole_image_loader(images: Any, image_size: int) -> Callable[[int], np.ndarray]:
    """load(i) -> [1, S, S, 3]: image i squashed to the input size (boxes keep normalised coordinates, which
    ``normalised_boxes`` computes from the record's size: a decoded image of another size raises)."""

    def load(index: int) -> np.ndarray:
        data = images.image_bytes(index)
        return preprocess.preprocess_bytes(data, image_size, "squash", where=images.where(index),
                                           expected_size=_expected_size(images, index))[None]

    return load


@functools.lru_cache(maxsize=4)
def _compiled_pool(output_size: int) -> Any:
    """The jitted pooling function, shared across evaluations (one compile per shape for a whole run)."""
    import jax

    from geoalign_jax.models.roi_align import region_features

    def pool(feature_maps: Any, image_of_box: Any, boxes: Any) -> Any:
        # feature_maps [M, gh, gw, E], image_of_box [n], boxes [n, 4] -> [n, E]
        return region_features(feature_maps[image_of_box], boxes[:, None, :], output_size)[:, 0]

    return jax.jit(pool)


class RoiPooler:
    """Mean RoI-Align features (``region_features``, 7x7 bins by default) of boxes over patch-token maps.

    Boxes are processed in chunks of ``chunk`` (the last one padded); each box gathers its own image's
    map inside the compiled function, and the map batch is padded to ``map_batch``, so images with
    many or few boxes never trigger a recompile.
    """

    def __init__(self, map_batch: int, output_size: int = 7, chunk: int = 64) -> None:
        self.map_batch = map_batch
        self.chunk = chunk
        self._pool = _compiled_pool(output_size)

    def __call__(self, feature_maps: np.ndarray, image_of_box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """feature_maps [m <= map_batch, gh, gw, E], image_of_box [n] in 0..m-1, boxes [n, 4] normalised."""
        if feature_maps.shape[0] > self.map_batch:
            raise ValueError(f"{feature_maps.shape[0]} feature maps > map_batch {self.map_batch}")
        maps = np.zeros((self.map_batch,) + feature_maps.shape[1:], np.float32)
        maps[: feature_maps.shape[0]] = feature_maps
        outputs = []
        for start in range(0, boxes.shape[0], self.chunk):
            chunk_boxes = np.asarray(boxes[start:start + self.chunk], np.float32)
            chunk_images = np.asarray(image_of_box[start:start + self.chunk], np.int32)
            count = chunk_boxes.shape[0]
            if count < self.chunk:
                chunk_boxes = np.concatenate([chunk_boxes, np.tile([[0.0, 0.0, 1.0, 1.0]], (self.chunk - count, 1))])
                chunk_images = np.concatenate([chunk_images, np.zeros(self.chunk - count, np.int32)])
            pooled = self._pool(maps, chunk_images, chunk_boxes.astype(np.float32))
            outputs.append(np.asarray(pooled)[:count])
        return np.concatenate(outputs) if outputs else np.zeros((0, feature_maps.shape[-1]), np.float32)
