"""Random CLIP parameters for parity tests (imported by the test modules; not a test module)."""
from __future__ import annotations

import jax
import numpy as np

from geoalign_jax.convert import common
from geoalign_jax.models.clip import CLIPConfig, Params
from geoalign_jax.train.checkpoint import abstract_params


def random_params(config: CLIPConfig, seed: int) -> Params:
    """Random weights everywhere (biases and LayerNorms too, so a misplaced bias cannot hide)."""
    flat = common.flatten_params(abstract_params(config))
    sizes = [int(np.prod(leaf.shape)) for leaf in flat.values()]
    # One draw for all leaves (one small XLA program), then cut into the leaves.
    noise = np.asarray(jax.random.normal(jax.random.key(seed), (sum(sizes),), np.float32)) * np.float32(0.02)
    offsets = np.cumsum([0] + sizes)
    params = common.unflatten_params({
        # LayerNorm scales around 1, everything else around 0.
        path: noise[start:stop].reshape(leaf.shape) + np.float32(1.0 if path.endswith("/scale") else 0.0)
        for (path, leaf), start, stop in zip(flat.items(), offsets[:-1], offsets[1:])
    })
    params["logit_scale"] = np.asarray(np.log(1 / 0.07), np.float32)
    return params
