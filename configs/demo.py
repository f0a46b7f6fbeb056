"""The CPU demo: a tiny model on the synthetic demo data (tools/make_demo_data.py) with every term on."""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = common.get_config(arg)
    config.model.name = "tiny"
    config.model.overrides.vision_image_size = 64
    config.model.overrides.text_context_length = 248
    config.data.train_shards = "demo_out/data/scenes"
    config.data.batch_size = 32
    config.data.image_size = 64
    config.data.long_context_length = 248
    config.data.num_hard_negatives = 3
    config.data.max_regions = 4
    config.data.region_crop_size = 32  # region_cls: whole boxes of the original image
    config.data.region_view_crop_size = 32  # global_region_consistency: the boxes as the global view shows them
    config.data.num_local_crops = 2
    config.data.local_crop_size = 32
    config.train.num_steps = 80
    config.train.log_every = 10
    config.optim.learning_rate = 2e-3
    config.optim.warmup_steps = 8
    config.optim.weight_decay = 0.01
    config.checkpoint.every_steps = 40
    for term in ("hard_negative", "region_text", "region_cls", "long_text", "patch_distill",
                 "global_region_consistency", "short_long_consistency"):
        config.loss.weights[term] = 0.5
    return config
