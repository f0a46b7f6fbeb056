"""The CPU demo (`bash launch/demo.sh`): a tiny CLIP on the synthetic demo scenes with every loss term on.

No paper: the demo exercises every objective of the seed papers at once (FarSLIP's patch distillation and CLS
region-category term, DGTRS's long text, GeoAlignCLIP's hard negatives, region text and consistency terms).
Target: the before/after table in the README's "The demo" section (zero-shot land cover, retrieval of held-out
scenes under the standard and the SkyScript protocol), produced by tools/demo.py. Every value below is chosen
for a 2-core CPU (inferred, nothing comes from a paper).

`arg` is the demo data folder (default demo_out/data, what tools/make_demo_data.py and tools/demo.py write):
    python -m geoalign_jax.train --config configs/demo.py:demo_out/data --workdir runs/demo
"""
from __future__ import annotations

import ml_collections

from geoalign_jax.train import experiment

DEFAULT_DATA = "demo_out/data"
TERMS = ("hard_negative", "region_text", "region_cls", "long_text", "patch_distill", "global_region_consistency",
         "short_long_consistency")


def eval_tasks(data_dir: str) -> tuple[str, ...]:
    """The demo's evaluation: land-cover zero-shot (5 classes) and retrieval of the held-out scenes."""
    return (f"zeroshot:landcover={data_dir}/landcover",
            f"retrieval:demo={data_dir}/scenes,split=val,protocol=both")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    data_dir = (arg or DEFAULT_DATA).rstrip("/")
    config = experiment.get_config()
    config.model.name = "tiny"
    config.model.overrides.vision_image_size = 64
    config.model.overrides.text_context_length = 248
    config.data.train_shards = f"{data_dir}/scenes"
    config.data.batch_size = 32
    config.data.image_size = 64
    config.data.context_length = 32  # the demo's captions have at most 29 tokens
    config.data.long_context_length = 248
    config.data.num_hard_negatives = 3
    config.data.max_regions = 4
    config.data.region_crop_size = 32  # region_cls: whole boxes of the original image
    config.data.region_view_crop_size = 32  # global_region_consistency: the boxes as the global view shows them
    config.data.num_local_crops = 2
    config.data.local_crop_size = 32
    config.train.num_steps = 120
    config.train.log_every = 5
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 10
    config.optim.weight_decay = 0.01
    config.checkpoint.every_steps = 60
    config.eval.tasks = eval_tasks(data_dir)
    config.eval.every_steps = 20
    for term in TERMS:
        config.loss.weights[term] = 0.5
    return config


def get_sources(arg: str | None = None) -> dict[str, tuple[str, str]]:
    """Where each value this recipe sets comes from: all chosen for the CPU demo."""
    config = get_config(arg)
    base = experiment.get_config()
    return {field: ("inferred", "chosen for a 2-core CPU demo") for field in experiment.changed_fields(config, base)}
