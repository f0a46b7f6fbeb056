"""open_clip (OpenAI-style `CLIP` class) state dicts <-> geoalign-jax parameters.

Layout rules (open_clip's `CLIP`, src/open_clip/model.py of https://github.com/mlfoundations/open_clip):
- conv1: torch OIHW <-> our HWIO; Dense kernels are torch Linear weights transposed;
- attention: torch's fused `in_proj_weight` [3D, D] (rows q; k; v) <-> our separate query/key/value
  kernels [D, H, D/H] (heads are contiguous D/H-row chunks); `out_proj.weight` <-> out kernel [H, D/H, D];
- `visual.proj` and `text_projection` are raw [in, out] matrices in both (no transpose);
- LayerNorm weight <-> scale; `logit_scale` is the log-space scalar in both.
Every mapping is pure data movement, so JAX -> open_clip -> JAX is bit-exact.

Import accepts what RS-CLIP projects publish: a bare state dict or {"state_dict": ...}, `module.` prefixes,
fp16/bf16 tensors (widened to float32), OpenAI's `input_resolution` / `context_length` / `vocab_size`
entries (checked against the inferred architecture, then dropped), and Long-CLIP's
`positional_embedding_res` (merged: pe_eff = cat(pe[:keep], pe_res[keep:]), keep = 20 or as its masks say).
The architecture is inferred from the shapes; heads are width // 64 unless a model name or the folder's
`open_clip_config.json` says otherwise.
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Mapping

import numpy as np

from geoalign_jax.convert.layout import CONV
from geoalign_jax.convert.infer_config import state_dict_to_params
from geoalign_jax.convert.layout import BlockEntries, SourceHints, StateDict, StateDictLayout, TensorEntry, params_to_state_dict, to_layout
from geoalign_jax.convert.weight_files import WeightsFileError, as_float32, read_json_file, read_state_dict
from geoalign_jax.batch_contract import OPENAI_MEAN, OPENAI_STD
from geoalign_jax.models.clip import CLIPConfig, Params
from geoalign_jax.models.posemb import LONG_CLIP_KEEP

log = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
# open_clip's own preference when it looks for weights in a folder (factory._find_checkpoint_in_dir).
WEIGHTS_PREFERENCE = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth", "model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
)
# Entries of OpenAI's original checkpoints that are not weights: name -> how to read it off our config.
OPENAI_EXTRA_KEYS = {
    "input_resolution": lambda config: config.vision.image_size,
    "context_length": lambda config: config.text.context_length,
    "vocab_size": lambda config: config.text.vocab_size,
}
# open_clip model_cfg options that change the computation; a folder that sets any of them to another value
# describes a model these towers do not implement, and is refused.
_UNSUPPORTED_VISION_OPTIONS = {
    "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False, "pos_embed_type": "learnable",
    "final_ln_after_pool": False, "pool_type": "tok", "act_kwargs": None, "norm_kwargs": None, "qk_norm": False,
    "scaled_cosine_attn": False, "scale_heads": False, "scale_attn_inner": False, "scale_attn": False,
    "scale_fc": False, "timm_model_name": None,
}
_UNSUPPORTED_TEXT_OPTIONS = {
    "hf_model_name": None, "ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
    "final_ln_after_pool": False, "pool_type": "argmax", "proj_bias": False, "proj_type": "linear",
    "act_kwargs": None, "norm_kwargs": None, "qk_norm": False, "scaled_cosine_attn": False,
    "scale_heads": False, "scale_attn_inner": False, "scale_attn": False, "scale_fc": False,
}


# ----------------------------------------------------------------------------------------------------
# Key table (order = open_clip's state_dict order)


def _blocks(tower: str, prefix: str) -> BlockEntries:
    return BlockEntries(tower, prefix, (
        ("ln_1", "ln_1.weight", "ln_1.bias"),
        ("qkv", "attn.in_proj_weight", "attn.in_proj_bias"),  # fused: rows query; key; value
        ("out", "attn.out_proj.weight", "attn.out_proj.bias"),
        ("ln_2", "ln_2.weight", "ln_2.bias"),
        ("c_fc", "mlp.c_fc.weight", "mlp.c_fc.bias"),
        ("c_proj", "mlp.c_proj.weight", "mlp.c_proj.bias"),
    ))


OPEN_CLIP_LAYOUT = StateDictLayout("open_clip", (
    TensorEntry("visual.conv1.weight", "visual/conv1/kernel", CONV),
    TensorEntry("visual.class_embedding", "visual/class_embedding"),
    TensorEntry("visual.positional_embedding", "visual/positional_embedding"),
    TensorEntry("visual.ln_pre.weight", "visual/ln_pre/scale"),
    TensorEntry("visual.ln_pre.bias", "visual/ln_pre/bias"),
    _blocks("visual", "visual.transformer.resblocks."),
    TensorEntry("visual.ln_post.weight", "visual/ln_post/scale"),
    TensorEntry("visual.ln_post.bias", "visual/ln_post/bias"),
    TensorEntry("visual.proj", "visual/proj"),  # raw [width, embed] in both
    TensorEntry("token_embedding.weight", "text/token_embedding/embedding"),
    TensorEntry("positional_embedding", "text/positional_embedding"),
    _blocks("text", "transformer.resblocks."),
    TensorEntry("ln_final.weight", "text/ln_final/scale"),
    TensorEntry("ln_final.bias", "text/ln_final/bias"),
    TensorEntry("text_projection", "text/text_projection"),  # raw [width, embed] in both
    TensorEntry("logit_scale", "logit_scale"),
    TensorEntry("logit_bias", "logit_bias", optional=True),  # SigLIP-style bias, when the model has one
))


def to_open_clip_layout(config: CLIPConfig, params: Params) -> dict[str, Any]:
    """Our parameter tree -> open_clip state-dict entries (views/arrays in torch layout, any dtype)."""
    return to_layout(OPEN_CLIP_LAYOUT, config, params)


def params_to_open_clip(config: CLIPConfig, params: Params) -> StateDict:
    """Our parameters -> a contiguous float32 open_clip state dict (ready for safetensors / torch)."""
    return params_to_state_dict(OPEN_CLIP_LAYOUT, config, params)


# ----------------------------------------------------------------------------------------------------
# Import: normalise the published variants, infer the architecture, check every shape


def merge_long_clip_posemb(state_dict: Mapping[str, np.ndarray], *, source: str) -> StateDict:
    """Long-CLIP keeps a frozen `positional_embedding` and a trained `positional_embedding_res` and uses
    pe * mask1 + pe_res * mask2 (mask1 = the first 20 rows); merge them into one embedding."""
    state_dict = dict(state_dict)
    if "positional_embedding_res" not in state_dict:
        return state_dict
    posemb = state_dict.pop("positional_embedding")
    residual = state_dict.pop("positional_embedding_res")
    if posemb.shape != residual.shape:
        raise ValueError(
            f"{source}: key 'positional_embedding_res' has shape {residual.shape}, "
            f"'positional_embedding' has {posemb.shape}; Long-CLIP needs them equal"
        )
    keep = LONG_CLIP_KEEP
    mask1, mask2 = state_dict.pop("mask1", None), state_dict.pop("mask2", None)
    if (mask1 is None) != (mask2 is None):
        raise ValueError(f"{source}: Long-CLIP masks must come as a pair, found only {'mask1' if mask2 is None else 'mask2'}")
    if mask1 is not None:
        first = np.asarray(mask1, np.float32).reshape(-1)
        keep = int(first.sum())
        step = (np.arange(first.shape[0]) < keep).astype(np.float32)
        if first.shape[0] != posemb.shape[0] or not np.array_equal(first, step) or not np.array_equal(
            np.asarray(mask2, np.float32).reshape(-1), 1.0 - step
        ):
            raise ValueError(
                f"{source}: keys 'mask1'/'mask2' (shapes {tuple(mask1.shape)}, {tuple(mask2.shape)}) are not "
                f"Long-CLIP's complementary step masks over {posemb.shape[0]} positions"
            )
    state_dict["positional_embedding"] = np.concatenate([posemb[:keep], residual[keep:]], axis=0)
    log.info("%s: merged Long-CLIP position embeddings (keep %d of %d rows)", source, keep, posemb.shape[0])
    return state_dict


def _missing_key_hint(state_dict: Mapping[str, np.ndarray]) -> str:
    """Names the format a state dict that is not open_clip's looks like."""
    if any(k.startswith(("vision_model.", "text_model.")) for k in state_dict):
        return " (this looks like a Hugging Face CLIPModel state dict: use --format hf)"
    if any(k.startswith(("visual.trunk.", "text.transformer.", "visual.layer1.")) for k in state_dict):
        return " (timm / HF-text / ResNet towers are not OpenAI-style ViT CLIP and are not supported)"
    return ""


