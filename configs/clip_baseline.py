"""Plain CLIP fine-tuning on RS captions (RemoteCLIP / GeoRSCLIP style): scene InfoNCE only, ViT-B/32.

Paper: the method of RemoteCLIP, "RemoteCLIP: A Vision Language Foundation Model for Remote Sensing",
arXiv 2306.11029 (https://arxiv.org/abs/2306.11029; code https://github.com/ChenDelong1999/RemoteCLIP), on top of
CLIP, arXiv 2103.00020. It is the baseline every multi-granular recipe here is compared with.
Target: RemoteCLIP's retrieval table under the standard protocol (ViT-B/32 mean recall 49.38 on RSITMD,
35.26 on RSICD; `retrieval:NAME=...,split=test,protocol=standard`). RemoteCLIP trains on its RET-3 + DET-10 +
SEG-4 mixture (165,745 images); with another corpus expect other numbers.

Start from OpenAI ViT-B/32 (QuickGELU) converted once:
`python -m geoalign_jax.convert import --src open_clip_model.safetensors --format open_clip --quick-gelu
--out ckpt/openai-vit-b-32` (the file of open_clip's OpenAI weights on the Hugging Face hub,
timm/vit_base_patch32_clip_224.openai)
(or any published RS-CLIP .pt, e.g. RemoteCLIP-ViT-B-32.pt, to continue from it).
RemoteCLIP's training hyperparameters are not in its public code: the optimizer values below are CLIP's
(b2 0.98, eps 1e-6, weight decay 0.2) and the rest are inferred for fine-tuning.
"""
from __future__ import annotations

import ml_collections

from geoalign_jax.train import experiment


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = experiment.get_config(arg)
    config.model.name = "ViT-B-32-quickgelu"
    config.data.train_shards = "data/rsicd"
    config.data.batch_size = 256
    config.optim.learning_rate = 1e-5
    config.optim.warmup_steps = 500
    config.train.num_steps = 5000
    config.init.kind = "params"
    config.init.path = "ckpt/openai-vit-b-32"
    return config


def get_sources(arg: str | None = None) -> dict[str, tuple[str, str]]:
    """Where each value this recipe sets comes from: ("code" | "paper" | "inferred", detail)."""
    del arg
    return {
        "model.name": ("code", "RemoteCLIP ViT-B-32 is OpenAI-initialised (pretrained='openai' => QuickGELU)"),
        "init.kind": ("code", "RemoteCLIP starts from OpenAI CLIP"),
        "init.path": ("inferred", "where the import command above writes OpenAI ViT-B/32"),
        "optim.b2": ("paper", "CLIP (arXiv 2103.00020): AdamW b2 0.98, eps 1e-6 (the common default)"),
        "optim.weight_decay": ("paper", "CLIP: decoupled weight decay 0.2 (the common default)"),
        "data.train_shards": ("inferred", "any converted caption corpus; RSICD as the README's example"),
        "data.batch_size": ("inferred", "a batch that fits one accelerator host at 224 px"),
        "optim.learning_rate": ("inferred", "fine-tuning rate for a pretrained CLIP"),
        "optim.warmup_steps": ("inferred", "10% of the run"),
        "train.num_steps": ("inferred", "about 10 epochs of a 100k-caption corpus at batch 256"),
    }
