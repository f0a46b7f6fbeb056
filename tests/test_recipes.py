"""The recipes in configs/: each names its paper, its target table and where every value it sets comes from;
each passes the experiment check and the trainer's validation at full size; and each trains two steps on a
tiny model override (tiny CLIP, 32 px, batch 4), logging exactly the loss terms it turns on."""
from __future__ import annotations

import importlib
import json
import math
import pkgutil

import pytest

import configs
import train_fixtures
from geoalign_jax.train import experiment
from geoalign_jax.losses import objective
from geoalign_jax.train import loop

# Recipes whose get_config takes an argument naming a stage; the others are built with get_config(None).
STAGES = {"farslip": ("s1", "s2")}
SOURCE_KINDS = {"code", "paper", "inferred"}


def _recipes() -> list[tuple[str, str | None]]:
    names = sorted(info.name for info in pkgutil.iter_modules(configs.__path__) if info.name != "common")
    return [(name, arg) for name in names for arg in STAGES.get(name, (None,))]


RECIPES = _recipes()


def test_the_recipes_asked_for_are_all_there():
    assert {("demo", None), ("clip_baseline", None), ("geoalignclip", None), ("farslip", "s1"), ("farslip", "s2"),
            ("dgtrs", None)} <= set(RECIPES)


@pytest.mark.parametrize("name,arg", RECIPES)
def test_every_recipe_names_its_paper_target_and_the_source_of_each_value(name, arg):
    module = importlib.import_module(f"configs.{name}")
    doc = module.__doc__ or ""
    assert "Target:" in doc, f"configs/{name}.py does not say which table its numbers target"
    if name != "demo":
        assert "arxiv.org/abs/" in doc, f"configs/{name}.py does not cite its paper"
    config = module.get_config(arg)
    sources = module.get_sources(arg)
    fields = experiment.flat_fields(config)
    for field, (kind, detail) in sources.items():
        assert kind in SOURCE_KINDS and detail, (name, field)
        assert field in fields or any(key.startswith(field + ".") for key in fields), f"{name}: no field {field}"
    unexplained = set(experiment.changed_fields(config, experiment.get_config())) - set(sources)
    assert not unexplained, f"configs/{name}.py ({arg}) sets {sorted(unexplained)} without saying where from"


def test_a_changed_value_without_a_source_is_caught():
    config = importlib.import_module("configs.dgtrs").get_config()
    config.optim.b1 = 0.8
    assert "optim.b1" in experiment.changed_fields(config, experiment.get_config())
    assert "loss.long_text_schedule" in experiment.changed_fields(config, experiment.get_config())


@pytest.mark.parametrize("name,arg", RECIPES)
def test_every_recipe_passes_the_config_check_and_the_trainer_validation(name, arg):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    loss = experiment.check_config(config)
    setup = loop.build(config)  # the trainer's validation + mesh, optimizer and abstract state (no allocation)
    assert setup.model_config == experiment.model_config(config)
    assert set(objective.enabled_terms(loss)) == set(objective.enabled_terms(setup.loss_config))


def tiny_override(config, train_shards: str):
    """The recipe on a model and data small enough for two CPU steps; its objective and data switches kept."""
    image = 32
    config.model.name = "tiny"
    if config.model.overrides.vision_image_size is not None:  # the recipe sets it (every field has a placeholder)
        config.model.overrides.vision_image_size = image
    config.data.train_shards = train_shards
    config.data.batch_size = 4
    config.data.image_size = image
    config.data.read_threads = 2
    config.data.read_buffer_size = 8
    for field in ("region_crop_size", "region_view_crop_size", "local_crop_size"):
        if config.data[field]:
            config.data[field] = 16
    config.init.kind, config.init.path = "scratch", ""
    config.train.num_steps = 2
    config.train.log_every = 1
    config.checkpoint.every_steps = 2
    config.checkpoint.async_save = False
    config.eval.tasks, config.eval.every_steps = (), 0
    return config


def test_every_recipe_trains_two_steps_on_a_tiny_model(tmp_path):
    """One process, the recipes one after another (each compiles its own step)."""
    scenes = train_fixtures.make_data(tmp_path / "data", num_train=16, image_size=32)
    for name, arg in RECIPES:
        config = tiny_override(importlib.import_module(f"configs.{name}").get_config(arg), scenes)
        terms = objective.enabled_terms(experiment.check_config(config))
        workdir = tmp_path / f"{name}-{arg}"
        result = loop.run(config, workdir, progress=False)
        assert (result.status, result.step) == ("finished", 2), name
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [0, 1, 2], name  # step 0: the data's truncation fractions
        assert any(key.startswith("data/truncated/") for key in records[0]), (name, records[0])
        records = records[1:]
        logged = {key.removesuffix("/loss") for key in records[-1] if key.endswith("/loss")}
        assert logged == set(terms), (name, arg, logged)
        for record in records:
            assert all(math.isfinite(record[f"{term}/loss"]) for term in terms), (name, record)
            assert record["nonfinite_total"] == 0 and record["decode_errors"] == 0, (name, record)