def _check_openai_extras(config: CLIPConfig, extras: Mapping[str, np.ndarray], *, source: str) -> None:
    for key, value in extras.items():
        stored, ours = int(np.asarray(value).reshape(())), OPENAI_EXTRA_KEYS[key](config)
        if stored != ours:
            raise ValueError(f"{source}: entry {key!r} says {stored}, the weights' shapes say {ours}")


def open_clip_to_params(
    state_dict: Mapping[str, np.ndarray],
    *,
    quick_gelu: bool | None = None,
    model: str | None = None,
    hints: SourceHints = SourceHints(),
    source: str = "state dict",
) -> tuple[CLIPConfig, Params]:
    """An open_clip state dict (already unwrapped) -> (config, float32 params).

    `model` names an architecture the weights must have (e.g. "ViT-B-32"); it also fixes the heads.
    Refuses, naming the first offending key with both shapes, anything that does not fit.
    """
    state_dict = as_float32(merge_long_clip_posemb(state_dict, source=source))
    extras = {key: state_dict.pop(key) for key in list(state_dict) if key in OPENAI_EXTRA_KEYS}
    for key in ("logit_scale", "logit_bias"):  # some trainers save these scalars as [1]
        if key in state_dict and state_dict[key].shape == (1,):
            state_dict[key] = state_dict[key].reshape(())
    config, params = state_dict_to_params(
        OPEN_CLIP_LAYOUT, state_dict, quick_gelu=quick_gelu, model=model, hints=hints, source=source,
        missing_key_hint=_missing_key_hint(state_dict),
    )
    _check_openai_extras(config, extras, source=source)
    return config, params


