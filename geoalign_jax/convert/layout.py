"""Format-independent pieces of the converters: reading PyTorch state dicts, shape checks, the
state-dict <-> parameter mapping driven by a format's `StateDictLayout` table, architecture inference and
the import pipeline. A format module (open_clip.py, hf.py) holds only its key table and what is specific
to its files (metadata, published variants).

Reading never unpickles arbitrary objects: `.safetensors` files are read with safetensors (no torch),
`.pt`/`.bin`/`.pth` files only with `torch.load(path, map_location="cpu", weights_only=True)`. A file that
cannot be read (empty, truncated, damaged, not that format) raises `WeightsFileError`, one line naming the
file and what is wrong; zip-format torch files are checked entry by entry against their CRC-32 first, so a
changed block fails instead of loading as wrong weights (safetensors and legacy torch files carry no checksum).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
import warnings
import zipfile
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from geoalign_jax.models.clip import (
    CLIPConfig,
    Params,
    TextConfig,
    VisionConfig,
    get_model_config,
)
from geoalign_jax.models.posemb import (
    LONG_CLIP_KEEP,
    LONG_CLIP_RATIO,
    stretch_text_posemb,
)

# flatten_params is re-exported for the converters and their tests: its one definition is in params_checkpoint.py.
from geoalign_jax.params_checkpoint import abstract_params, flatten_params  # noqa: F401

log = logging.getLogger(__name__)

StateDict = dict[str, np.ndarray]
# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
# The text context Long-CLIP's stretch starts from (CLIP's 77 tokens).
STRETCH_FROM_CONTEXT = 77


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
# Layout tables: how a PyTorch format names and lays out our parameters

# How a torch tensor relates to our array: equal, transposed (Linear weight / HF projection), or conv
# OIHW <-> our HWIO.
SAME, TRANSPOSE, CONV = "same", "transpose", "conv"
# A torch (weight, bias) pair: LayerNorm (weight = our scale) or Linear (weight [out, in]).
TorchPair = tuple[Any, Any]
QKV = ("query", "key", "value")
# Parts of a residual block, named as in our tree; "qkv" names a fused in_proj (query; key; value rows).
BLOCK_PARTS = ("ln_1", "query", "key", "value", "qkv", "out", "ln_2", "c_fc", "c_proj")


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One state-dict tensor: its key there, our flattened parameter path, and how the two are laid out."""

    key: str
    path: str
    layout: str = SAME
    optional: bool = False  # written only when our parameters have it (logit_bias)


@dataclasses.dataclass(frozen=True)
class BlockEntries:
    """The residual blocks of one tower: block i's keys are f"{prefix}{i}.{weight key}" per part."""

    tower: str  # "visual" | "text"
    prefix: str
    parts: tuple[tuple[str, str, str], ...]  # (part in BLOCK_PARTS, weight key, bias key), in the format's order


@dataclasses.dataclass(frozen=True)
class StateDictLayout:
    """A format's whole key table, in the order its state dicts list the keys (errors name the first misfit)."""

    name: str
    entries: tuple[TensorEntry | BlockEntries, ...]

    def tensor(self, path: str) -> TensorEntry | None:
        """The entry of our parameter `path`, None when the format has no place for it."""
        return next((e for e in self.entries if isinstance(e, TensorEntry) and e.path == path), None)

    def blocks(self, tower: str) -> BlockEntries:
        return next(e for e in self.entries if isinstance(e, BlockEntries) and e.tower == tower)


@dataclasses.dataclass(frozen=True)
class SourceHints:
    """What a source's own config says beyond the weights (None = it says nothing)."""

    quick_gelu: bool | None = None
    vision_heads: int | None = None
    text_heads: int | None = None


def _tower(config: CLIPConfig, tower: str) -> VisionConfig | TextConfig:
    return config.vision if tower == "visual" else config.text


def _get_path(tree: Mapping[str, Any], path: str) -> Any:
    for name in path.split("/"):
        tree = tree[name]
    return tree


def _has_path(tree: Mapping[str, Any], path: str) -> bool:
    for name in path.split("/"):
        if not isinstance(tree, Mapping) or name not in tree:
            return False
        tree = tree[name]
    return True


