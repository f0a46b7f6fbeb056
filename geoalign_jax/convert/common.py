"""Format-independent pieces of the converters: reading PyTorch state dicts, shape checks, helpers.

Reading never unpickles arbitrary objects: `.safetensors` files are read with safetensors (no torch),
`.pt`/`.bin`/`.pth` files only with `torch.load(path, map_location="cpu", weights_only=True)`.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import warnings
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from geoalign_jax.models.clip import CLIPConfig, Params
from geoalign_jax.models.posemb import LONG_CLIP_KEEP, LONG_CLIP_RATIO, stretch_text_posemb
from geoalign_jax.train.checkpoint import abstract_params

log = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]
# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def flatten_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Nested parameter dict -> {"visual/conv1/kernel": leaf, ...}."""
    flat: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        flat["/".join(str(getattr(k, "key", k)) for k in path)] = leaf
    return flat


def unflatten_params(flat: Mapping[str, Any]) -> Params:
    """Inverse of `flatten_params`."""
    nested: Params = {}
    for key, leaf in flat.items():
        node = nested
        *parents, name = key.split("/")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[name] = leaf
    return nested


def params_as_float32_numpy(params: Params) -> Params:
    """Host float32 copies of any (jax / numpy, bf16 / f32) parameter tree: the interchange dtype."""
    return jax.tree.map(lambda leaf: np.asarray(jax.device_get(leaf)).astype(np.float32), params)


def contiguous(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy when needed (safetensors refuses strided views); 0-d arrays stay 0-d,
    unlike `np.ascontiguousarray`, which would make them 1-d."""
    return np.require(array, requirements="C")


def concat_rows(parts: list[Any]) -> Any:
    """Concatenates along axis 0 with numpy for arrays and jax.numpy under `jax.eval_shape` tracing."""
    if all(isinstance(part, np.ndarray) for part in parts):
        return np.concatenate(parts, axis=0)
    return jnp.concatenate(parts, axis=0)


def expected_shapes(
    to_state_dict: Callable[[CLIPConfig, Params], Mapping[str, Any]], config: CLIPConfig
) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes that architecture `config` has in a foreign format.

    Runs the (pure layout) mapping under `jax.eval_shape`, so nothing is allocated and the expected
    shapes can never drift from what the exporter writes.
    """
    keys: list[str] = []

    def values_in_order(params: Params) -> list[Any]:
        # A list, not a dict: jax would sort dict keys, and the order names the *first* offending key.
        state_dict = to_state_dict(config, params)
        keys[:] = list(state_dict)
        return list(state_dict.values())

    shapes = jax.eval_shape(values_in_order, abstract_params(config))
    return {key: tuple(value.shape) for key, value in zip(keys, shapes)}


def check_state_dict_shapes(
    expected: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, np.ndarray], *, source: str, hint: str = ""
) -> None:
    """Raises ValueError naming the first missing, wrongly shaped or unexpected key (with both shapes).

    Keys are checked in the expected order (embeddings, blocks in order, heads), so the message points at
    the first place where the file and the architecture part ways.
    """
    for key, shape in expected.items():
        if key not in state_dict:
            raise ValueError(f"{source}: key {key!r} is missing (the architecture expects shape {shape}){hint}")
        if tuple(state_dict[key].shape) != tuple(shape):
            raise ValueError(
                f"{source}: key {key!r} has shape {tuple(state_dict[key].shape)}, "
                f"the architecture expects {tuple(shape)}{hint}"
            )
    for key in state_dict:
        if key not in expected:
            raise ValueError(
                f"{source}: unexpected key {key!r} with shape {tuple(state_dict[key].shape)} "
                f"(not part of this OpenAI-style CLIP architecture){hint}"
            )


