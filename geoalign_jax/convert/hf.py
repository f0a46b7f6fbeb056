"""Hugging Face `transformers.CLIPModel` folders <-> geoalign-jax parameters.

Key and layout rules (/work/shared/reference/clip-weight-formats.md, sections 1b-1d): separate
q/k/v/out Linear layers ([out, in] weights = our kernels reshaped and transposed), conv OIHW, and the two
projections as bias-free Linears, so `visual_projection.weight` = our `visual/proj`.T and
`text_projection.weight` = our `text/text_projection`.T.

Export writes `config.json` (through `transformers.CLIPConfig`), `model.safetensors` (float32, written
with safetensors.numpy), the tokenizer files (built offline from the bundled BPE vocabulary) and the
processor files, so that `CLIPModel.from_pretrained(dir)` and `CLIPProcessor.from_pretrained(dir)` load
offline. Exporting needs `pip install transformers` (imported lazily); importing reads config.json as
JSON and needs neither transformers nor torch for `model.safetensors`.
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Mapping

import numpy as np

from geoalign_jax.convert.common import (
    StateDict,
    as_float32,
    check_state_dict_shapes,
    contiguous,
    count_blocks,
    expected_shapes,
    heads_for_width,
    params_as_float32_numpy,
    read_state_dict,
    resolve_quick_gelu,
)
from geoalign_jax.convert.open_clip import SourceHints, config_for_source
from geoalign_jax.models.clip import (
    OPENAI_MEAN,
    OPENAI_STD,
    CLIPConfig,
    Params,
    TextConfig,
    VisionConfig,
    get_model_config,
)
from geoalign_jax.models.layers import LAYER_NORM_EPS

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
# hidden_act values and the activation they mean ("gelu" is transformers' exact erf GELU).
HIDDEN_ACT_QUICK_GELU = {"quick_gelu": True, "gelu": False}
# Buffers that old transformers versions saved; they are not weights.
IGNORED_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# transformers' CLIP config defaults, used when an old config.json leaves a field out.
_HF_DEFAULTS = {
    "vision_config": {"num_attention_heads": 12, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "text_config": {"num_attention_heads": 8, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
}


# ----------------------------------------------------------------------------------------------------
# Layout mapping (pure; works on numpy arrays and under jax.eval_shape)


def _block_to_hf(block: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    attn = block["attn"]
    width = attn["query"]["kernel"].shape[0]
    out: dict[str, Any] = {}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        out[f"{prefix}self_attn.{theirs}.weight"] = attn[ours]["kernel"].reshape(width, width).T
        out[f"{prefix}self_attn.{theirs}.bias"] = attn[ours]["bias"].reshape(width)
    out[f"{prefix}self_attn.out_proj.weight"] = attn["out"]["kernel"].reshape(width, width).T
    out[f"{prefix}self_attn.out_proj.bias"] = attn["out"]["bias"]
    out[f"{prefix}layer_norm1.weight"] = block["ln_1"]["scale"]
    out[f"{prefix}layer_norm1.bias"] = block["ln_1"]["bias"]
    out[f"{prefix}mlp.fc1.weight"] = block["mlp"]["c_fc"]["kernel"].T
    out[f"{prefix}mlp.fc1.bias"] = block["mlp"]["c_fc"]["bias"]
    out[f"{prefix}mlp.fc2.weight"] = block["mlp"]["c_proj"]["kernel"].T
    out[f"{prefix}mlp.fc2.bias"] = block["mlp"]["c_proj"]["bias"]
    out[f"{prefix}layer_norm2.weight"] = block["ln_2"]["scale"]
    out[f"{prefix}layer_norm2.bias"] = block["ln_2"]["bias"]
    return out


def _block_from_hf(state_dict: Mapping[str, np.ndarray], prefix: str, heads: int) -> Params:
    width = state_dict[f"{prefix}self_attn.q_proj.weight"].shape[1]
    head_dim = width // heads
    attn: Params = {}
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        attn[ours] = {
            "kernel": state_dict[f"{prefix}self_attn.{theirs}.weight"].T.reshape(width, heads, head_dim),
            "bias": state_dict[f"{prefix}self_attn.{theirs}.bias"].reshape(heads, head_dim),
        }
    attn["out"] = {
        "kernel": state_dict[f"{prefix}self_attn.out_proj.weight"].T.reshape(heads, head_dim, width),
        "bias": state_dict[f"{prefix}self_attn.out_proj.bias"],
    }
    return {
        "ln_1": {"scale": state_dict[f"{prefix}layer_norm1.weight"], "bias": state_dict[f"{prefix}layer_norm1.bias"]},
        "attn": attn,
        "ln_2": {"scale": state_dict[f"{prefix}layer_norm2.weight"], "bias": state_dict[f"{prefix}layer_norm2.bias"]},
        "mlp": {
            "c_fc": {"kernel": state_dict[f"{prefix}mlp.fc1.weight"].T, "bias": state_dict[f"{prefix}mlp.fc1.bias"]},
            "c_proj": {"kernel": state_dict[f"{prefix}mlp.fc2.weight"].T, "bias": state_dict[f"{prefix}mlp.fc2.bias"]},
        },
    }


def to_hf_layout(config: CLIPConfig, params: Params) -> dict[str, Any]:
    """Our parameter tree -> `CLIPModel` state-dict entries (torch layout, any dtype)."""
    if "logit_bias" in params:
        raise ValueError("parameter 'logit_bias' (SigLIP bias) has no place in transformers' CLIPModel")
    visual, text = params["visual"], params["text"]
    out: dict[str, Any] = {
        "vision_model.embeddings.patch_embedding.weight": visual["conv1"]["kernel"].transpose(3, 2, 0, 1),
        "vision_model.embeddings.class_embedding": visual["class_embedding"],
        "vision_model.embeddings.position_embedding.weight": visual["positional_embedding"],
        "vision_model.pre_layrnorm.weight": visual["ln_pre"]["scale"],
        "vision_model.pre_layrnorm.bias": visual["ln_pre"]["bias"],
    }
    for index in range(config.vision.layers):
        out.update(_block_to_hf(visual["transformer"][f"resblocks_{index}"], f"vision_model.encoder.layers.{index}."))
    out["vision_model.post_layernorm.weight"] = visual["ln_post"]["scale"]
    out["vision_model.post_layernorm.bias"] = visual["ln_post"]["bias"]
    out["visual_projection.weight"] = visual["proj"].T
    out["text_model.embeddings.token_embedding.weight"] = text["token_embedding"]["embedding"]
    out["text_model.embeddings.position_embedding.weight"] = text["positional_embedding"]
    for index in range(config.text.layers):
        out.update(_block_to_hf(text["transformer"][f"resblocks_{index}"], f"text_model.encoder.layers.{index}."))
    out["text_model.final_layer_norm.weight"] = text["ln_final"]["scale"]
    out["text_model.final_layer_norm.bias"] = text["ln_final"]["bias"]
    out["text_projection.weight"] = text["text_projection"].T
    out["logit_scale"] = params["logit_scale"]
    return out


def from_hf_layout(config: CLIPConfig, state_dict: Mapping[str, np.ndarray]) -> Params:
    """`CLIPModel` state-dict entries (already shape-checked against `config`) -> our parameter tree."""
    visual: Params = {
        "conv1": {"kernel": state_dict["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0)},
        "class_embedding": state_dict["vision_model.embeddings.class_embedding"],
        "positional_embedding": state_dict["vision_model.embeddings.position_embedding.weight"],
        "ln_pre": {"scale": state_dict["vision_model.pre_layrnorm.weight"], "bias": state_dict["vision_model.pre_layrnorm.bias"]},
        "transformer": {
            f"resblocks_{index}": _block_from_hf(state_dict, f"vision_model.encoder.layers.{index}.", config.vision.heads)
            for index in range(config.vision.layers)
        },
        "ln_post": {
            "scale": state_dict["vision_model.post_layernorm.weight"], "bias": state_dict["vision_model.post_layernorm.bias"],
        },
        "proj": state_dict["visual_projection.weight"].T,
    }
    text: Params = {
        "token_embedding": {"embedding": state_dict["text_model.embeddings.token_embedding.weight"]},
        "positional_embedding": state_dict["text_model.embeddings.position_embedding.weight"],
        "transformer": {
            f"resblocks_{index}": _block_from_hf(state_dict, f"text_model.encoder.layers.{index}.", config.text.heads)
            for index in range(config.text.layers)
        },
        "ln_final": {
            "scale": state_dict["text_model.final_layer_norm.weight"], "bias": state_dict["text_model.final_layer_norm.bias"],
        },
        "text_projection": state_dict["text_projection.weight"].T,
    }
    return {"visual": visual, "text": text, "logit_scale": state_dict["logit_scale"]}


def params_to_hf(config: CLIPConfig, params: Params) -> StateDict:
    """Our parameters -> a contiguous float32 `CLIPModel` state dict."""
    layout = to_hf_layout(config, params_as_float32_numpy(params))
    return {key: contiguous(value) for key, value in layout.items()}


# ----------------------------------------------------------------------------------------------------
# Import


def _shape(state_dict: Mapping[str, np.ndarray], key: str, ndim: int, *, source: str) -> tuple[int, ...]:
    if key not in state_dict:
        hint = " (this looks like an open_clip state dict: use --format open_clip)" if "visual.conv1.weight" in state_dict else ""
        raise ValueError(f"{source}: key {key!r} is missing; it is needed to infer the architecture{hint}")
    shape = tuple(state_dict[key].shape)
    if len(shape) != ndim:
        raise ValueError(f"{source}: key {key!r} has shape {shape}, expected a {ndim}-d tensor")
    return shape


def hints_from_hf_config(meta: Mapping[str, Any], *, source: str) -> SourceHints:
    """Heads and activation from a CLIPModel config.json; refuses what these towers cannot compute."""
    if meta.get("model_type", "clip") != "clip":
        raise ValueError(f"{source}: model_type {meta.get('model_type')!r} is not 'clip'")
    towers = {}
    for section, defaults in _HF_DEFAULTS.items():
        sub = {**defaults, **(meta.get(section) or {})}
        act = sub["hidden_act"]
        if act not in HIDDEN_ACT_QUICK_GELU:
            raise ValueError(f"{source}: {section}.hidden_act = {act!r} is not supported (only {sorted(HIDDEN_ACT_QUICK_GELU)})")
        if not np.isclose(float(sub["layer_norm_eps"]), LAYER_NORM_EPS, rtol=1e-6, atol=0.0):
            raise ValueError(f"{source}: {section}.layer_norm_eps = {sub['layer_norm_eps']} is not {LAYER_NORM_EPS}")
        towers[section] = sub
    vision_act, text_act = towers["vision_config"]["hidden_act"], towers["text_config"]["hidden_act"]
    if vision_act != text_act:
        raise ValueError(
            f"{source}: vision_config.hidden_act {vision_act!r} differs from text_config.hidden_act {text_act!r}; "
            "these towers share one activation"
        )
    return SourceHints(
        quick_gelu=HIDDEN_ACT_QUICK_GELU[vision_act],
        vision_heads=int(towers["vision_config"]["num_attention_heads"]),
        text_heads=int(towers["text_config"]["num_attention_heads"]),
    )


def infer_hf_config(
    state_dict: Mapping[str, np.ndarray], *, quick_gelu: bool, hints: SourceHints = SourceHints(), source: str = "state dict"
) -> CLIPConfig:
    """Reads the architecture off the shapes of a `CLIPModel` state dict."""
    vision_width, _, patch, patch_w = _shape(state_dict, "vision_model.embeddings.patch_embedding.weight", 4, source=source)
    if patch != patch_w:
        raise ValueError(f"{source}: non-square patches {(patch, patch_w)} are not supported")
    tokens = _shape(state_dict, "vision_model.embeddings.position_embedding.weight", 2, source=source)[0]
    grid = int(round((tokens - 1) ** 0.5))
    if grid * grid != tokens - 1:
        raise ValueError(f"{source}: key 'vision_model.embeddings.position_embedding.weight' has {tokens} rows, not 1 + a square grid")
    vision_layers = count_blocks(state_dict, "vision_model.encoder.layers.")
    text_layers = count_blocks(state_dict, "text_model.encoder.layers.")
    if not vision_layers or not text_layers:
        raise ValueError(f"{source}: no encoder layers found (keys 'vision_model.encoder.layers.N.*', 'text_model.encoder.layers.N.*')")
    vision_hidden = _shape(state_dict, "vision_model.encoder.layers.0.mlp.fc1.weight", 2, source=source)[0]
    embed_dim = _shape(state_dict, "visual_projection.weight", 2, source=source)[0]
    vocab_size, text_width = _shape(state_dict, "text_model.embeddings.token_embedding.weight", 2, source=source)
    context_length = _shape(state_dict, "text_model.embeddings.position_embedding.weight", 2, source=source)[0]
    text_hidden = _shape(state_dict, "text_model.encoder.layers.0.mlp.fc1.weight", 2, source=source)[0]
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(
            image_size=grid * patch, patch_size=patch, width=vision_width, layers=vision_layers,
            heads=heads_for_width(vision_width, hints.vision_heads, tower="vision"), mlp_ratio=vision_hidden / vision_width,
        ),
        text=TextConfig(
            context_length=context_length, vocab_size=vocab_size, width=text_width,
            heads=heads_for_width(text_width, hints.text_heads, tower="text"), layers=text_layers,
            mlp_ratio=text_hidden / text_width,
        ),
        quick_gelu=quick_gelu,
    )


def hf_to_params(
    state_dict: Mapping[str, np.ndarray],
    *,
    quick_gelu: bool | None = None,
    model: str | None = None,
    hints: SourceHints = SourceHints(),
    source: str = "state dict",
) -> tuple[CLIPConfig, Params]:
    """A `CLIPModel` state dict -> (config, float32 params); refuses, naming the first offending key with
    both shapes, anything that does not fit the inferred (or named) architecture."""
    skipped = sorted(key for key in state_dict if key in IGNORED_KEYS)
    if skipped:
        log.info("%s: skipped %d non-weight buffer(s): %s", source, len(skipped), ", ".join(skipped))
    state_dict = as_float32({key: value for key, value in state_dict.items() if key not in IGNORED_KEYS})
    activation = resolve_quick_gelu(quick_gelu, hints.quick_gelu, model, source=source)
    if model is not None:
        named = get_model_config(model)
        hints = SourceHints(activation, named.vision.heads, named.text.heads)
    inferred = infer_hf_config(state_dict, quick_gelu=activation, hints=hints, source=source)
    config = config_for_source(inferred, model, activation)
    hint = f" (model {model!r})" if model else ""
    check_state_dict_shapes(expected_shapes(to_hf_layout, config), state_dict, source=source, hint=hint)
    return config, from_hf_layout(config, state_dict)


def read_hf_weights(folder: pathlib.Path) -> tuple[StateDict, str]:
    """The weights of a HF folder: model.safetensors, a sharded index, or pytorch_model.bin (torch)."""
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return read_state_dict(single), str(single)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            state_dict: StateDict = {}
            for shard in shards:
                state_dict.update(read_state_dict(folder / shard))
            return state_dict, str(index_path)
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        return read_state_dict(legacy), str(legacy)
    raise FileNotFoundError(f"{folder}: no {WEIGHTS_FILE}, sharded index or pytorch_model.bin")


def load_hf(
    src: str | pathlib.Path, *, quick_gelu: bool | None = None, model: str | None = None
) -> tuple[CLIPConfig, Params]:
    """Imports a Hugging Face CLIPModel folder (config.json + weights); activation from `hidden_act`."""
    folder = pathlib.Path(src)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {folder} is not a Hugging Face model folder")
    hints = hints_from_hf_config(json.loads(config_path.read_text()), source=str(config_path))
    state_dict, source = read_hf_weights(folder)
    return hf_to_params(state_dict, quick_gelu=quick_gelu, model=model, hints=hints, source=source)


# ----------------------------------------------------------------------------------------------------
# Export


def hf_config_dict(config: CLIPConfig) -> dict[str, Any]:
    """The CLIPConfig fields (as plain data) that describe exactly our architecture."""
    act = "quick_gelu" if config.quick_gelu else "gelu"
    vision, text = config.vision, config.text
    return {
        "projection_dim": config.embed_dim,
        "text_config": {
            "vocab_size": text.vocab_size, "hidden_size": text.width, "intermediate_size": int(text.width * text.mlp_ratio),
            "num_attention_heads": text.heads, "num_hidden_layers": text.layers,
            "max_position_embeddings": text.context_length, "hidden_act": act, "layer_norm_eps": LAYER_NORM_EPS,
            "projection_dim": config.embed_dim, "bos_token_id": SOT_TOKEN_ID, "eos_token_id": EOT_TOKEN_ID,
            "pad_token_id": EOT_TOKEN_ID,
        },
        "vision_config": {
            "hidden_size": vision.width, "intermediate_size": int(vision.width * vision.mlp_ratio),
            "num_attention_heads": vision.heads, "num_hidden_layers": vision.layers, "num_channels": 3,
            "image_size": vision.image_size, "patch_size": vision.patch_size, "hidden_act": act,
            "layer_norm_eps": LAYER_NORM_EPS, "projection_dim": config.embed_dim,
        },
    }


def export_hf(config: CLIPConfig, params: Params, out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """Writes a Hugging Face CLIP folder loadable offline by CLIPModel / CLIPProcessor.from_pretrained."""
    try:
        import transformers
    except ImportError as error:
        raise ImportError("exporting to the Hugging Face format needs transformers: pip install transformers") from error
    from safetensors.numpy import save_file

    from geoalign_jax.tokenizer import write_hf_tokenizer_files

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = params_to_hf(config, params)
    hf_config = transformers.CLIPConfig(architectures=["CLIPModel"], dtype="float32", **hf_config_dict(config))
    hf_config.save_pretrained(out_dir)
    save_file(state_dict, str(out_dir / WEIGHTS_FILE), metadata={"format": "pt"})
    write_hf_tokenizer_files(out_dir, context_length=config.text.context_length)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(
        out_dir, local_files_only=True, model_max_length=config.text.context_length
    )
    size = config.vision.image_size
    image_processor = transformers.CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": size}, resample=3, do_center_crop=True,
        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(OPENAI_MEAN), image_std=list(OPENAI_STD), do_convert_rgb=True,
    )
    transformers.CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return sorted(path for path in out_dir.iterdir() if path.is_file())