def read_open_clip_folder_config(folder: pathlib.Path) -> tuple[SourceHints, pathlib.Path]:
    """An open_clip `local-dir:` / HF-hub folder -> (what its config says, the weights file open_clip would load)."""
    config_path = folder / CONFIG_FILE
    meta = read_json_file(config_path, "open_clip model config")
    if not isinstance(meta, dict):
        raise WeightsFileError(f"{config_path}: not a JSON object")
    model_cfg = meta.get("model_cfg", meta)
    vision_cfg, text_cfg = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    for section, options, cfg in (("vision_cfg", _UNSUPPORTED_VISION_OPTIONS, vision_cfg), ("text_cfg", _UNSUPPORTED_TEXT_OPTIONS, text_cfg)):
        for option, default in options.items():
            if cfg.get(option, default) != default:
                raise ValueError(
                    f"{config_path}: {section}.{option} = {cfg[option]!r} is not supported by these towers "
                    f"(only OpenAI-style ViT CLIP; expected {default!r})"
                )
    if isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise ValueError(f"{config_path}: vision_cfg.layers = {vision_cfg['layers']} describes a ResNet, not supported")
    vision_heads = None
    if "width" in vision_cfg:
        vision_heads = int(vision_cfg["width"]) // int(vision_cfg.get("head_width", 64))
    hints = SourceHints(
        quick_gelu=bool(model_cfg.get("quick_gelu", False)),
        vision_heads=vision_heads,
        text_heads=int(text_cfg["heads"]) if "heads" in text_cfg else None,
    )
    for name in WEIGHTS_PREFERENCE:
        if (folder / name).is_file():
            return hints, folder / name
    raise WeightsFileError(f"{folder}: no weights file (looked for {', '.join(WEIGHTS_PREFERENCE)})")


def load_open_clip(
    src: str | pathlib.Path, *, quick_gelu: bool | None = None, model: str | None = None
) -> tuple[CLIPConfig, Params]:
    """Imports an open_clip checkpoint: a weights file (.safetensors/.pt/.bin) or an open_clip model folder."""
    src = pathlib.Path(src)
    hints = SourceHints()
    weights = src
    if src.is_dir():
        hints, weights = read_open_clip_folder_config(src)
    state_dict = read_state_dict(weights)
    return open_clip_to_params(state_dict, quick_gelu=quick_gelu, model=model, hints=hints, source=str(weights))


# ----------------------------------------------------------------------------------------------------
# Export


def open_clip_model_cfg(config: CLIPConfig) -> dict[str, Any]:
    """The `model_cfg` open_clip builds exactly our architecture from (QuickGELU flagged)."""
    vision, text = config.vision, config.text
    if vision.width % vision.heads:
        raise ValueError(f"vision width {vision.width} is not divisible by heads {vision.heads}")
    model_cfg: dict[str, Any] = {
        "embed_dim": config.embed_dim,
        "quick_gelu": config.quick_gelu,
        "vision_cfg": {
            "image_size": vision.image_size, "layers": vision.layers, "width": vision.width,
            "patch_size": vision.patch_size, "head_width": vision.width // vision.heads, "mlp_ratio": vision.mlp_ratio,
        },
        "text_cfg": {
            "context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
            "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio,
        },
    }
    if config.init_logit_bias is not None:
        model_cfg["init_logit_bias"] = config.init_logit_bias
    return model_cfg


def export_open_clip(config: CLIPConfig, params: Params, out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Writes an open_clip `local-dir:` folder: open_clip_config.json + open_clip_model.safetensors (float32).

    `open_clip.create_model_and_transforms("local-dir:" + out_dir)` loads it strictly, as it is; no torch
    is needed to write it.
    """
    from geoalign_jax.convert.weight_files import save_safetensors

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {
        "model_cfg": open_clip_model_cfg(config),
        "preprocess_cfg": {
            "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic", "resize_mode": "shortest",
        },
    }
    config_path = out_dir / CONFIG_FILE
    config_path.write_text(json.dumps(meta, indent=2))
    weights_path = out_dir / WEIGHTS_FILE
    save_safetensors(params_to_open_clip(config, params), weights_path, metadata={"format": "pt"})
    return [config_path, weights_path]
