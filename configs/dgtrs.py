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
DGTRS releases model code only, so the optimisation is Long-CLIP's training code (train/train.py, train.md of
https://github.com/beichenzbc/Long-CLIP), which DGTRS forks: AdamW (torch defaults b2 0.999, eps 1e-8) over
all parameters with weight decay 1e-2, no gradient clipping, lr 1e-6 with 200 warm-up steps and cosine decay,
batch 2048, 6 epochs, and the stretched positions fixed: `optim.fixed_rows` holds rows 0-19 of the text position
table at their imported (OpenAI) values while rows >= 20 train, the sum Long-CLIP's encode_text forms from
its frozen table and trainable residual (model_longclip.py:359), so checkpoints and exports hold one table.

Differences from the authors' code, and why:
- Image transform: CLIP's eval transform (resize the short side to 224 + centre crop) there; here the whole
  image squashed to 224 (`random_resized_crop=False`): the same pixels for the square RS images DGTRSD holds.
- Gradient of the gathered features: DGTRS's forward gathers without gradient (torch.distributed.all_gather,
  model_longclip.py:462-465), so on W GPUs DDP gives each term 1/W of its gradient; here every term gets its
  true all-device gradient (only the effective learning rate differs, by W, for both terms alike).
- Temperature: clamped to [0, ln 100] after each update (open_clip's rule, every recipe); Long-CLIP's train.py
  leaves it unclamped (it starts at 4.6052, ln 100 + 3e-5, so the clamp moves it by 3e-5 once).
- The short/long combination a(t) is inferred (above): the code returns the two losses, not their weights.
- DGTRSD's size (2 million pairs, README) is approximate; set `train.num_steps` from your converted count.
"""
from __future__ import annotations

import ml_collections

from geoalign_jax.train import experiment


DGTRSD_PAIRS = 2_000_000  # "2 million data points" (DGTRS README); approximate
GLOBAL_BATCH = 2048  # Long-CLIP train.md; train.py's 128 per GPU x 16 GPUs of train_slurm.sh
EPOCHS = 6  # Long-CLIP train.md
LONG_CLIP_FIXED_POSITIONS = 20  # model_longclip.py: mask1[:20] = 1


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = experiment.get_config(arg)
    config.model.name = "ViT-B-16-quickgelu"
    config.model.overrides.text_context_length = 248
    config.data.train_shards = "data/dgtrsd"
    config.data.long_context_length = 248
    config.data.batch_size = GLOBAL_BATCH
    config.data.random_resized_crop = False
    config.data.hflip_prob = 0.0
    config.loss.weights.long_text = 1.0
    config.loss.long_text_schedule = ml_collections.ConfigDict(
        {"kind": "linear", "start_step": 0, "end_step": 5000, "start_weight": 0.2, "end_weight": 0.8}
    )
    config.optim.learning_rate = 1e-6
    config.optim.weight_decay = 0.01
    config.optim.warmup_steps = 200
    config.optim.b2 = 0.999
    config.optim.eps = 1e-8
    config.optim.clip_norm = 0.0
    config.optim.no_decay = ()
    config.optim.fixed_rows = (("^text/positional_embedding$", LONG_CLIP_FIXED_POSITIONS),)
    config.train.num_steps = -(-EPOCHS * DGTRSD_PAIRS // GLOBAL_BATCH)  # 5,860
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
        "data.batch_size": ("code", "Long-CLIP's code: train/train.md:77 batch 2048 (train.py:337 128 per GPU x "
                                    "16 GPUs in train_slurm.sh)"),
        "data.random_resized_crop": ("code", "Long-CLIP's code: train/sharegpt4v.py:45 CLIP's preprocess (resize "
                                             "+ centre crop, no random crop); DGTRS model/longclip.py:37-38"),
        "data.hflip_prob": ("code", "Long-CLIP's code: CLIP's preprocess has no flip (train/sharegpt4v.py:45)"),
        "optim.learning_rate": ("code", "Long-CLIP's code: train/train.py:330 --lr 1e-6 (train.md:77)"),
        "optim.weight_decay": ("code", "Long-CLIP's code: train/train.py:331 --weight_decay 1e-2"),
        "optim.warmup_steps": ("code", "Long-CLIP's code: train/train.py:334 --warmup_length 200"),
        "optim.b2": ("code", "Long-CLIP's code: train/train.py:58 torch AdamW default betas (0.9, 0.999)"),
        "optim.eps": ("code", "Long-CLIP's code: train/train.py:58 torch AdamW default eps 1e-8"),
        "optim.clip_norm": ("code", "Long-CLIP's code: train/train.py:171-173 scaler.step without clipping"),
        "optim.no_decay": ("code", "Long-CLIP's code: train/train.py:58 AdamW(model.parameters(), weight_decay) "
                                   "decays every parameter"),
        "optim.fixed_rows": ("code", "Long-CLIP's code (DGTRS model/longclip.py:251-252, model_longclip.py:307,359): "
                                     "positions < 20 from the frozen table, >= 20 from the trainable residual"),
        "loss.label_smoothing": ("code", "DGTRS model/model_longclip.py:491-497: cross_entropy without label "
                                         "smoothing (Long-CLIP's model_longclip.py:476-482 uses 0.1)"),
        "loss.long_text_pca_components": ("code", "DGTRS model/model_longclip.py:451-452: PCA commented out, the "
                                                  "image features are reused for the short text"),
        "train.num_steps": ("code", "Long-CLIP's code: train/train.md:77 6 epochs, of DGTRSD's ~2M pairs "
                                    "(README) at batch 2048"),
    }
