"""FarSLIP (arXiv 2511.14901), two stages chosen by `arg`: "s1" (default) or "s2".

s1: global ITC + patch-to-patch distillation (w_d 0.1, 4 local crops of scale 0.3-0.7, "active" teacher,
SegEarth dense features, global view squashed without crop). s2: global ITC + CLS region-category
alignment with the multi-positive loss (up to 4 boxes, crops squashed to the input size). Defaults from
https://github.com/NJU-LHRS/FarSLIP (open_clip_train/params.py, config.py). Under data parallelism FarSLIP's
DDP gives the ITC 1/W of its gradient; here every term gets its true gradient, so set weights.scene to
reproduce their dynamics.
"""
from __future__ import annotations

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    stage = arg or "s1"
    if stage not in ("s1", "s2"):
        raise ValueError(f"farslip config: stage must be 's1' or 's2', got {stage!r}")
    config = common.get_config()
    config.model.name = "ViT-B-16-quickgelu"
    config.data.random_resized_crop = False
    config.data.hflip_prob = 0.0
    config.loss.dense_features = "segearth"
    if stage == "s1":
        config.data.num_local_crops = 4
        config.data.local_crop_scale = (0.3, 0.7)
        config.loss.weights.patch_distill = 0.1
        config.loss.distill_teacher = "active"
    else:
        config.data.max_regions = 4
        config.data.region_crop_size = config.data.image_size
        config.loss.weights.region_cls = 1.0
    return config
