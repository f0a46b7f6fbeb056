"""Embedding backends (JAX towers or an open_clip torch model) and the batched embedding driver.

A backend turns preprocessed pixel arrays [n, S, S, 3] and caption strings into embeddings; the
metrics never know which one produced them, which is how the JAX model and its open_clip export are
checked to give the same numbers.

The JAX backend compiles ``encode_image`` / ``encode_text`` once per shape: every call is cut into
fixed-size batches and the last one is padded (pad rows are dropped from the output), so a dataset
compiles one image function and one text function whatever its size (the driver's even batches below
make that shape depend on the size: a run over several datasets compiles one image function per distinct
row count, each between half the batch and the batch; at ViT-B/32 on the CPU a compile costs about what
the pad rows it saves cost on average; on an accelerator it costs more than they do). Two
exceptions keep CPU evaluation cheap: embeddings alone run a function that does not return patch
tokens (so XLA drops all of the last block but the pooled row), and a text call no longer than one
batch (the prompts of a zero-shot classifier) is padded only to the next power of two (>= 8), not
to the full text batch. The driver cuts a stream of n images into equal batches (600 images at batch 64:
10 of 60, not 9 of 64 and one of 24 padded to 64) and asks the backend to pad to that size (``pad_to``),
so no compute goes to pad rows beyond the last batch's remainder. Texts run only as many tokens as the
call's longest text needs, rounded up to one of the text tower's length buckets (the EOT embedding under
the causal mask does not depend on later positions), so a zero-shot classifier's short prompts compile and
run one 32-token tower instead of a switch over the 32- and 77-token ones.
"""
from __future__ import annotations

import functools
import sys
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np


class Embedder(Protocol):
    """What the evaluations need from a model: unnormalised embeddings, float32 numpy."""

    image_size: int

    def embed_images(self, images: np.ndarray, *, pad_to: int | None = None) -> np.ndarray:
        """[n, S, S, 3] preprocessed -> [n, E]. ``pad_to``: the batch rows the caller's batches have (a
        backend that compiles per shape pads a shorter batch to it; others ignore it)."""

    def embed_images_with_patches(self, images: np.ndarray, *, pad_to: int | None = None
                                  ) -> tuple[np.ndarray, np.ndarray]:
        """[n, S, S, 3] -> ([n, E], patch tokens [n, gh, gw, E]); needed only for RoI region features."""

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """n strings -> [n, E]."""


def _pad_rows(rows: np.ndarray, size: int) -> np.ndarray:
    if rows.shape[0] == size:
        return rows
    padded = np.zeros((size,) + rows.shape[1:], dtype=rows.dtype)
    padded[: rows.shape[0]] = rows
    return padded


def text_rows(count: int, batch_size: int) -> int:
    """Rows a text call of ``count`` texts is padded to per batch: the full batch when it spans several
    batches, else the next power of two >= 8 (at most ``batch_size``), so a 60-prompt classifier runs 64
    rows, not 256, and any call compiles at most a few shapes."""
    if count >= batch_size:
        return batch_size
    return min(batch_size, max(8, 1 << max(count - 1, 0).bit_length()))


