"""Training-free open-vocabulary semantic segmentation, SegEarth-OV's protocol (FarSLIP's OVSS numbers).

Read from SegEarth-OV's ``segearth_segmentor.py`` (github.com/likyoo/SegEarth-OV@3e22a96), step by step:

1. Queries: each class is one or more names (class file line ``name1,name2``); a name's text embedding
   is the mean of its L2-normalised embeddings under OpenAI's 80 ImageNet templates, normalised again.
2. Test-time resize (mmcv ``Resize(scale=(448, 448), keep_ratio=True)``: the image scaled, aspect kept, to
   fit 448 x 448, sides rounded half up; bilinear without antialiasing, as cv2 resizes), CLIP normalisation.
3. Sliding windows (crop 224, stride 112, the last window of a row / column moved back inside the image;
   an image smaller than the crop is one window); a window whose side is not a multiple of the patch is
   zero-padded (normalised space) to one, centred, and its logits cut back. Window sizes other than the
   model's interpolate the position embedding as SegEarth-OV's ``interpolate_pos_encoding`` does (torch
   bicubic without antialiasing at scale (g + 0.1) / old: ``posemb.resize_image_posemb_segearth``, not the
   tower's open_clip resize).
4. Per window: the dense output (``dense``: "segearth" = the modified last layer), its patch tokens and
   its class row after ``ln_post`` and the projection, each L2-normalised; patch logits = cosine to every
   query, plus ``cls_token_lambda`` (-0.3) times the class row's cosines; bilinear upsampling of the logit
   grid to the (padded) window.
5. Overlapping windows averaged; the averaged logits resized bilinearly to the original image; x
   ``logit_scale`` (50), softmax over queries, a class's probability is the max over its names; the
   prediction is the argmax, or ``background`` where the top probability is below ``threshold``.

Not included: FeatUp's learned upsampler (SegEarth-OV's base config enables ``feature_up`` with weights
trained elsewhere); published SegEarth-OV numbers include it, so these numbers are of the plain protocol.
SegEarth-OV runs in float16 on a GPU, this in float32.

Windows of every image of a split are cut, batched to a fixed ``window_batch`` (the last batch padded)
and run through one compiled function per window shape (one for a split whose resized images all cover
the crop); the averaging, resizing and scoring stream over rows, so a 6000 x 6000 tile never holds more
than a band of rows of logits (``predict`` / ``evaluate_images``).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from geoalign_jax.data import transforms
from geoalign_jax.eval import prompts

#: Task options and SegEarth-OV's value of each (``segearth_segmentor.py`` arguments, ``configs/base_config.py``,
#: the dataset configs for resize); threshold / background / resize default to the dataset's preset.
DEFAULTS: dict[str, Any] = {
    "crop": 224,                # slide_crop
    "stride": 112,              # slide_stride
    "logit_scale": 50.0,        # logit_scale
    "cls_token_lambda": -0.3,   # base_config.py
    "threshold": 0.0,           # prob_thd (dataset configs set 0.1 .. 0.4)
    "background": 0,            # bg_idx
    "resize": (448, 448),       # Resize(scale=(448, 448), keep_ratio=True) of every dataset config
    "dense": "segearth",        # model_type='SegEarth', ignore_residual=True
    "templates": "openai_imagenet",
    "window_batch": 16,         # ours: windows per compiled call (speed only, same numbers)
}
OPTION_NAMES = tuple(DEFAULTS)
#: Rows of output logits resampled at a time (memory bound of the final resize: rows x width x queries).
_OUTPUT_ELEMENTS = 1 << 22


class SegmentationOptionError(ValueError):
    """A task option that cannot be used; the message names it."""


@dataclasses.dataclass(frozen=True)
class SegEarthOptions:
    crop: int = DEFAULTS["crop"]
    stride: int = DEFAULTS["stride"]
    logit_scale: float = DEFAULTS["logit_scale"]
    cls_token_lambda: float = DEFAULTS["cls_token_lambda"]
    threshold: float = DEFAULTS["threshold"]
    background: int = DEFAULTS["background"]
    resize: tuple[int, int] | None = DEFAULTS["resize"]
    dense: str = DEFAULTS["dense"]
    templates: str = DEFAULTS["templates"]
    window_batch: int = DEFAULTS["window_batch"]

    def __post_init__(self) -> None:
        if self.crop < 1 or not 1 <= self.stride <= self.crop:
            raise SegmentationOptionError(f"crop {self.crop} / stride {self.stride}: need 1 <= stride <= crop")
        if self.window_batch < 1:
            raise SegmentationOptionError(f"window_batch must be >= 1, got {self.window_batch}")
        if self.dense not in ("segearth", "last"):
            raise SegmentationOptionError(f"dense must be segearth or last, got {self.dense!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise SegmentationOptionError(f"threshold is a probability in [0, 1], got {self.threshold}")
        if self.templates not in prompts.TEMPLATE_SETS:
            raise SegmentationOptionError(f"unknown templates {self.templates!r} (known: "
                                          f"{', '.join(sorted(prompts.TEMPLATE_SETS))})")
        if self.resize is not None and min(self.resize) < 1:
            raise SegmentationOptionError(f"resize sides must be positive, got {self.resize}")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["resize"] = list(self.resize) if self.resize is not None else None
        return data


def parse_resize(text: str) -> tuple[int, int] | None:
    """"448" or "448x448" (mmcv scale: long side <= the larger, short side <= the smaller), "none" = off."""
    if text.lower() in ("none", "0", "off"):
        return None
    parts = text.lower().split("x")
    try:
        sides = tuple(int(part) for part in parts)
    except ValueError:
        raise SegmentationOptionError(f"resize must be N, NxM or none, got {text!r}") from None
    if len(sides) == 1:
        sides = (sides[0], sides[0])
    if len(sides) != 2:
        raise SegmentationOptionError(f"resize must be N, NxM or none, got {text!r}")
    return sides  # type: ignore[return-value]


def make_options(values: Mapping[str, str], dataset_defaults: Mapping[str, Any] | None = None) -> SegEarthOptions:
    """Task option strings (``crop=224``) over the dataset's protocol settings over SegEarth-OV's defaults."""
    unknown = sorted(set(values) - set(OPTION_NAMES))
    if unknown:
        raise SegmentationOptionError(f"unknown segmentation options {unknown} (known: {list(OPTION_NAMES)})")
    chosen: dict[str, Any] = {}
    for key, value in (dataset_defaults or {}).items():
        if key in OPTION_NAMES:
            chosen[key] = tuple(value) if key == "resize" and value is not None else value
    for key, text in values.items():
        kind = type(DEFAULTS[key])
        try:
            if key == "resize":
                chosen[key] = parse_resize(text)
            elif kind is int:
                chosen[key] = int(text)
            elif kind is float:
                chosen[key] = float(text)
            else:
                chosen[key] = text
        except SegmentationOptionError:
            raise
        except ValueError:
            raise SegmentationOptionError(f"option {key}: expected {kind.__name__}, got {text!r}") from None
    return SegEarthOptions(**chosen)


# ---------------------------------------------------------------------------------------------------------
# Queries.


def class_queries(embed_texts: Callable[[Sequence[str]], np.ndarray], classes: Sequence[Sequence[str]],
                  templates: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(queries [Q, E] unit rows, class of each query [Q]): one query per class name, in class order."""
    names = [name for class_names in classes for name in class_names]
    query_class = np.asarray([index for index, class_names in enumerate(classes) for _ in class_names])
    texts = [template.format(name) for name in names for template in templates]
    embeddings = np.asarray(embed_texts(texts), dtype=np.float32).reshape(len(names), len(templates), -1)
    embeddings = embeddings / np.linalg.norm(embeddings, axis=-1, keepdims=True)
    queries = embeddings.mean(axis=1)
    return queries / np.linalg.norm(queries, axis=-1, keepdims=True), query_class


