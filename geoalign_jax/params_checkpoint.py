"""Parameter checkpoints written with orbax.

Layout of a parameters checkpoint directory CKPT:
```
CKPT/model_config.json   {"format": "geoalign-params", "version": 1, "model": CLIPConfig.to_dict()}
CKPT/params/             an orbax StandardCheckpointer tree: the nested dict of `models/clip.py`
```
The architecture travels with the weights, so a checkpoint is loaded without naming its model, and a
checkpoint of another architecture is refused with the first parameter whose shape does not fit.

`load_params` / `read_model_config` also read the trainer's checkpoints (train/checkpoint.py), whose steps
hold the same tree: a trainer workdir (its latest step) or one step's folder:
```
WORKDIR/checkpoints/model_config.json    the same file as CKPT/model_config.json
WORKDIR/checkpoints/<step>/params/       the same orbax tree as CKPT/params/
```
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from geoalign_jax import checkpoint_steps
from geoalign_jax.data import filesystem
from geoalign_jax.models.clip import CLIPConfig, Params, init_params
from geoalign_jax.parallel import multihost

logger = logging.getLogger(__name__)

PARAMS_FORMAT = "geoalign-params"
PARAMS_VERSION = 1
CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"
EMA_DIR = "ema"  # a trainer step's EMA of the parameters (train.ema_decay > 0), the same tree as params/
TRAINER_CHECKPOINTS_DIR = checkpoint_steps.CHECKPOINTS_DIR


def locate(path: str | pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """(model_config.json, params tree folder) of a parameters checkpoint, a trainer workdir (latest step) or
    one step of a trainer's checkpoints; FileNotFoundError saying what was looked for otherwise."""
    path = filesystem.path(filesystem.absolute(path))  # a folder or gs://
    if (path / CONFIG_FILE).is_file():
        return path / CONFIG_FILE, path / PARAMS_DIR
    if (path / TRAINER_CHECKPOINTS_DIR).is_dir():
        steps = checkpoint_steps.finished_steps(path / TRAINER_CHECKPOINTS_DIR)
        if not steps:
            raise FileNotFoundError(f"{path} is a trainer workdir without any finished checkpoint")
        path = path / TRAINER_CHECKPOINTS_DIR / str(steps[0])
    if (path / PARAMS_DIR).is_dir() and (path.parent / CONFIG_FILE).is_file():
        return path.parent / CONFIG_FILE, path / PARAMS_DIR
    raise FileNotFoundError(
        f"{path} is not a geoalign-jax parameters checkpoint ({CONFIG_FILE} + {PARAMS_DIR}/), trainer workdir "
        f"({TRAINER_CHECKPOINTS_DIR}/) or trainer checkpoint step ({PARAMS_DIR}/ beside ../{CONFIG_FILE})"
    )


