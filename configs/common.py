"""The shared experiment config and the cross-section checks every config goes through.

A config is a plain `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision style) with these
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

from typing import Any

import ml_collections

from geoalign_jax import batch_contract
from geoalign_jax.data import pipeline
from geoalign_jax.losses import objective
from geoalign_jax.models import clip
from geoalign_jax.train import config as trainer_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Scene-level CLIP fine-tuning defaults; method configs start from this and change what differs."""
    del arg
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



def flat_fields(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Every leaf field as "section.field[.sub]" -> value (tuples and lists are leaves)."""
    flat: dict[str, Any] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, ml_collections.ConfigDict):
            for key in value.keys():
                visit(f"{prefix}.{key}" if prefix else str(key), value[key])
        else:
            flat[prefix] = tuple(value) if isinstance(value, list) else value

    visit("", config)
    return flat


def changed_fields(config: ml_collections.ConfigDict, base: ml_collections.ConfigDict) -> list[str]:
    """The fields of `config` that differ from `base` (a recipe's own choices against `get_config()`); a
    sub-config that is replaced as a whole (e.g. loss.long_text_schedule) is named once."""
    mine, theirs = flat_fields(config), flat_fields(base)
    changed = sorted(key for key in mine if key not in theirs or mine[key] != theirs[key])
    groups = {key.rsplit(".", 1)[0] for key in changed if key.rsplit(".", 1)[0] in _REPLACED_AS_A_WHOLE}
    return sorted(groups | {key for key in changed if key.rsplit(".", 1)[0] not in groups})


_REPLACED_AS_A_WHOLE = {"loss.long_text_schedule"}