# ---------------------------------------------------------------------------------------------------------
# Geometry: resize sizes, windows, bilinear taps.


def rescaled_size(height: int, width: int, scale: tuple[int, int] | None) -> tuple[int, int]:
    """mmcv ``rescale_size`` with ``keep_ratio``: factor min(long/longest, short/shortest), sides round half up."""
    if scale is None:
        return height, width
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """SegEarth-OV's ``forward_slide`` window origins along one axis (last window moved back inside)."""
    grids = max(size - crop + stride - 1, 0) // stride + 1
    return [max(min(index * stride + crop, size) - crop, 0) for index in range(grids)]


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(low index, high index, weight of high) per output position: torch's bilinear with
    ``align_corners=False`` (source = (i + 0.5) * in / out - 0.5, clamped at 0), also cv2's INTER_LINEAR."""
    scale = in_size / out_size
    source = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
    high = np.minimum(low + 1, in_size - 1)
    return low, high, (source - low).astype(np.float32)


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 interpolation matrix of ``bilinear_taps``."""
    low, high, weight = bilinear_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, low), 1.0 - weight)
    np.add.at(matrix, (rows, high), weight)
    return matrix


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3], bilinear without antialiasing, rounded (cv2's rule)."""
    if image.shape[:2] == (height, width):
        return image
    low_y, high_y, wy = bilinear_taps(image.shape[0], height)
    low_x, high_x, wx = bilinear_taps(image.shape[1], width)
    pixels = image.astype(np.float32)
    rows = pixels[low_y] * (1.0 - wy)[:, None, None] + pixels[high_y] * wy[:, None, None]
    out = rows[:, low_x] * (1.0 - wx)[None, :, None] + rows[:, high_x] * wx[None, :, None]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _pad_sizes(size: int, patch: int) -> tuple[int, int]:
    """SegEarth-OV's ``compute_padsize`` along one axis: (before, after), the smaller half before."""
    missing = (-size) % patch
    return missing // 2, missing - missing // 2


