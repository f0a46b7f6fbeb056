"""The batch contract (geoalign_jax/batch_contract.py): every shipped config's data produce every key its enabled
loss terms read, each term reads exactly the keys it declares, and the pipeline names only contract keys."""
from __future__ import annotations

import importlib
import pkgutil
import re

import jax
import numpy as np
import pytest

import configs
from array_fixtures import ElementwiseTowers
from geoalign_jax import batch_contract
from geoalign_jax.data import pipeline
from geoalign_jax.losses import objective as objective_module

# Configs whose get_config takes a stage argument; every other module is built with get_config(None).
CONFIG_ARGS = {"farslip": ("s1", "s2")}


def _shipped_configs() -> list[tuple[str, str | None]]:
    names = [info.name for info in pkgutil.iter_modules(configs.__path__) if info.name != "common"]
    return [(name, arg) for name in sorted(names) for arg in CONFIG_ARGS.get(name, (None,))]


SHIPPED = _shipped_configs()


def test_the_config_list_is_discovered_not_hand_kept():
    assert {name for name, _ in SHIPPED} >= {"clip_baseline", "demo", "dgtrs", "farslip", "geoalignclip"}
    assert ("farslip", "s2") in SHIPPED


@pytest.mark.parametrize("name,arg", SHIPPED)
def test_every_key_an_enabled_term_reads_is_produced_for_that_config(name, arg):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    loss = objective_module.validate_loss_config(config.loss)
    produced = pipeline.batch_spec(config.data)
    required = objective_module.required_batch_keys(loss)
    assert required, name  # at least one term on
    for term, keys in required.items():
        missing = [key for key in keys if key not in produced]
        assert not missing, f"configs.{name}({arg}): loss term {term} reads {missing}, which its data config does not produce"


def test_the_shipped_configs_exercise_every_term():
    """So the test above checks every term's keys against a real data config."""
    enabled = set()
    for name, arg in SHIPPED:
        loss = objective_module.validate_loss_config(importlib.import_module(f"configs.{name}").get_config(arg).loss)
        enabled.update(objective_module.enabled_terms(loss))
    assert enabled == set(objective_module.TERM_NAMES)


def test_the_contract_names_every_term_and_only_known_keys():
    assert set(batch_contract.TERM_BATCH_KEYS) == set(objective_module.TERM_NAMES)
    read = {key for keys in batch_contract.TERM_BATCH_KEYS.values() for key in keys}
    read |= {key for keys in batch_contract.OPTION_BATCH_KEYS.values() for key in keys}
    assert read <= set(batch_contract.BATCH_KEYS)
    assert pipeline.DECODE_ERRORS_KEY in batch_contract.BATCH_KEYS and pipeline.DECODE_ERRORS_KEY not in read
    for (term, field, _), _ in batch_contract.OPTION_BATCH_KEYS.items():
        assert term in objective_module.TERM_NAMES and field in objective_module.default_loss_config()


def test_the_pipeline_refuses_a_key_the_contract_does_not_name(monkeypatch):
    config = pipeline.default_data_config()
    assert set(pipeline.batch_spec(config)) <= set(batch_contract.BATCH_KEYS)
    original = pipeline.transforms.output_spec
    monkeypatch.setattr(
        pipeline.transforms, "output_spec", lambda c: {**original(c), "text_mask": ((), np.dtype(np.bool_))}
    )
    with pytest.raises(ValueError, match=r"batch key 'text_mask'.*batch_contract\.py does not name"):
        pipeline.batch_spec(config)


class _RecordingBatch(dict):
    """A batch dict that notes every key read from it (`in` is not a read)."""

    def __init__(self, items, reads: set[str]):
        super().__init__(items)
        self._reads = reads

    def __getitem__(self, key):
        self._reads.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key in self:
            self._reads.add(key)
        return super().get(key, default)