def _to_torch(array: Any, layout: str) -> Any:
    if layout == TRANSPOSE:
        return array.T
    if layout == CONV:
        return array.transpose(3, 2, 0, 1)
    return array


def _from_torch(array: Any, layout: str) -> Any:
    if layout == TRANSPOSE:
        return array.T
    if layout == CONV:
        return array.transpose(2, 3, 1, 0)
    return array


def split_qkv(in_proj_weight: Any, in_proj_bias: Any) -> dict[str, TorchPair]:
    """torch's fused attention input projection ([3D, D] rows query; key; value, bias [3D]) -> three
    Linear (weight, bias) pairs."""
    width = in_proj_weight.shape[1]
    return {
        name: (in_proj_weight[index * width:(index + 1) * width], in_proj_bias[index * width:(index + 1) * width])
        for index, name in enumerate(QKV)
    }


def merge_qkv(parts: Mapping[str, TorchPair]) -> TorchPair:
    """Inverse of `split_qkv`: the query/key/value Linear pairs -> (in_proj_weight, in_proj_bias)."""
    return concat_rows([parts[name][0] for name in QKV]), concat_rows([parts[name][1] for name in QKV])


def block_to_torch(block: Mapping[str, Any]) -> dict[str, TorchPair]:
    """Our residual block -> torch-layout (weight, bias) pairs per part (ln_1, query, key, value, out, ln_2,
    c_fc, c_proj): attention kernels [D, H, D/H] become Linear weights [D, D] (heads = contiguous rows)."""
    attn, mlp = block["attn"], block["mlp"]
    width = attn["query"]["kernel"].shape[0]
    parts = {name: (block[name]["scale"], block[name]["bias"]) for name in ("ln_1", "ln_2")}
    for name in QKV:
        parts[name] = (attn[name]["kernel"].reshape(width, width).T, attn[name]["bias"].reshape(width))
    parts["out"] = (attn["out"]["kernel"].reshape(width, width).T, attn["out"]["bias"])
    for name in ("c_fc", "c_proj"):
        parts[name] = (mlp[name]["kernel"].T, mlp[name]["bias"])
    return parts


def block_from_torch(parts: Mapping[str, TorchPair], heads: int) -> Params:
    """Inverse of `block_to_torch` for `heads` attention heads."""
    out_weight, out_bias = parts["out"]
    width = out_weight.shape[0]
    head_dim = width // heads
    attn: Params = {
        name: {"kernel": parts[name][0].T.reshape(width, heads, head_dim), "bias": parts[name][1].reshape(heads, head_dim)}
        for name in QKV
    }
    attn["out"] = {"kernel": out_weight.T.reshape(heads, head_dim, width), "bias": out_bias}

    def norm(name: str) -> Params:
        return {"scale": parts[name][0], "bias": parts[name][1]}

    def dense(name: str) -> Params:
        return {"kernel": parts[name][0].T, "bias": parts[name][1]}

    return {"ln_1": norm("ln_1"), "attn": attn, "ln_2": norm("ln_2"), "mlp": {"c_fc": dense("c_fc"), "c_proj": dense("c_proj")}}


def to_layout(layout: StateDictLayout, config: CLIPConfig, params: Params) -> dict[str, Any]:
    """Our parameter tree -> the format's state-dict entries (torch layout, any dtype; pure data movement,
    so it also runs under `jax.eval_shape`). A top-level parameter the format has no place for (a SigLIP
    `logit_bias` in transformers' CLIPModel) is refused rather than dropped."""
    unplaced = sorted(key for key in params if key not in ("visual", "text") and layout.tensor(key) is None)
    if unplaced:
        raise ValueError(f"parameter {unplaced[0]!r} has no place in the {layout.name} format")
    out: dict[str, Any] = {}
    for entry in layout.entries:
        if isinstance(entry, BlockEntries):
            for index in range(_tower(config, entry.tower).layers):
                torch_parts = block_to_torch(params[entry.tower]["transformer"][f"resblocks_{index}"])
                if any(part == "qkv" for part, _, _ in entry.parts):
                    torch_parts["qkv"] = merge_qkv(torch_parts)
                prefix = f"{entry.prefix}{index}."
                for part, weight_key, bias_key in entry.parts:
                    out[prefix + weight_key], out[prefix + bias_key] = torch_parts[part]
        elif not entry.optional or _has_path(params, entry.path):
            out[entry.key] = _to_torch(_get_path(params, entry.path), entry.layout)
    return out


