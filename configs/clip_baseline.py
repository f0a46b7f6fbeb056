"""Plain CLIP fine-tuning on RS captions (RemoteCLIP / GeoRSCLIP style): scene InfoNCE only.

Start from published weights: `python -m geoalign_jax.convert import --src ViT-B-32.pt --format open_clip
--quick-gelu --out ckpt/openai-b32` and set init.kind = "params", init.path = "ckpt/openai-b32"
(or init.kind = "open_clip", init.path = "ViT-B-32.pt" to read the file directly).
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_config(arg)
    config.model.name = "ViT-B-32-quickgelu"
    return config