def even_batch_rows(count: int, batch_size: int) -> int:
    """Rows per batch when ``count`` rows are cut into as few batches of at most ``batch_size`` as possible,
    all of one size but the last (600 at 64 -> 60: ten batches of 60; 100 at 64 -> 50), so padding the
    last batch to the common size wastes fewer than one row per batch instead of up to a whole batch."""
    if count <= 0:
        return batch_size
    batches = -(-count // batch_size)
    return -(-count // batches)


def text_tokens_needed(tokens: np.ndarray, buckets: Sequence[int]) -> int:
    """The shortest of ``buckets`` (ascending token lengths) holding every text's EOT token (the largest id,
    so at ``argmax``) of ``tokens`` [n, L]; L when none does."""
    if tokens.shape[0] == 0:
        return tokens.shape[1]
    needed = int(np.max(np.argmax(tokens, axis=-1))) + 1
    return next((bucket for bucket in buckets if bucket >= needed), tokens.shape[1])


@functools.lru_cache(maxsize=8)
def _compiled_towers(config: Any, dense: str, matmul_precision: str | None) -> tuple[Any, Any, Any]:
    """jit-compiled (image_fn -> (embedding, patch tokens), embedding_fn -> embedding, text_fn) per
    architecture, shared by every JaxEmbedder of that config, so periodic evaluation in a training loop
    compiles once, not once per evaluation."""
    import contextlib

    import jax

    from geoalign_jax.models import clip

    def precision() -> Any:
        return jax.default_matmul_precision(matmul_precision) if matmul_precision else contextlib.nullcontext()

    def image_fn(params: Any, images: Any) -> Any:
        with precision():
            return clip.encode_image(config, params, images, dense=dense)

    def embedding_fn(params: Any, images: Any) -> Any:
        return image_fn(params, images)[0]

    def text_fn(params: Any, tokens: Any) -> Any:
        with precision():
            return clip.encode_text(config, params, tokens)[0]

    return jax.jit(image_fn), jax.jit(embedding_fn), jax.jit(text_fn)


class JaxEmbedder:
    """``models.clip.encode_image`` / ``encode_text`` under ``jax.jit`` with fixed, padded batches.

    dense: which patch tokens ``embed_images_with_patches`` returns ("last" or "segearth").
    matmul_precision: None keeps JAX's default; "highest" forces full float32 matmuls on GPU/TPU
    (whose defaults use TF32 / bf16 passes), e.g. to compare with torch to 1e-4.
    """

    def __init__(self, config: Any, params: Any, *, batch_size: int = 64, text_batch_size: int = 256,
                 dense: str = "last", matmul_precision: str | None = None) -> None:
        import jax

        from geoalign_jax.tokenizer import Tokenizer

        if batch_size < 1 or text_batch_size < 1:
            raise ValueError(f"batch sizes must be positive, got {batch_size}, {text_batch_size}")
        self.config = config
        self.image_size = config.vision.image_size
        self.batch_size = batch_size
        self.text_batch_size = text_batch_size
        self._tokenize = Tokenizer(config.text.context_length)
        self.dense = dense
        self.matmul_precision = matmul_precision
        self._params = jax.device_put(params)
        self._image_fn, self._embedding_fn, self._text_fn = _compiled_towers(config, dense, matmul_precision)

    @property
    def params(self) -> Any:
        """The parameters the towers run with (for the parameter hash in results.json)."""
        return self._params

    def _images(self, images: np.ndarray, with_patches: bool, pad_to: int | None
                ) -> tuple[np.ndarray, np.ndarray | None]:
        images = np.asarray(images, dtype=np.float32)
        expected = (self.image_size, self.image_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images must be [n, {self.image_size}, {self.image_size}, 3], got {images.shape}")
        rows = self.batch_size if pad_to is None else min(pad_to, self.batch_size)
        embeddings, patches = [], []
        for start in range(0, images.shape[0], rows):
            chunk = images[start:start + rows]
            if with_patches:
                embedding, patch_tokens = self._image_fn(self._params, _pad_rows(chunk, rows))
                patches.append(np.asarray(patch_tokens)[: chunk.shape[0]])
            else:
                embedding = self._embedding_fn(self._params, _pad_rows(chunk, rows))
            embeddings.append(np.asarray(embedding)[: chunk.shape[0]])
        embedding_dim = self.config.embed_dim
        all_embeddings = np.concatenate(embeddings) if embeddings else np.zeros((0, embedding_dim), np.float32)
        if not with_patches:
            return all_embeddings, None
        return all_embeddings, np.concatenate(patches) if patches else None

    def embed_images(self, images: np.ndarray, *, pad_to: int | None = None) -> np.ndarray:
        return self._images(images, with_patches=False, pad_to=pad_to)[0]

    def embed_images_with_patches(self, images: np.ndarray, *, pad_to: int | None = None
                                  ) -> tuple[np.ndarray, np.ndarray]:
        embeddings, patches = self._images(images, with_patches=True, pad_to=pad_to)
        assert patches is not None
        return embeddings, patches

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        from geoalign_jax.models import text as text_tower

        tokens = self._tokenize(list(texts))
        if self.config.text.width >= text_tower.MIN_BUCKETED_WIDTH:  # the towers that bucket lengths
            tokens = tokens[:, :text_tokens_needed(tokens, text_tower.length_buckets(tokens.shape[1]))]
        rows = text_rows(tokens.shape[0], self.text_batch_size)
        outputs = []
        for start in range(0, tokens.shape[0], rows):
            chunk = tokens[start:start + rows]
            outputs.append(np.asarray(self._text_fn(self._params, _pad_rows(chunk, rows)))[: len(chunk)])
        return np.concatenate(outputs) if outputs else np.zeros((0, self.config.embed_dim), np.float32)


class OpenClipEmbedder:
    """A torch open_clip model (e.g. an export of our weights) behind the same interface.

    Images arrive channels-last as for JAX and are transposed to NCHW, so both backends see identical
    pixels; texts go through open_clip's own tokenizer. Patch tokens are the last block's spatial
    tokens after ``ln_post`` and ``proj`` (the JAX ``dense="last"`` definition).
    """

    def __init__(self, model: Any, tokenizer: Callable[[Sequence[str]], Any], image_size: int, *,
                 batch_size: int = 64, device: str = "cpu") -> None:
        import torch

        self._torch = torch
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.batch_size = batch_size
        self.device = device

    @classmethod
    def from_dir(cls, model_dir: str, *, batch_size: int = 64, device: str = "cpu") -> "OpenClipEmbedder":
        """Load an exported folder (open_clip_config.json + weights) with open_clip's ``local-dir:``."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
        tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
        image_size = model.visual.image_size
        image_size = image_size[0] if isinstance(image_size, (tuple, list)) else int(image_size)
        return cls(model, tokenizer, image_size, batch_size=batch_size, device=device)

    def _to_torch(self, images: np.ndarray) -> Any:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"images must be [n, {self.image_size}, {self.image_size}, 3], got {images.shape}")
        return self._torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).to(self.device)

    def embed_images(self, images: np.ndarray, *, pad_to: int | None = None) -> np.ndarray:
        outputs = []
        with self._torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = self._to_torch(images[start:start + self.batch_size])
                outputs.append(self.model.encode_image(batch).float().cpu().numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0, self.model.visual.output_dim), np.float32)

    def embed_images_with_patches(self, images: np.ndarray, *, pad_to: int | None = None
                                  ) -> tuple[np.ndarray, np.ndarray]:
        visual = self.model.visual
        embeddings, patches = [], []
        with self._torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                batch = self._to_torch(images[start:start + self.batch_size])
                out = visual.forward_intermediates(batch, indices=1, normalize_intermediates=True,
                                                   output_fmt="NLC")
                tokens = out["image_intermediates"][-1]
                if visual.proj is not None:
                    tokens = tokens @ visual.proj
                grid = self.image_size // visual.patch_size[0]
                patches.append(tokens.reshape(tokens.shape[0], grid, grid, -1).float().cpu().numpy())
                embeddings.append(out["image_features"].float().cpu().numpy())
        return np.concatenate(embeddings), np.concatenate(patches)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        outputs = []
        texts = list(texts)
        with self._torch.no_grad():
            for start in range(0, len(texts), self.batch_size * 4):
                tokens = self.tokenizer(texts[start:start + self.batch_size * 4]).to(self.device)
                outputs.append(self.model.encode_text(tokens).float().cpu().numpy())
        return np.concatenate(outputs)


# ---------------------------------------------------------------------------------------------------------
# The driver: decode + preprocess in grain threads, re-batch, embed, with a progress bar.


def preprocessed_stream(load: Callable[[int], np.ndarray], count: int, *, num_threads: int = 2,
                        prefetch: int = 64) -> Iterator[np.ndarray]:
    """``load(i)`` -> [k_i, S, S, 3] for i in 0..count-1, in order, computed in grain's reader threads."""
    import grain

    if count == 0:
        return iter(())
    dataset = grain.MapDataset.range(count).map(load)
    read_options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(read_options))


def rebatch(arrays: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Concatenate variable-length [k, ...] arrays and cut them into [batch_size, ...] pieces (last one short)."""
    pending: list[np.ndarray] = []
    pending_rows = 0
    for array in arrays:
        if array.shape[0] == 0:
            continue
        pending.append(array)
        pending_rows += array.shape[0]
        while pending_rows >= batch_size:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending, pending_rows = ([rest] if rest.shape[0] else []), rest.shape[0]
    if pending_rows:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """tqdm on stderr (disabled when not wanted, e.g. inside the trainer's periodic eval)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, leave=False)


def embed_stream(embedder: Embedder, load: Callable[[int], np.ndarray], count: int, total_rows: int, *,
                 batch_size: int, desc: str, progress: bool, with_patches: bool = False,
                 num_threads: int = 2) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield (embeddings, patch tokens or None) batch by batch over all rows that ``load`` produces."""
    bar = progress_bar(total_rows, desc, progress)
    rows = even_batch_rows(total_rows, batch_size)
    try:
        for batch in rebatch(preprocessed_stream(load, count, num_threads=num_threads), rows):
            if with_patches:
                embeddings, patches = embedder.embed_images_with_patches(batch, pad_to=rows)
            else:
                embeddings, patches = embedder.embed_images(batch, pad_to=rows), None
            bar.update(batch.shape[0])
            yield embeddings, patches
    finally:
        bar.close()


def embed_all(embedder: Embedder, load: Callable[[int], np.ndarray], count: int, total_rows: int, *,
              batch_size: int, desc: str = "embedding images", progress: bool = True,
              num_threads: int = 2) -> np.ndarray:
    """All image embeddings [total_rows, E] in load order."""
    parts = [embeddings for embeddings, _ in embed_stream(
        embedder, load, count, total_rows, batch_size=batch_size, desc=desc, progress=progress,
        num_threads=num_threads)]
    if not parts:
        raise ValueError(f"{desc}: nothing to embed")
    result = np.concatenate(parts)
    if result.shape[0] != total_rows:
        raise RuntimeError(f"{desc}: expected {total_rows} embeddings, got {result.shape[0]}")
    return result
