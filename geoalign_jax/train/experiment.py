"""The experiment schema: the base config every recipe starts from, the cross-section checks every config
goes through, and the comparison a resumed run makes against the config it was started with.

The recipes in `configs/` are data: each starts from `get_config()` here and changes what differs. A config
is a plain `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision style) with these
sections, each documented once where its defaults are defined:
- `model`: `name` (a `models.clip.get_model_config` name, e.g. "ViT-B-16-quickgelu") and `overrides`
  (every `vision_*` / `text_*` / top-level CLIPConfig field, None = the named model's value; remat is
  `train.remat`);
- `data`: `geoalign_jax.data.pipeline.default_data_config()`;
- `loss`: `geoalign_jax.losses.objective.default_loss_config()`;
- `train`, `optim`, `mesh`, `checkpoint`, `init` (where the weights of a fresh run come from), `eval`:
  `geoalign_jax.train.config`.
`check_config` validates each section and that they fit together (the data produce every batch key the
enabled loss terms read, per `geoalign_jax.batch_contract`; image and text sizes fit the model), naming the
offending field.
"""
from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Mapping

import ml_collections

from geoalign_jax import batch_contract
from geoalign_jax.data import pipeline
from geoalign_jax.losses import objective
from geoalign_jax.models import clip
from geoalign_jax.train import config as trainer_config