def flatten_params(tree: Any) -> dict[str, Any]:
    """Nested parameter dict -> {"visual/conv1/kernel": leaf, ...}: one path string per leaf, for messages
    that name a parameter and for comparing trees leaf by leaf."""
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def abstract_params(config: CLIPConfig) -> Params:
    """Shapes and dtypes of the parameters of `config`, without allocating them."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def check_param_shapes(expected: Params, actual: Params, *, source: str) -> None:
    """Raises ValueError naming the first missing, unexpected or wrongly shaped parameter."""
    want, got = flatten_params(expected), flatten_params(actual)
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
    """Writes `params` of architecture `config` to the directory `path` (which must not exist).

    Every process calls it (orbax writes each process's shards); only process 0 creates the folder
    and writes the config, after all processes have seen that `path` is free.
    """
    path = pathlib.Path(path).absolute()
    check_param_shapes(abstract_params(config), params, source=f"save_params({path})")
    if path.exists():
        raise FileExistsError(f"{path} exists; parameters checkpoints are never overwritten")
    multihost.sync_barrier("save_params:checked")
    if jax.process_index() == 0:
        path.mkdir(parents=True)
        (path / CONFIG_FILE).write_text(model_config_json(config))
    multihost.sync_barrier("save_params:created")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(path / PARAMS_DIR, params)
    return path


def model_config_json(config: CLIPConfig) -> str:
    """The text of model_config.json for `config`."""
    return json.dumps({"format": PARAMS_FORMAT, "version": PARAMS_VERSION, "model": config.to_dict()}, indent=2)


def read_model_config(path: str | pathlib.Path) -> CLIPConfig:
    """The architecture stored beside a parameters checkpoint (or a trainer workdir / step, see `locate`)."""
    config_path, _ = locate(path)
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:  # a cut or damaged file: name it (json's message names no file)
        raise ValueError(f"{config_path}: not a readable JSON file ({error})") from None
    if meta.get("format") != PARAMS_FORMAT or meta.get("version") != PARAMS_VERSION:
        raise ValueError(
            f"{config_path}: format {meta.get('format')!r} version {meta.get('version')!r}, "
            f"expected {PARAMS_FORMAT!r} version {PARAMS_VERSION}"
        )
    return CLIPConfig.from_dict(meta["model"])


def _step_candidates(path: pathlib.Path, step: int | None) -> list[pathlib.Path]:
    """The folders `load_params` may read, in order: a trainer workdir's steps newest first (only `step` when
    given), or the one checkpoint / step folder `path` names."""
    checkpoints = path / TRAINER_CHECKPOINTS_DIR
    if not (checkpoints.is_dir() and not (path / CONFIG_FILE).is_file()):
        if step is not None:
            raise ValueError(f"--step {step}: {path} is not a trainer workdir (a step is chosen among its "
                             f"{TRAINER_CHECKPOINTS_DIR}/)")
        return [path]
    steps = checkpoint_steps.finished_steps(checkpoints)
    if step is not None:
        if step not in steps:
            raise FileNotFoundError(f"{checkpoints} has no finished step {step} (steps: {sorted(steps) or 'none'})")
        steps = [step]
    if not steps:
        raise FileNotFoundError(f"{path} is a trainer workdir without any finished checkpoint")
    return [checkpoints / str(number) for number in steps]


def _read_params(path: pathlib.Path, config: CLIPConfig, *, ema: bool = False) -> Params:
    """The parameter tree under `path` (a checkpoint or one step; `ema`: the step's EMA weights) checked
    against its digest and `config`."""
    _, params_dir = locate(path)
    if ema:
        params_dir = params_dir.parent / EMA_DIR
        if not params_dir.is_dir():  # a ValueError: one named step is refused as such, not as "does not read back"
            raise ValueError(
                f"{path}: no EMA weights ({params_dir} is absent: only trainer checkpoints of a run with "
                "train.ema_decay > 0 have them)"
            )
    if path.parent.name == TRAINER_CHECKPOINTS_DIR:
        checkpoint_steps.verify_digest(path, under=params_dir.name)
    target = abstract_params(config)
    with ocp.StandardCheckpointer() as checkpointer:
        stored = checkpointer.metadata(params_dir)
        stored_tree = getattr(stored, "item_metadata", stored)
        stored_tree = getattr(stored_tree, "tree", stored_tree)
        check_param_shapes(target, stored_tree, source=str(path))
        return checkpointer.restore(params_dir, target)


def load_params(
    path: str | pathlib.Path, *, expected_config: CLIPConfig | None = None, step: int | None = None,
    ema: bool = False,
) -> tuple[CLIPConfig, Params]:
    """Reads a parameters checkpoint (or a trainer workdir / step, see `locate`) -> (config, numpy params);
    `load_params_and_step` says which trainer step it read as well."""
    config, params, _ = load_params_and_step(path, expected_config=expected_config, step=step, ema=ema)
    return config, params


def load_params_and_step(
    path: str | pathlib.Path, *, expected_config: CLIPConfig | None = None, step: int | None = None,
    ema: bool = False,
) -> tuple[CLIPConfig, Params, int | None]:
    """(config, numpy params, the trainer step read: None for a parameters checkpoint) of a parameters
    checkpoint (or a trainer workdir / step, see `locate`).

    `ema`: the step's EMA of the parameters instead (a trainer workdir or step trained with train.ema_decay).

    With `expected_config`, a checkpoint of another architecture is refused before reading weights;
    numerics (dtype, param_dtype, remat) are not architecture: the expected config's are returned.

    A trainer workdir is read at its newest step that reads back whole (checkpoint_steps.py), or at `step`;
    a damaged step is skipped with a one-line warning and left in place (reading changes nothing), and the
    step read is logged. Nothing readable: DamagedStepError / NoIntactStepError (ValueErrors, one line).
    """
    path = filesystem.path(filesystem.absolute(path))  # a folder or gs://
    candidates = _step_candidates(path, step)
    config = read_model_config(path)
    if expected_config is not None:
        same_numerics = dataclasses.replace(
            config, dtype=expected_config.dtype, param_dtype=expected_config.param_dtype, remat=expected_config.remat
        )
        if same_numerics != expected_config:
            check_param_shapes(abstract_params(expected_config), abstract_params(config), source=str(path))
            raise ValueError(f"{path}: model config {config} differs from the expected {expected_config}")
        config = expected_config
    if step is not None or candidates == [path]:  # one folder named: its failure is the error
        try:
            params = _read_params(candidates[0], config, ema=ema)
        except ValueError:
            raise
        except Exception as error:  # noqa: BLE001 - orbax / tensorstore: many types, many lines
            raise checkpoint_steps.DamagedStepError(
                f"{candidates[0]} does not read back: {checkpoint_steps.reason(error)}") from None
        if step is not None:
            logger.info("reading checkpoint step %d of %s", step, candidates[0].parent)
        elif path.parent.name == TRAINER_CHECKPOINTS_DIR and path.name.isdigit():  # one step's folder named
            step = int(path.name)
        return config, jax.tree.map(np.asarray, params), step
    checkpoints = candidates[0].parent
    if ema and not any((folder / EMA_DIR).is_dir() for folder in candidates):
        raise FileNotFoundError(f"{checkpoints}: the checkpoints hold no EMA weights (no step has {EMA_DIR}/: "
                                "train.ema_decay was not set for this run); read them without --ema")

    def skip(number: int, why: str) -> None:
        logger.warning(checkpoint_steps.damaged_line(checkpoints, number, why, "skipped (left in place)"))

    found = checkpoint_steps.newest_intact(
        [int(folder.name) for folder in candidates], lambda number: _read_params(checkpoints / str(number), config, ema=ema),
        on_damaged=skip,
    )
    if found is None:
        raise checkpoint_steps.NoIntactStepError(
            f"{checkpoints}: no intact checkpoint step (tried {', '.join(folder.name for folder in candidates)})")
    number, params = found
    logger.info("reading checkpoint step %d of %s", number, checkpoints)
    return config, jax.tree.map(np.asarray, params), number
