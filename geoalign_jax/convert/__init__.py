"""Converters between geoalign-jax parameter checkpoints and PyTorch CLIP formats.

- `open_clip`: open_clip / OpenAI-style state dicts (import: .safetensors/.pt/.bin files or open_clip
  folders; export: an open_clip `local-dir:` folder).
- `hf`: Hugging Face `transformers.CLIPModel` folders (import and export, with tokenizer/processor files).
- `layout`: the machinery both formats run through their key tables (`StateDictLayout`): layout mapping,
  q/k/v split/merge, shape checks that name the first offending key; `weight_files`: reading state dicts
  safely; `infer_config`: architecture inference, the activation and Long-CLIP choices, the import pipeline.
- `pretrained.load_pretrained(src, "open_clip" | "hf")`: THE loader every entry point uses (convert import,
  evaluate --open-clip/--hf, the trainer's init): a missing, truncated or damaged file, or a folder missing
  a file, raises `WeightsFileError` with one line naming the file and what is wrong.
CLI: `python -m geoalign_jax.convert export|import ...` (see `__main__.py`).

CKPT, the parameters checkpoint both directions use (written by `params_checkpoint.save_params`, read by
`load_params`; the trainer's checkpoints hold the same tree):
```
CKPT/model_config.json   {"format": "geoalign-params", "version": 1, "model": CLIPConfig.to_dict()}
CKPT/params/             orbax StandardCheckpointer tree of the nested dict documented in models/clip.py
                         (visual/..., text/..., logit_scale[, logit_bias]), float32
```
Activation policy on import (QuickGELU cannot be read off weights): an explicit `quick_gelu` /
`--quick-gelu|--no-quick-gelu` wins; else the source's config (open_clip_config.json `quick_gelu`, HF
`hidden_act`); else a `-quickgelu` model name; else the import is refused with a message naming the flag.
Exports are float32; export needs no torch (safetensors.numpy); HF export needs `transformers`.
"""
from __future__ import annotations

from geoalign_jax.convert.infer_config import stretch_text_context
from geoalign_jax.convert.weight_files import WeightsFileError, read_state_dict
from geoalign_jax.convert.hf import export_hf, hf_to_params, load_hf, params_to_hf
from geoalign_jax.convert.open_clip import (
    export_open_clip,
    load_open_clip,
    open_clip_to_params,
    params_to_open_clip,
)
from geoalign_jax.convert.pretrained import load_pretrained

__all__ = [
    "WeightsFileError", "export_hf", "export_open_clip", "hf_to_params", "load_hf", "load_open_clip",
    "load_pretrained", "open_clip_to_params", "params_to_hf", "params_to_open_clip", "read_state_dict",
    "stretch_text_context",
]
