"""DGTRS-CLIP (LRSCLIP): short and long texts at context 248 with a short-to-long curriculum.

Paper: "LRSCLIP: A Vision-Language Foundation Model for Aligning Remote Sensing Image with Longer Text"
(v2: "DGTRSD & DGTRS-CLIP"), arXiv 2503.19311 (https://arxiv.org/abs/2503.19311); model code
https://github.com/MitsuiChen14/DGTRS (a Long-CLIP fork; no training or evaluation code is released).
Target: the paper's retrieval tables on RSITMD and RSICD (standard protocol; mean recall +0.92 and +1.28 over
GeoRSCLIP) and its zero-shot classification average (75.75%); in FarSLIP's README tables the ViT-B/16 model
appears as "LRSCLIP" (zero-shot mean 58.42 over FarSLIP's 8 datasets).

The text tower has 248 positions: an OpenAI 77-position checkpoint is Long-CLIP-stretched when loaded
(knowledge-preserved stretching, keeps the first 20 positions). Start from OpenAI ViT-B/16 converted once:
`python -m geoalign_jax.convert import --src open_clip_model.safetensors --format open_clip --quick-gelu
--out ckpt/openai-vit-b-16` (the file of open_clip's OpenAI weights on the Hugging Face hub,
timm/vit_base_patch16_clip_224.openai).
The loss is a(t) * ITC(image, long text) + (1 - a(t)) * ITC(image, short text), image features shared by both
(the model code's forward); a(t) rises linearly from 0.2 to 0.8 over the first 5000 steps: the paper names the
curriculum ("dual-granularity curriculum learning") but not its schedule, so the schedule is inferred.
Differences: Long-CLIP freezes the stretched positional embedding and trains a residual copy (positions >= 20);
here the one stretched embedding is trained.
"""
from __future__ import annotations

import ml_collections

from geoalign_jax.train import experiment


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = experiment.get_config(arg)
    config.model.name = "ViT-B-16-quickgelu"
    config.model.overrides.text_context_length = 248
    config.data.train_shards = "data/dgtrsd"
    config.data.long_context_length = 248
    config.data.batch_size = 1024
    config.loss.weights.long_text = 1.0
    config.loss.long_text_schedule = ml_collections.ConfigDict(
        {"kind": "linear", "start_step": 0, "end_step": 5000, "start_weight": 0.2, "end_weight": 0.8}
    )
    config.optim.learning_rate = 1e-6
    config.optim.weight_decay = 0.01
    config.optim.warmup_steps = 200
    config.train.num_steps = 10_000
    config.init.kind = "params"
    config.init.path = "ckpt/openai-vit-b-16"
    return config


def get_sources(arg: str | None = None) -> dict[str, tuple[str, str]]:
    """Where each value this recipe sets comes from: ("code" | "paper" | "inferred", detail)."""
    del arg
    return {
        "model.name": ("code", "DGTRS-CLIP-ViT-B-16 checkpoint: OpenAI layout, QuickGELU"),
        "model.overrides.text_context_length": ("code", "model_longclip.py: context_length 248"),
        "data.long_context_length": ("code", "tokenize(context_length=248, truncate=True)"),
        "loss.weights.long_text": ("code", "forward() returns the long-text and short-text ITC losses"),
        "loss.long_text_schedule": ("inferred", "curriculum named in the paper, schedule not published"),
        "init.kind": ("code", "Long-CLIP load_from_clip: stretched OpenAI CLIP"),
        "init.path": ("inferred", "where the import command above writes OpenAI ViT-B/16"),
        "data.train_shards": ("inferred", "the DGTRSD/LRS2M corpus converted with `prepare jsonl` (short + long captions)"),
        "data.batch_size": ("inferred", "Long-CLIP's train.py: 128 per GPU on 8 GPUs"),
        "optim.learning_rate": ("inferred", "Long-CLIP's train.py default --lr 1e-6 (DGTRS forks Long-CLIP)"),
        "optim.weight_decay": ("inferred", "Long-CLIP's train.py default --weight_decay 1e-2"),
        "optim.warmup_steps": ("inferred", "Long-CLIP's train.py default --warmup_length 200"),
        "train.num_steps": ("inferred", "about 5 epochs of a 2M-pair corpus at batch 1024"),
    }
