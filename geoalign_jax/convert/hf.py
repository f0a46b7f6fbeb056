"""Hugging Face `transformers.CLIPModel` folders <-> geoalign-jax parameters.

Key and layout rules (`CLIPModel`, src/transformers/models/clip/modeling_clip.py of
https://github.com/huggingface/transformers): separate q/k/v/out Linear layers ([out, in] weights = our
kernels reshaped and transposed), conv OIHW, and the two projections as bias-free Linears, so
`visual_projection.weight` = our `visual/proj`.T and `text_projection.weight` = our `text/text_projection`.T.

Export writes `config.json` (through `transformers.CLIPConfig`), `model.safetensors` (float32, written
with safetensors.numpy), the tokenizer files (built offline from the bundled BPE vocabulary) and the
processor files, so that `CLIPModel.from_pretrained(dir)` and `CLIPProcessor.from_pretrained(dir)` load
offline. Exporting needs `pip install transformers` (imported lazily); importing reads config.json as
JSON and needs neither transformers nor torch for `model.safetensors`.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any, Mapping

import numpy as np

from geoalign_jax.convert.layout import CONV, TRANSPOSE
from geoalign_jax.convert.infer_config import state_dict_to_params
from geoalign_jax.convert.layout import BlockEntries, SourceHints, StateDict, StateDictLayout, TensorEntry, params_to_state_dict, to_layout
from geoalign_jax.convert.weight_files import WeightsFileError, as_float32, read_json_file, read_state_dict
from geoalign_jax.batch_contract import OPENAI_MEAN, OPENAI_STD
from geoalign_jax.models.clip import CLIPConfig, Params
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
# Key table (order = CLIPModel's state_dict order)


def _layers(tower: str, prefix: str) -> BlockEntries:
    return BlockEntries(tower, prefix, (
        ("query", "self_attn.q_proj.weight", "self_attn.q_proj.bias"),
        ("key", "self_attn.k_proj.weight", "self_attn.k_proj.bias"),
        ("value", "self_attn.v_proj.weight", "self_attn.v_proj.bias"),
        ("out", "self_attn.out_proj.weight", "self_attn.out_proj.bias"),
        ("ln_1", "layer_norm1.weight", "layer_norm1.bias"),
        ("c_fc", "mlp.fc1.weight", "mlp.fc1.bias"),
        ("c_proj", "mlp.fc2.weight", "mlp.fc2.bias"),
        ("ln_2", "layer_norm2.weight", "layer_norm2.bias"),
    ))


HF_LAYOUT = StateDictLayout("transformers CLIPModel", (
    TensorEntry("vision_model.embeddings.patch_embedding.weight", "visual/conv1/kernel", CONV),
    TensorEntry("vision_model.embeddings.class_embedding", "visual/class_embedding"),
    TensorEntry("vision_model.embeddings.position_embedding.weight", "visual/positional_embedding"),
    TensorEntry("vision_model.pre_layrnorm.weight", "visual/ln_pre/scale"),  # sic: transformers' spelling
    TensorEntry("vision_model.pre_layrnorm.bias", "visual/ln_pre/bias"),
    _layers("visual", "vision_model.encoder.layers."),
    TensorEntry("vision_model.post_layernorm.weight", "visual/ln_post/scale"),
    TensorEntry("vision_model.post_layernorm.bias", "visual/ln_post/bias"),
    TensorEntry("visual_projection.weight", "visual/proj", TRANSPOSE),  # a bias-free Linear [embed, width]
    TensorEntry("text_model.embeddings.token_embedding.weight", "text/token_embedding/embedding"),
    TensorEntry("text_model.embeddings.position_embedding.weight", "text/positional_embedding"),
    _layers("text", "text_model.encoder.layers."),
    TensorEntry("text_model.final_layer_norm.weight", "text/ln_final/scale"),
    TensorEntry("text_model.final_layer_norm.bias", "text/ln_final/bias"),
    TensorEntry("text_projection.weight", "text/text_projection", TRANSPOSE),
    TensorEntry("logit_scale", "logit_scale"),
))


def to_hf_layout(config: CLIPConfig, params: Params) -> dict[str, Any]:
    """Our parameter tree -> `CLIPModel` state-dict entries (torch layout, any dtype); a SigLIP
    `logit_bias` is refused (CLIPModel has no place for it)."""
    return to_layout(HF_LAYOUT, config, params)


def params_to_hf(config: CLIPConfig, params: Params) -> StateDict:
    """Our parameters -> a contiguous float32 `CLIPModel` state dict."""
    return params_to_state_dict(HF_LAYOUT, config, params)


# ----------------------------------------------------------------------------------------------------
# Import


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
    missing_key_hint = " (this looks like an open_clip state dict: use --format open_clip)" if "visual.conv1.weight" in state_dict else ""
    return state_dict_to_params(
        HF_LAYOUT, state_dict, quick_gelu=quick_gelu, model=model, hints=hints, source=source,
        missing_key_hint=missing_key_hint,
    )


def read_hf_weights(folder: pathlib.Path) -> tuple[StateDict, str]:
    """The weights of a HF folder: model.safetensors, a sharded index, or pytorch_model.bin (torch).
    WeightsFileError names the file when one is missing (also a shard the index lists) or unreadable."""
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return read_state_dict(single), str(single)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = read_json_file(index_path, "sharded weights index")
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise WeightsFileError(f"{index_path}: no 'weight_map' of tensor names to shard files")
            shards = sorted(set(weight_map.values()))
            missing = [shard for shard in shards if not (folder / shard).is_file()]
            if missing:
                raise WeightsFileError(f"{folder / missing[0]}: no such file (listed in {index_name}; "
                                       f"{len(missing)} of {len(shards)} shards missing)")
            state_dict: StateDict = {}
            for shard in shards:
                state_dict.update(read_state_dict(folder / shard))
            return state_dict, str(index_path)
    legacy = folder / "pytorch_model.bin"
    if legacy.is_file():
        return read_state_dict(legacy), str(legacy)
    raise WeightsFileError(f"{folder / WEIGHTS_FILE}: no such file (nor a sharded index or pytorch_model.bin "
                           f"in {folder})")


def load_hf(
    src: str | pathlib.Path, *, quick_gelu: bool | None = None, model: str | None = None
) -> tuple[CLIPConfig, Params]:
    """Imports a Hugging Face CLIPModel folder (config.json + weights); activation from `hidden_act`."""
    folder = pathlib.Path(src)
    config_path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise WeightsFileError(f"{folder}: not a folder (a Hugging Face model folder holds {CONFIG_FILE} and "
                               f"{WEIGHTS_FILE})")
    meta = read_json_file(config_path, "Hugging Face model config")
    if not isinstance(meta, dict):
        raise WeightsFileError(f"{config_path}: not a JSON object")
    hints = hints_from_hf_config(meta, source=str(config_path))
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
    from geoalign_jax.convert.weight_files import save_safetensors
    from geoalign_jax.tokenizer import write_hf_tokenizer_files

    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dict = params_to_hf(config, params)
    hf_config = transformers.CLIPConfig(architectures=["CLIPModel"], dtype="float32", **hf_config_dict(config))
    hf_config.save_pretrained(out_dir)
    save_safetensors(state_dict, out_dir / WEIGHTS_FILE, metadata={"format": "pt"})
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
