"""The architecture a PyTorch state dict implies (`infer_config`: widths, depths, heads, patch and image size,
context length, from the shapes), the choices the weights cannot tell (the activation, Long-CLIP's stretch of
the text positions), and the import pipeline that puts them together (`state_dict_to_params`).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Iterable, Mapping

import numpy as np

from geoalign_jax.convert.layout import (
    TRANSPOSE, BlockEntries, SourceHints, StateDictLayout, check_state_dict_shapes, expected_shapes, from_layout, to_layout,
)
from geoalign_jax.models.clip import CLIPConfig, Params, TextConfig, VisionConfig, get_model_config
from geoalign_jax.models.posemb import LONG_CLIP_KEEP, LONG_CLIP_RATIO, stretch_text_posemb

log = logging.getLogger(__name__)

# The text context Long-CLIP's stretch starts from (CLIP's 77 tokens).
STRETCH_FROM_CONTEXT = 77


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