def from_layout(layout: StateDictLayout, config: CLIPConfig, state_dict: Mapping[str, np.ndarray]) -> Params:
    """The format's state-dict entries (already shape-checked against `config`) -> our parameter tree."""
    flat: dict[str, Any] = {}
    for entry in layout.entries:
        if isinstance(entry, BlockEntries):
            tower = _tower(config, entry.tower)
            for index in range(tower.layers):
                prefix = f"{entry.prefix}{index}."
                torch_parts = {
                    part: (state_dict[prefix + weight_key], state_dict[prefix + bias_key])
                    for part, weight_key, bias_key in entry.parts
                }
                if "qkv" in torch_parts:
                    torch_parts.update(split_qkv(*torch_parts.pop("qkv")))
                block = block_from_torch(torch_parts, tower.heads)
                flat.update({
                    f"{entry.tower}/transformer/resblocks_{index}/{path}": leaf
                    for path, leaf in flatten_params(block).items()
                })
        elif entry.key in state_dict or not entry.optional:
            flat[entry.path] = _from_torch(state_dict[entry.key], entry.layout)
    return unflatten_params(flat)


def tensor_shape(state_dict: Mapping[str, np.ndarray], key: str, ndim: int, *, source: str, hint: str = "") -> tuple[int, ...]:
    """The shape of `key`, which architecture inference needs: refused by name when missing (with the
    format's `hint`, e.g. "use --format hf") or not `ndim`-dimensional."""
    if key not in state_dict:
        raise ValueError(f"{source}: key {key!r} is missing; it is needed to infer the architecture{hint}")
    shape = tuple(state_dict[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"{source}: key {key!r} has shape {shape}, expected a {ndim}-d tensor")
    return shape


def infer_config(
    layout: StateDictLayout,
    state_dict: Mapping[str, np.ndarray],
    *,
    quick_gelu: bool,
    hints: SourceHints = SourceHints(),
    source: str = "state dict",
    hint: str = "",
) -> CLIPConfig:
    """Reads the architecture off the shapes: widths, patch, grid, layer counts, context, vocab, embed.

    Heads cannot be read off shapes: they come from `hints`, else width // 64.
    """

    def shape_of(path: str, ndim: int) -> tuple[int, ...]:
        return tensor_shape(state_dict, layout.tensor(path).key, ndim, source=source, hint=hint)

    conv_key = layout.tensor("visual/conv1/kernel").key
    vision_width, channels, patch, patch_w = shape_of("visual/conv1/kernel", 4)
    if patch != patch_w:
        raise ValueError(
            f"{source}: key {conv_key!r} has shape {(vision_width, channels, patch, patch_w)}; non-square patches are not supported"
        )
    tokens = shape_of("visual/positional_embedding", 2)[0]
    grid = int(round((tokens - 1) ** 0.5))
    if grid * grid != tokens - 1:
        posemb_key = layout.tensor("visual/positional_embedding").key
        raise ValueError(f"{source}: key {posemb_key!r} has {tokens} rows, not 1 + a square patch grid")
    vision_blocks, text_blocks = layout.blocks("visual"), layout.blocks("text")
    vision_layers = count_blocks(state_dict, vision_blocks.prefix)
    text_layers = count_blocks(state_dict, text_blocks.prefix)
    if not vision_layers or not text_layers:
        raise ValueError(
            f"{source}: no residual blocks found (keys '{vision_blocks.prefix}N.*' and '{text_blocks.prefix}N.*')"
        )

    def hidden_width(blocks: BlockEntries) -> int:  # MLP width: rows of block 0's c_fc Linear weight
        weight_key = next(weight for part, weight, _ in blocks.parts if part == "c_fc")
        return tensor_shape(state_dict, f"{blocks.prefix}0.{weight_key}", 2, source=source, hint=hint)[0]

    proj = layout.tensor("visual/proj")
    proj_shape = shape_of("visual/proj", 2)
    embed_dim = proj_shape[0] if proj.layout == TRANSPOSE else proj_shape[1]
    vocab_size, text_width = shape_of("text/token_embedding/embedding", 2)
    context_length = shape_of("text/positional_embedding", 2)[0]
    bias_entry = layout.tensor("logit_bias")
    logit_bias = state_dict.get(bias_entry.key) if bias_entry is not None else None
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(
            image_size=grid * patch, patch_size=patch, width=vision_width, layers=vision_layers,
            heads=heads_for_width(vision_width, hints.vision_heads, tower="vision"),
            mlp_ratio=hidden_width(vision_blocks) / vision_width,
        ),
        text=TextConfig(
            context_length=context_length, vocab_size=vocab_size, width=text_width,
            heads=heads_for_width(text_width, hints.text_heads, tower="text"), layers=text_layers,
            mlp_ratio=hidden_width(text_blocks) / text_width,
        ),
        quick_gelu=quick_gelu,
        init_logit_bias=None if logit_bias is None else float(np.asarray(logit_bias).reshape(())),
    )


