"""The parameter layout tables of the PyTorch formats: how a format names and lays out our parameters
(`StateDictLayout`), the mapping both ways (`to_layout`, `from_layout`, QKV split/merge), and the shape checks
of a state dict against a config. A format module (open_clip.py, hf.py) holds only its key table and what is
specific to its files (metadata, published variants); reading the files is `weight_files.py`, the
architecture a state dict implies is `infer_config.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from geoalign_jax.models.clip import CLIPConfig, Params, TextConfig, VisionConfig
# flatten_params is re-exported for the converters and their tests: its one definition is in params_checkpoint.py.
from geoalign_jax.params_checkpoint import abstract_params, flatten_params  # noqa: F401

StateDict = dict[str, np.ndarray]


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


def params_to_state_dict(layout: StateDictLayout, config: CLIPConfig, params: Params) -> StateDict:
    """Our parameters -> a contiguous float32 state dict of the format (ready for safetensors / torch)."""
    entries = to_layout(layout, config, params_as_float32_numpy(params))
    return {key: contiguous(value) for key, value in entries.items()}