logger = logging.getLogger(__name__)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Scene-level CLIP fine-tuning defaults; method configs start from this and change what differs.

    A recipe without an argument of its own passes `arg` on: one given anyway (`configs/dgtrs.py:s9`) is refused
    rather than silently ignored (a recipe with choices, such as farslip's stage, parses its own and names them)."""
    if arg:
        raise ValueError(f"this recipe takes no argument after ':' (got {arg!r})")
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict()
    config.model.name = "ViT-B-16-quickgelu"
    # Every CLIPConfig field, unset (None: the named model's value) and typed, so that any of them can be set
    # from the command line (`--config.model.overrides.vision_width=128`) whether or not the recipe sets it.
    config.model.overrides = ml_collections.ConfigDict(
        {name: ml_collections.config_dict.placeholder(kind) for name, kind in clip.override_types().items()})
    config.data = pipeline.default_data_config()
    config.data.long_context_length = 0  # a 77-position text tower; long-text configs turn it on
    config.loss = objective.default_loss_config()
    trainer_config.add_trainer_sections(config)
    return config


def model_config(config: ml_collections.ConfigDict) -> clip.CLIPConfig:
    """The model a config names, with the numerics the trainer sets (remat from `train.remat`)."""
    overrides = {name: value for name, value in config.model.overrides.items() if value is not None}
    if "train" in config:
        overrides["remat"] = config.train.remat != "none"
    return clip.get_model_config(config.model.name, **overrides)


def check_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Validates a whole experiment config; returns the validated loss config. Raises ValueError."""
    known_sections = {"model", "data", "loss", *trainer_config.SECTIONS}
    unknown = sorted(set(config.keys()) - known_sections)
    if unknown:
        raise ValueError(f"unknown config section {unknown[0]!r} (known: {sorted(known_sections)})")
    unknown = sorted(set(config.model.keys()) - {"name", "overrides"})
    if unknown:
        raise ValueError(f"unknown config field model.{unknown[0]}")
    if "remat" in config.model.overrides:
        raise ValueError("model.overrides.remat: set train.remat ('none' | 'block') instead")
    trainer_config.validate_trainer_config(config)
    model = model_config(config)
    defaults = pipeline.default_data_config()
    unknown = sorted(set(config.data.keys()) - set(defaults.keys()))
    if unknown:
        raise ValueError(f"unknown config field data.{unknown[0]} (known: {sorted(defaults.keys())})")
    loss = objective.validate_loss_config(config.loss)
    spec = pipeline.batch_spec(config.data)

    for term, keys in objective.required_batch_keys(loss).items():
        for key in keys:
            if key not in spec:
                raise ValueError(
                    f"loss.weights.{term} > 0 needs batch[{key!r}], which the data config does not produce "
                    f"(turn it on in config.data: {batch_contract.BATCH_KEYS[key].produced_when})"
                )
    for field in ("image_size", "region_crop_size", "region_view_crop_size", "local_crop_size"):  # 0 = off/image_size
        size = int(config.data[field])
        if size % model.vision.patch_size:
            raise ValueError(
                f"data.{field} {size} is not a multiple of the model's patch size {model.vision.patch_size}"
            )
    for field in ("context_length", "long_context_length"):
        length = int(config.data[field])
        if length > model.text.context_length:
            raise ValueError(
                f"data.{field} {length} exceeds the text tower's context length {model.text.context_length} "
                f"(set model.overrides.text_context_length, e.g. 248 with a Long-CLIP-stretched checkpoint)"
            )
    if loss["scene_kind"] == "siglip" and model.init_logit_bias is None:
        raise ValueError("loss.scene_kind 'siglip' needs a logit bias: set model.overrides.init_logit_bias (e.g. -10.0)")
    return loss



def flat_fields(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    """Every leaf field of a config (or of its plain-dict form, e.g. a config.json) as "section.field[.sub]"
    -> value (tuples and lists are leaves, as tuples)."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, (ml_collections.ConfigDict, Mapping)):
            for key in value.keys():
                visit(f"{prefix}.{key}" if prefix else str(key), value[key])
        else:
            flat[prefix] = tuple(value) if isinstance(value, list) else value

    visit("", config)
    return flat


#: sub-configs a recipe replaces as a whole: `changed_fields` names them once, not field by field
_REPLACED_AS_A_WHOLE = {"loss.long_text_schedule"}


def changed_fields(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> list[str]:
    """The fields of `config` that differ from `base` (a recipe's own choices against `get_config()`); a
    sub-config that is replaced as a whole (e.g. loss.long_text_schedule) is named once."""
    mine, theirs = flat_fields(config), flat_fields(base)
    changed = sorted(key for key in mine if key not in theirs or mine[key] != theirs[key])
    groups = {key.rsplit(".", 1)[0] for key in changed if key.rsplit(".", 1)[0] in _REPLACED_AS_A_WHOLE}
    return sorted(groups | {key for key in changed if key.rsplit(".", 1)[0] not in groups})


# ---------------------------------------------------------------------------------------------------------
# A resumed run against the config it was started with

#: data fields that decide which examples the restored iterator position points at (worker_count: the
#: position is saved per worker): a resumed run may not change them.
DATA_ORDER_FIELDS = ("train_shards", "train_split", "batch_size", "seed", "shuffle", "num_epochs", "worker_count")


def compare_resumed_config(path: pathlib.Path, config: dict[str, Any]) -> None:
    """A resumed run logs how its config differs from the one in `path`, and refuses changes to the data
    order (DATA_ORDER_FIELDS): the restored iterator position would point into another stream. Every
    process reads and raises alike."""
    if not path.is_file():
        return
    before, after = flat_fields(json.loads(path.read_text())), flat_fields(json.loads(json.dumps(config)))
    changed = sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))
    if not changed:
        return
    shown = "; ".join(f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in changed)
    order = [key for key in changed if key in {f"data.{field}" for field in DATA_ORDER_FIELDS}]
    if order:  # only the refused fields: a changed train.num_steps beside them is allowed, not the reason
        raise ValueError(
            f"the data order changed since the checkpoints in {path.parent} were written "
            f"({'; '.join(f'{key}: {before.get(key)!r} -> {after.get(key)!r}' for key in order)}); the restored data "
            f"position would point into another stream: keep them, or use another --workdir"
        )
    logger.warning("resuming with a changed config (%s will hold the new one): %s", path, shown)