def config_for_source(inferred: CLIPConfig, model: str | None, quick_gelu: bool) -> CLIPConfig:
    """The architecture to build: the named model's (whose shapes the source must then fit) or the inferred one."""
    if model is None:
        return inferred
    named = get_model_config(model)
    return dataclasses.replace(named, quick_gelu=quick_gelu, init_logit_bias=inferred.init_logit_bias)


def state_dict_to_params(
    layout: StateDictLayout,
    state_dict: Mapping[str, np.ndarray],
    *,
    quick_gelu: bool | None = None,
    model: str | None = None,
    hints: SourceHints = SourceHints(),
    source: str = "state dict",
    missing_key_hint: str = "",
) -> tuple[CLIPConfig, Params]:
    """The import pipeline shared by the formats, for a state dict already normalised to `layout`'s keys
    (float32): activation, architecture (inferred, or `model`'s, which also fixes the heads), a check of
    every key and shape (refusing, by the first offending key with both shapes, what does not fit), then
    the mapping to our tree."""
    activation = resolve_quick_gelu(quick_gelu, hints.quick_gelu, model, source=source)
    if model is not None:
        named = get_model_config(model)
        hints = SourceHints(activation, named.vision.heads, named.text.heads)
    inferred = infer_config(layout, state_dict, quick_gelu=activation, hints=hints, source=source, hint=missing_key_hint)
    config = config_for_source(inferred, model, activation)
    model_hint = f" (model {model!r})" if model else ""
    to_state_dict = functools.partial(to_layout, layout)
    check_state_dict_shapes(expected_shapes(to_state_dict, config), state_dict, source=source, hint=model_hint)
    return config, from_layout(layout, config, state_dict)


def params_to_state_dict(layout: StateDictLayout, config: CLIPConfig, params: Params) -> StateDict:
    """Our parameters -> a contiguous float32 state dict of the format (ready for safetensors / torch)."""
    entries = to_layout(layout, config, params_as_float32_numpy(params))
    return {key: contiguous(value) for key, value in entries.items()}


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


class WeightsFileError(ValueError):
    """A weights file or model folder that cannot be read; the one-line message names the file and what is
    wrong (missing, empty, truncated, damaged, not that format)."""


def one_line(error: BaseException | str, limit: int = 300) -> str:
    """An error message as one line (library messages span several), cut at `limit` characters."""
    text = " ".join(str(error).split()) or (type(error).__name__ if isinstance(error, BaseException) else "")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_json_file(path: pathlib.Path, what: str) -> Any:
    """A model folder's JSON file (`what` says which, e.g. "open_clip config"); WeightsFileError when it is
    missing, unreadable or not JSON."""
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such file (the {what} is missing)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise WeightsFileError(f"{path}: the {what} is not readable JSON ({one_line(error)})") from None


def _read_safetensors(path: pathlib.Path) -> StateDict:
    from safetensors import safe_open

    state_dict: StateDict = {}
    try:
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
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: the file is what is wrong
        empty = " (the file is empty)" if path.stat().st_size == 0 else ""
        raise WeightsFileError(f"{path}: not a readable safetensors file, truncated or damaged{empty} "
                               f"({one_line(error)})") from None
    return {key: state_dict[key] for key in keys}