# ---------------------------------------------------------------------------------------------------------
# The compiled window function.


@functools.lru_cache(maxsize=16)
def _window_function(config: Any, dense: str, window: tuple[int, int], matmul_precision: str | None) -> Any:
    """jit(params, windows [B, h, w, 3], queries [Q, E], cls_lambda) -> window logits [B, h, w, Q]:
    padded to the patch, dense tokens, cosines + the class-row term, upsampled to the padded window, cut."""
    import contextlib

    import jax
    import jax.numpy as jnp

    from geoalign_jax.models import clip

    patch = config.vision.patch_size
    (top, bottom), (left, right) = _pad_sizes(window[0], patch), _pad_sizes(window[1], patch)
    padded = (window[0] + top + bottom, window[1] + left + right)
    up_h = jnp.asarray(bilinear_matrix(padded[0] // patch, padded[0])[top:top + window[0]])
    up_w = jnp.asarray(bilinear_matrix(padded[1] // patch, padded[1])[left:left + window[1]])

    def run(params: Any, windows: Any, queries: Any, cls_lambda: Any) -> Any:
        context = jax.default_matmul_precision(matmul_precision) if matmul_precision else contextlib.nullcontext()
        with context:
            pixels = jnp.pad(windows, ((0, 0), (top, bottom), (left, right), (0, 0)))
            class_row, patches = clip.encode_image_dense(config, params, pixels, dense=dense,
                                                         posemb_resize="segearth")
            patches = patches / jnp.linalg.norm(patches, axis=-1, keepdims=True)
            class_row = class_row / jnp.linalg.norm(class_row, axis=-1, keepdims=True)
            logits = jnp.einsum("bhwe,qe->bhwq", patches, queries)
            logits = logits + cls_lambda * jnp.einsum("be,qe->bq", class_row, queries)[:, None, None, :]
            logits = jnp.einsum("yh,bhwq->bywq", up_h, logits)
            return jnp.einsum("xw,bywq->byxq", up_w, logits)

    return jax.jit(run)


@dataclasses.dataclass
class _Image:
    """One image in flight: its row accumulator and where its finished label rows go."""

    index: int
    accumulator: "_RowAverager"


class _RowAverager:
    """Sums window logits of one image and hands out finished rows (every window covering them added),
    divided by the window count; holds only the band of rows that windows still add to."""

    def __init__(self, height: int, width: int, num_queries: int, ys: Sequence[int], xs: Sequence[int],
                 window: tuple[int, int], emit: Callable[[np.ndarray], None]) -> None:
        self.height, self.width, self.num_queries = height, width, num_queries
        self.ys, self.xs, self.window = list(ys), list(xs), window
        self.emit = emit
        row_count = np.zeros(height, np.float32)
        col_count = np.zeros(width, np.float32)
        for y in self.ys:
            row_count[y:y + window[0]] += 1
        for x in self.xs:
            col_count[x:x + window[1]] += 1
        self.count = row_count[:, None] * col_count[None, :]  # windows are a grid: count = rows x columns
        self.base = 0  # first row not yet emitted
        self.band = np.zeros((0, width, num_queries), np.float32)
        self.done = [0] * len(self.ys)
        self.next_row = 0  # first window row not yet complete

    def add(self, row: int, column: int, logits: np.ndarray) -> None:
        y, x = self.ys[row], self.xs[column]
        end = y + self.window[0]
        if self.base + self.band.shape[0] < end:
            extra = end - self.base - self.band.shape[0]
            self.band = np.concatenate([self.band, np.zeros((extra, self.width, self.num_queries), np.float32)])
        self.band[y - self.base:end - self.base, x:x + self.window[1]] += logits
        self.done[row] += 1
        while self.next_row < len(self.ys) and self.done[self.next_row] == len(self.xs):
            self.next_row += 1
            final = self.ys[self.next_row] if self.next_row < len(self.ys) else self.height
            if final > self.base:
                rows = self.band[:final - self.base] / self.count[self.base:final, :, None]
                self.band = self.band[final - self.base:]
                self.base = final
                self.emit(rows)


class _RowResampler:
    """Bilinear resize of a stream of rows [n, w, Q] to [H, W, Q] (torch's ``align_corners=False``), output
    handed to ``emit`` in blocks; keeps only the source rows later output rows still read."""

    def __init__(self, in_size: tuple[int, int], out_size: tuple[int, int], num_queries: int,
                 emit: Callable[[int, np.ndarray], None]) -> None:
        self.identity = in_size == out_size
        self.low_y, self.high_y, self.weight_y = bilinear_taps(in_size[0], out_size[0])
        self.low_x, self.high_x, self.weight_x = bilinear_taps(in_size[1], out_size[1])
        self.out_height = out_size[0]
        self.block = max(1, _OUTPUT_ELEMENTS // max(1, out_size[1] * num_queries))
        self.emit = emit
        self.base = 0
        self.rows: np.ndarray | None = None
        self.next_out = 0

    def add(self, rows: np.ndarray) -> None:
        if self.identity:
            for start in range(0, rows.shape[0], self.block):
                self.emit(self.next_out, rows[start:start + self.block])
                self.next_out += rows[start:start + self.block].shape[0]
            return
        self.rows = rows if self.rows is None else np.concatenate([self.rows, rows])
        available = self.base + self.rows.shape[0]
        ready = int(np.searchsorted(self.high_y, available, side="left"))  # output rows whose sources are in
        while self.next_out < ready:
            stop = min(ready, self.next_out + self.block)
            low = self.low_y[self.next_out:stop] - self.base
            high = self.high_y[self.next_out:stop] - self.base
            weight = self.weight_y[self.next_out:stop, None, None]
            vertical = self.rows[low] * (1.0 - weight) + self.rows[high] * weight
            wx = self.weight_x[None, :, None]
            self.emit(self.next_out, vertical[:, self.low_x] * (1.0 - wx) + vertical[:, self.high_x] * wx)
            self.next_out = stop
        if self.next_out < self.out_height:
            keep_from = int(self.low_y[self.next_out])
            self.rows = self.rows[keep_from - self.base:]
            self.base = keep_from


def postprocess(logits: np.ndarray, query_class: np.ndarray, logit_scale: float, threshold: float,
                background: int) -> np.ndarray:
    """Logits [..., Q] -> labels [...] int32: softmax(x scale) over queries, max over a class's names,
    argmax; ``background`` where the top probability is below ``threshold``."""
    scaled = logits * np.float32(logit_scale)
    scaled -= scaled.max(axis=-1, keepdims=True)
    probabilities = np.exp(scaled)
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    starts = np.flatnonzero(np.r_[True, query_class[1:] != query_class[:-1]])
    if len(starts) != len(query_class):
        probabilities = np.maximum.reduceat(probabilities, starts, axis=-1)
    labels = probabilities.argmax(axis=-1).astype(np.int32)
    if threshold > 0:
        labels[probabilities.max(axis=-1) < threshold] = background
    return labels


# ---------------------------------------------------------------------------------------------------------
# The segmenter.


class SegEarthSegmenter:
    """The protocol for one model and one class list. ``predict_stream`` labels images, row block by row
    block; ``predict`` returns whole label maps.

    model_config / params: a ``models.clip.CLIPConfig`` and its parameters. queries / query_class: from
    ``class_queries``. matmul_precision: as ``embed.JaxEmbedder`` ("highest" to compare with torch on GPU).
    """

    def __init__(self, model_config: Any, params: Any, queries: np.ndarray, query_class: np.ndarray,
                 options: SegEarthOptions, *, matmul_precision: str | None = None) -> None:
        import jax

        self.config = model_config
        self.params = params
        self.queries = jax.device_put(np.asarray(queries, np.float32))
        self.query_class = np.asarray(query_class)
        if np.any(np.diff(self.query_class) < 0) or self.query_class[0] != 0:
            raise ValueError("queries must be in class order (class_queries gives them so)")
        self.num_classes = int(self.query_class.max()) + 1
        if not 0 <= options.background < self.num_classes:
            raise SegmentationOptionError(f"background {options.background} is not one of the "
                                          f"{self.num_classes} classes")
        self.options = options
        self.matmul_precision = matmul_precision
        self.windows_run = 0
        self.compiled_shapes: set[tuple[int, int]] = set()

    def _run_batch(self, window: tuple[int, int], pixels: list[np.ndarray]) -> np.ndarray:
        function = _window_function(self.config, self.options.dense, window, self.matmul_precision)
        self.compiled_shapes.add(window)
        batch = np.zeros((self.options.window_batch, window[0], window[1], 3), np.float32)
        batch[:len(pixels)] = np.stack(pixels)
        out = function(self.params, batch, self.queries, np.float32(self.options.cls_token_lambda))
        self.windows_run += len(pixels)
        return np.asarray(out)[:len(pixels)]

    def predict_stream(self, images: Iterable[np.ndarray],
                       on_rows: Callable[[int, int, np.ndarray], None]) -> None:
        """Label every uint8 RGB image [H, W, 3] of ``images`` (an iterator: images are read as windows are
        needed); ``on_rows(image_index, first_row, labels [n, W])`` gets each block of finished rows, in
        order. Windows of consecutive images share batches."""
        opts = self.options
        pending: dict[tuple[int, int], list[tuple[Any, int, int, np.ndarray]]] = {}

        def flush(window: tuple[int, int]) -> None:
            items = pending.pop(window, [])
            if not items:
                return
            logits = self._run_batch(window, [item[3] for item in items])
            for (averager, row, column, _), window_logits in zip(items, logits):
                averager.add(row, column, window_logits)

        for index, image in enumerate(images):
            if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
                raise ValueError(f"image {index}: expected uint8 [H, W, 3], got {image.dtype} {image.shape}")
            height, width = image.shape[:2]
            size = rescaled_size(height, width, opts.resize)
            pixels = resize_image(image, *size)  # uint8; each window is normalised when cut (memory)
            window = (min(opts.crop, size[0]), min(opts.crop, size[1]))
            ys = window_starts(size[0], opts.crop, opts.stride)
            xs = window_starts(size[1], opts.crop, opts.stride)

            def labels_out(first: int, logits: np.ndarray, index: int = index) -> None:
                on_rows(index, first, postprocess(logits, self.query_class, opts.logit_scale, opts.threshold,
                                                  opts.background))

            resampler = _RowResampler(size, (height, width), len(self.query_class), labels_out)
            averager = _RowAverager(size[0], size[1], len(self.query_class), ys, xs, window, resampler.add)
            for row, y in enumerate(ys):
                for column, x in enumerate(xs):
                    crop = transforms.normalise(pixels[y:y + window[0], x:x + window[1]])
                    pending.setdefault(window, []).append((averager, row, column, crop))
                    if len(pending[window]) == opts.window_batch:
                        flush(window)
            for other in [w for w in pending if w != window]:  # another shape waits for no one
                flush(other)
        for window in list(pending):
            flush(window)

    def predict(self, images: Iterable[np.ndarray]) -> list[np.ndarray]:
        """Whole label maps [H, W] int32 of uint8 RGB images (small images; see ``predict_stream``)."""
        images = list(images)
        out = [np.zeros(image.shape[:2], np.int32) for image in images]

        def store(index: int, first: int, labels: np.ndarray) -> None:
            out[index][first:first + labels.shape[0]] = labels

        self.predict_stream(iter(images), store)
        return out


def window_count(height: int, width: int, options: SegEarthOptions) -> int:
    """How many windows an image of this size is cut into."""
    size = rescaled_size(height, width, options.resize)
    return len(window_starts(size[0], options.crop, options.stride)) * len(window_starts(size[1], options.crop,
                                                                                       options.stride))


