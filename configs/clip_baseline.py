"""Plain CLIP fine-tuning on RS captions (RemoteCLIP / GeoRSCLIP style): scene InfoNCE only.

Start from published weights: `python -m geoalign_jax.convert import --src ViT-B-32.pt --format open_clip
--quick-gelu --out ckpt/openai-b32` and set model.init_from = "ckpt/openai-b32".
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_config(arg)
    config.model.name = "ViT-B-32-quickgelu"
    return config