def _term_cases() -> list[tuple[str, dict]]:
    cases = [(term, {}) for term in objective_module.TERM_NAMES]
    cases += [(term, {field: value}) for (term, field, value) in batch_contract.OPTION_BATCH_KEYS]
    return cases


@pytest.mark.parametrize("term,options", _term_cases())
def test_each_term_reads_exactly_the_keys_it_declares(term, options, monkeypatch):
    """Traced on a demo-config batch holding every key: the keys read (by the encoders and the term) are the
    declared ones, so a declaration can be neither missing (the term would fail) nor stale."""
    demo = importlib.import_module("configs.demo").get_config()
    demo.data.batch_size = 4
    spec = pipeline.batch_spec(demo.data)
    batch = {key: jax.ShapeDtypeStruct(shape, dtype) for key, (shape, dtype) in spec.items()
             if key != pipeline.DECODE_ERRORS_KEY}
    loss = objective_module.default_loss_config()
    loss.weights.scene = 0.0
    loss.weights[term] = 1.0
    for field, value in options.items():
        loss[field] = value
    reads: set[str] = set()
    original = objective_module._declared_keys
    monkeypatch.setattr(objective_module, "_declared_keys", lambda b, keys: _RecordingBatch(original(b, keys), reads))
    towers = ElementwiseTowers()
    objective = objective_module.make_objective(loss, encode_image=towers.encode_image, encode_text=towers.encode_text)
    params = towers.params(vocab=49408)
    params["logit_bias"] = np.float32(-10.0)
    jax.eval_shape(lambda p, b: objective(p, b, 0, model_config=None, teacher_params=p), params, batch)
    declared = objective_module.required_batch_keys(objective_module.validate_loss_config(loss))[term]
    assert reads == set(declared)


# The value that turns each data switch named in `BatchKey.produced_when` on (a new switch must be added here).
SWITCH_ON = {"long_context_length": 248, "num_hard_negatives": 2, "max_regions": 2, "region_crop_size": 16,
             "region_view_crop_size": 16, "num_local_crops": 2}


def _switches(key: str) -> list[str]:
    """The data fields of `produced_when` ("always", or "data.F > 0" joined by " and ")."""
    produced_when = batch_contract.BATCH_KEYS[key].produced_when
    if produced_when == "always":
        return []
    fields = []
    for condition in produced_when.split(" and "):
        match = re.fullmatch(r"data\.(\w+) > 0", condition)
        assert match, f"{key}: produced_when {produced_when!r} is not 'always' or 'data.F > 0 and ...'"
        fields.append(match.group(1))
    return fields


def test_each_key_is_produced_exactly_when_and_as_the_contract_says():
    """`produced_when` and the dtype/rank of `BatchKey.shape` are prose; the pipeline must agree with them."""
    all_on = pipeline.default_data_config()
    for field, value in SWITCH_ON.items():
        all_on[field] = value
    spec = pipeline.batch_spec(all_on)
    assert set(spec) == set(batch_contract.BATCH_KEYS)
    for key, (shape, dtype) in spec.items():
        declared = batch_contract.BATCH_KEYS[key].shape
        assert declared.split()[-1] == dtype.name, f"{key}: contract says {declared!r}, pipeline gives {dtype}"
        rank = len(re.search(r"\[(.*)\]", declared).group(1).split(",")) if "[" in declared else 0
        assert rank == len(shape), f"{key}: contract says {declared!r}, pipeline gives shape {shape}"
        only_its_switches = all_on.copy_and_resolve_references()
        for field in SWITCH_ON:
            only_its_switches[field] = SWITCH_ON[field] if field in _switches(key) else 0
        produced_when = batch_contract.BATCH_KEYS[key].produced_when
        assert key in pipeline.batch_spec(only_its_switches), f"{key} needs more than {produced_when!r}"
        for field in _switches(key):
            off = all_on.copy_and_resolve_references()
            off[field] = 0
            assert key not in pipeline.batch_spec(off), f"{key} is produced with data.{field} = 0"