def _zip_problem(path: pathlib.Path) -> str | None:
    """What is wrong with a zip-format torch file (the format torch.save writes since 1.6), or None.

    torch's own reader does not check the entries' CRC-32, so a zeroed block inside a tensor would load as
    wrong weights; every entry is read here against its CRC-32 (entries saved without one, CRC 0, are skipped).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:
                    continue  # saved with torch.serialization.config.save.compute_crc32 = False: unverifiable
                try:
                    with archive.open(info) as entry:
                        while entry.read(1 << 24):
                            pass
                except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
                    return f"damaged: archive entry {info.filename!r} does not read back ({one_line(error)})"
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        return f"damaged zip archive ({one_line(error)})"
    return None


def _torch_problem(path: pathlib.Path) -> str | None:
    """What is wrong with a .pt/.pth/.bin/.ckpt file before torch reads it, or None when nothing was found."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        return "the file is empty (0 bytes)"
    if zipfile.is_zipfile(path):
        return _zip_problem(path)
    if head.startswith(b"PK"):
        return "truncated: the zip archive's central directory is missing (an interrupted download or copy?)"
    return None  # a legacy (pickle) torch file: torch.load finds what it can


def _torch_load_error(error: BaseException) -> str:
    """The useful part of a torch.load failure (its weights_only messages are paragraphs of advice)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return one_line(f"{type(error).__name__}: {text}" if text.strip() else type(error).__name__)


def _read_torch(path: pathlib.Path) -> Any:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs PyTorch, which the torch extra installs: pip install 'geoalign-jax[torch]' "
            "(.safetensors files are read without it)"
        ) from error
    problem = _torch_problem(path)
    if problem is not None:
        raise WeightsFileError(f"{path}: {problem}")
    try:
        with warnings.catch_warnings():
            # torch warns before refusing a TorchScript archive under weights_only; the refusal is ours to word.
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - sorted into the three things that go wrong
        if isinstance(error, RuntimeError) and "TorchScript" in str(error):
            raise ValueError(
                f"{path} is a TorchScript archive (like OpenAI's original CLIP .pt files); it is not loaded "
                "because that runs code from the file. Save its state dict first, e.g. "
                "open_clip.create_model('ViT-B-32-quickgelu', pretrained=PATH) then "
                "torch.save(model.state_dict(), 'state_dict.pt')"
            ) from error
        if "Unsupported global" in str(error):
            raise ValueError(
                f"{path} holds objects that torch.load(weights_only=True) refuses (not a plain state dict): "
                f"{_torch_load_error(error)}"
            ) from error
        raise WeightsFileError(f"{path}: not a readable PyTorch checkpoint, truncated or damaged "
                               f"({_torch_load_error(error)})") from None


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
    """Reads a PyTorch state dict file (.safetensors, or .pt/.pth/.bin/.ckpt via torch weights_only);
    WeightsFileError when the file is missing or cannot be read."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such file")
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

    Used at import time to let a 77-token checkpoint read long RS descriptions before fine-tuning. Only a
    77-position model is stretched: stretching a Long-CLIP / DGTRS checkpoint (already 248) again would give
    932 positions whose first 20 were never the well-trained ones the stretch is meant to keep.
    """
    context_length = config.text.context_length
    rows = np.shape(params["text"]["positional_embedding"])[0]
    if context_length != STRETCH_FROM_CONTEXT or rows != STRETCH_FROM_CONTEXT:
        raise ValueError(
            f"cannot stretch the text context: it has {context_length} positions (position embedding rows: "
            f"{rows}); the Long-CLIP stretch applies to {STRETCH_FROM_CONTEXT}-position models only "
            "(Long-CLIP / DGTRS checkpoints are already stretched: import them without --stretch-text)"
        )
    text = params["text"]
    stretched = np.asarray(stretch_text_posemb(np.asarray(text["positional_embedding"]), keep, ratio), np.float32)
    new_config = dataclasses.replace(config, text=dataclasses.replace(config.text, context_length=stretched.shape[0]))
    new_params = {**params, "text": {**text, "positional_embedding": stretched}}
    return new_config, new_params