def count_blocks(keys: Iterable[str], prefix: str) -> int:
    """Number of residual blocks `prefix{i}.` present (the largest index + 1; gaps are caught later)."""
    indices = set()
    for key in keys:
        if key.startswith(prefix):
            head = key[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                indices.add(int(head))
    return max(indices) + 1 if indices else 0


def heads_for_width(width: int, hint: int | None, *, tower: str) -> int:
    """Attention heads: the hint when given, else width // 64 (open_clip's head_width 64)."""
    if hint is not None:
        return hint
    if width % 64:
        raise ValueError(
            f"cannot infer the {tower} tower's attention heads from width {width} (not a multiple of 64): "
            "pass a model name whose architecture it is (--model), or import from a folder with its config"
        )
    return width // 64


def summarize(config: CLIPConfig, params: Params) -> str:
    """One line naming the architecture and the parameter count, for CLI output and logs."""
    count = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    vision, text = config.vision, config.text
    return (
        f"vision {vision.image_size}px/{vision.patch_size} width {vision.width} layers {vision.layers} "
        f"heads {vision.heads}; text ctx {text.context_length} vocab {text.vocab_size} width {text.width} "
        f"layers {text.layers} heads {text.heads}; embed {config.embed_dim}; "
        f"{'QuickGELU' if config.quick_gelu else 'GELU'}; {count:,} parameters"
    )


# ----------------------------------------------------------------------------------------------------
# Reading state dicts


def _to_numpy(key: str, value: Any, source: str) -> np.ndarray:
    """A tensor of any dtype -> numpy (bf16 via float32, since numpy has no bfloat16)."""
    if isinstance(value, np.ndarray):
        return value
    try:
        import torch
    except ImportError:  # pragma: no cover - only reached with torch-produced values
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.to(torch.float32)
        return tensor.numpy()
    raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")


def _read_safetensors(path: pathlib.Path) -> StateDict:
    from safetensors import safe_open

    state_dict: StateDict = {}
    with safe_open(str(path), framework="np") as handle:
        keys = list(handle.keys())
        bf16 = {key for key in keys if handle.get_slice(key).get_dtype() == "BF16"}
        for key in keys:
            if key not in bf16:
                state_dict[key] = handle.get_tensor(key)
    if bf16:  # numpy cannot hold bfloat16: read those through jax and widen to float32
        with safe_open(str(path), framework="flax") as handle:
            for key in bf16:
                state_dict[key] = np.asarray(handle.get_tensor(key), dtype=np.float32)
        state_dict = {key: state_dict[key] for key in keys}
    return state_dict


def _read_torch(path: pathlib.Path) -> Any:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs PyTorch (pip install torch); .safetensors files are read without it"
        ) from error
    try:
        with warnings.catch_warnings():
            # torch warns before refusing a TorchScript archive under weights_only; the refusal is ours to word.
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as error:
        if "TorchScript" in str(error):
            raise ValueError(
                f"{path} is a TorchScript archive (like OpenAI's original CLIP .pt files); it is not loaded "
                "because that runs code from the file. Save its state dict first, e.g. "
                "open_clip.create_model('ViT-B-32-quickgelu', pretrained=PATH) then "
                "torch.save(model.state_dict(), 'state_dict.pt')"
            ) from error
        raise
    except Exception as error:
        if "weights_only" in str(error) or "Unpickl" in type(error).__name__:
            raise ValueError(
                f"{path} holds objects that torch.load(weights_only=True) refuses (not a plain state dict): "
                f"{str(error).splitlines()[0]}"
            ) from error
        raise


def unwrap_state_dict(loaded: Any, *, source: str) -> dict[str, Any]:
    """A bare state dict or {"state_dict": ...} (open_clip training checkpoints) -> the state dict,
    with `module.` / `_orig_mod.` wrapper prefixes removed."""
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(loaded).__name__}")
    if "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    state_dict = dict(loaded)
    if not state_dict:
        raise ValueError(f"{source}: the state dict is empty")
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def read_state_dict(path: str | pathlib.Path) -> StateDict:
    """Reads a PyTorch state dict file (.safetensors, or .pt/.pth/.bin/.ckpt via torch weights_only)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    source = str(path)
    if path.suffix == ".safetensors":
        loaded: Any = _read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        loaded = _read_torch(path)
    else:
        raise ValueError(f"{path}: unknown weights file type {path.suffix!r} (use .safetensors, {', '.join(TORCH_SUFFIXES)})")
    state_dict = unwrap_state_dict(loaded, source=source)
    return {key: _to_numpy(key, value, source) for key, value in state_dict.items()}


def as_float32(state_dict: Mapping[str, np.ndarray]) -> StateDict:
    """Casts floating tensors (fp16, bf16-widened, fp64) to float32: the dtype of our parameters."""
    return {
        key: value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
        for key, value in state_dict.items()
    }


# ----------------------------------------------------------------------------------------------------
# Choices the weights cannot tell


def resolve_quick_gelu(explicit: bool | None, from_source: bool | None, model: str | None, *, source: str) -> bool:
    """QuickGELU cannot be read off the weights; decide it from, in order: the explicit choice, the
    source's own config (open_clip_config.json `quick_gelu`, HF `hidden_act`), a `-quickgelu` model name.

    Anything else is refused rather than guessed: a wrong activation loads fine and silently costs accuracy
    (open_clip issue #771).
    """
    if explicit is not None:
        if from_source is not None and from_source != explicit:
            log.warning(
                "%s: its config says quick_gelu=%s, overridden by the explicit quick_gelu=%s", source, from_source, explicit
            )
        return explicit
    if from_source is not None:
        return from_source
    if model is not None and model.endswith("-quickgelu"):
        return True
    raise ValueError(
        f"{source}: the activation cannot be inferred from weights; choose it explicitly: --quick-gelu for "
        "OpenAI-initialised checkpoints (RemoteCLIP, GeoRSCLIP ViT-B/32 and L/14, FarSLIP, SkyCLIP L/14, Long-CLIP) "
        "or --no-quick-gelu for LAION-trained ones (Python API: quick_gelu=True/False)"
    )


def stretch_text_context(
    config: CLIPConfig, params: Params, keep: int = LONG_CLIP_KEEP, ratio: int = LONG_CLIP_RATIO
) -> tuple[CLIPConfig, Params]:
    """Long-CLIP knowledge-preserved stretch of the text position embedding (77 -> 248 positions).

    Used at import time to let a 77-token checkpoint read long RS descriptions before fine-tuning.
    """
    text = params["text"]
    stretched = np.asarray(stretch_text_posemb(np.asarray(text["positional_embedding"]), keep, ratio), np.float32)
    new_config = dataclasses.replace(config, text=dataclasses.replace(config.text, context_length=stretched.shape[0]))
    new_params = {**params, "text": {**text, "positional_embedding": stretched}}
    return new_config, new_params
