"""Converters between geoalign-jax parameter checkpoints and PyTorch CLIP formats.

- `open_clip`: open_clip / OpenAI-style state dicts (import: .safetensors/.pt/.bin files or open_clip
  folders; export: an open_clip `local-dir:` folder).
- `hf`: Hugging Face `transformers.CLIPModel` folders (import and export, with tokenizer/processor files).
- `common`: reading state dicts safely, shape checks that name the first offending key, helpers.
CLI: `python -m geoalign_jax.convert export|import ...` (see `__main__.py`).
"""
from __future__ import annotations

from geoalign_jax.convert.common import read_state_dict, stretch_text_context
from geoalign_jax.convert.hf import export_hf, hf_to_params, load_hf, params_to_hf
from geoalign_jax.convert.open_clip import (
    export_open_clip,
    load_open_clip,
    open_clip_to_params,
    params_to_open_clip,
)

__all__ = [
    "export_hf", "export_open_clip", "hf_to_params", "load_hf", "load_open_clip", "open_clip_to_params",
    "params_to_hf", "params_to_open_clip", "read_state_dict", "stretch_text_context",
]
