"""Parameter checkpoints written with orbax.

Layout of a parameters checkpoint directory CKPT:
```
CKPT/model_config.json   {"format": "geoalign-params", "version": 1, "model": CLIPConfig.to_dict()}
CKPT/params/             an orbax StandardCheckpointer tree: the nested dict of `models/clip.py`
```
The architecture travels with the weights, so a checkpoint is loaded without naming its model, and a
checkpoint of another architecture is refused with the first parameter whose shape does not fit.
"""
from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from geoalign_jax.models.clip import CLIPConfig, Params, init_params

PARAMS_FORMAT = "geoalign-params"
PARAMS_VERSION = 1
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def _flat(tree: Any) -> dict[str, Any]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def abstract_params(config: CLIPConfig) -> Params:
    """Shapes and dtypes of the parameters of `config`, without allocating them."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def check_param_shapes(expected: Params, actual: Params, *, source: str) -> None:
    """Raises ValueError naming the first missing, unexpected or wrongly shaped parameter."""
    want, got = _flat(expected), _flat(actual)
    for key in sorted(want):
        if key not in got:
            raise ValueError(f"{source}: parameter {key!r} is missing (expected shape {tuple(want[key].shape)})")
        if tuple(got[key].shape) != tuple(want[key].shape):
            raise ValueError(
                f"{source}: parameter {key!r} has shape {tuple(got[key].shape)}, "
                f"the model config expects {tuple(want[key].shape)}"
            )
    extra = sorted(set(got) - set(want))
    if extra:
        raise ValueError(f"{source}: unexpected parameter {extra[0]!r} (not in the model config)")


def save_params(path: str | pathlib.Path, config: CLIPConfig, params: Params) -> pathlib.Path:
    """Writes `params` of architecture `config` to the directory `path` (which must not exist)."""
    path = pathlib.Path(path).absolute()
    check_param_shapes(abstract_params(config), params, source=f"save_params({path})")
    path.mkdir(parents=True, exist_ok=False)
    (path / CONFIG_FILE).write_text(
        json.dumps({"format": PARAMS_FORMAT, "version": PARAMS_VERSION, "model": config.to_dict()}, indent=2)
    )
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIR, params)
    return path


def read_model_config(path: str | pathlib.Path) -> CLIPConfig:
    """The architecture stored beside a parameters checkpoint."""
    config_path = pathlib.Path(path) / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: {path} is not a geoalign-jax parameters checkpoint")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != PARAMS_FORMAT or meta.get("version") != PARAMS_VERSION:
        raise ValueError(
            f"{config_path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {PARAMS_FORMAT!r} version {PARAMS_VERSION}"
        )
    return CLIPConfig.from_dict(meta["model"])


def load_params(
    path: str | pathlib.Path, *, expected_config: CLIPConfig | None = None
) -> tuple[CLIPConfig, Params]:
    """Reads a parameters checkpoint -> (config, params as numpy arrays).

    With `expected_config`, a checkpoint of another architecture is refused before reading weights.
    """
    path = pathlib.Path(path).absolute()
    config = read_model_config(path)
    target = abstract_params(config)
    if expected_config is not None and expected_config != config:
        check_param_shapes(abstract_params(expected_config), target, source=str(path))
        raise ValueError(f"{path}: model config {config} differs from the expected {expected_config}")
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(path / PARAMS_DIR)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        check_param_shapes(target, stored_tree, source=str(path))
        params = checkpointer.restore(path / PARAMS_DIR, target)
    return config, jax.tree.map(np.asarray, params)
