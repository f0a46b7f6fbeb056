"""The trainer on one CPU device: the demo config learns and reports, preemption + resume is bitwise exact,
non-finite steps are skipped and counted, bad configs are refused naming the field, and a trainer checkpoint
exports to open_clip with the same embeddings. (8 simulated devices: test_train_sharded.py; two processes:
test_train_multihost.py.)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import bad_files
import train_fixtures
from train_fixtures import assert_bitwise_equal, flat, tiny_config
from geoalign_jax.data import pipeline, text_stats
from geoalign_jax.eval import provenance
from geoalign_jax.parallel import mesh as mesh_lib
from geoalign_jax.parallel import multihost
from geoalign_jax.train import loop, metrics as metrics_lib, optim
from geoalign_jax.train import state as state_lib
from geoalign_jax.train import step as step_lib

REPO_ROOT = train_fixtures.REPO_ROOT


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> str:
    return train_fixtures.make_data(tmp_path_factory.mktemp("train_data"))


# ----------------------------------------------------------------------------------------------------------
# Config and optimizer (no compilation)


def test_config_typo_is_rejected_with_its_name(scenes, tmp_path):
    config = tiny_config(scenes)
    with config.unlocked():
        config.optim.lerning_rate = 1e-3
    with pytest.raises(ValueError, match=r"unknown config field optim\.lerning_rate"):
        loop.build(config)
    result = subprocess.run(
        [sys.executable, "-m", "geoalign_jax.train", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
         "--config.optim.lerning_rate=0.1"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 2
    assert 'lerning_rate: Did you mean "learning_rate"' in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()  # refused before anything was written
    # optim.lr_multipliers: (regex, factor) pairs, set from the command line (regexes with dots and slashes).
    result = subprocess.run(
        [sys.executable, "-m", "geoalign_jax.train", "--config", "configs/demo.py", "--workdir", str(tmp_path / "w"),
         '--config.optim.lr_multipliers=(("^text/", 0.1), ("^visual/.*", -1.0))'],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 2
    assert "error: optim.lr_multipliers['^visual/.*'] = -1.0: must be a number >= 0" in result.stderr, result.stderr


def test_missing_batch_input_is_named_before_the_first_step(scenes):
    config = tiny_config(scenes)
    config.loss.weights.region_text = 1.0  # the data config produces no regions
    with pytest.raises(ValueError, match=r"loss.weights.region_text > 0 needs batch\['region_boxes'\]"):
        loop.build(config)


def test_eval_on_training_images_is_refused_before_training_unless_allowed(scenes, tmp_path):
    """An eval task on a training split is a config error naming eval.allow_train_split; allowed, and with
    eval.exclude_overlap, a task whose every image is a training image is an InputError before any compile."""
    config = tiny_config(scenes, **{"eval.tasks": (f"retrieval:seen={scenes},split=train,limit=4",), "eval.every_steps": 2})
    with pytest.raises(ValueError, match=r"eval.tasks: task retrieval:seen: split 'train'.*eval.allow_train_split = True"):
        loop.build(config)
    config.eval.allow_train_split = True
    config.eval.exclude_overlap = True
    loop.build(config)
    # checkpoint.best_metric: a task the config does not evaluate is refused now; a metric name the task does
    # not produce, at the first evaluation (before orbax ranks checkpoints by it), listing the names it has.
    config.checkpoint.best_metric = "retreival/seen/standard/mean_recall"
    with pytest.raises(ValueError, match=r"checkpoint.best_metric = 'retreival/.*one of \['retrieval/seen'\]"):
        loop.build(config)
    config.checkpoint.best_metric = ""
    with pytest.raises(ValueError, match=r"'retrieval/seen/recall' is not among the evaluation's metrics: "
                                         r"retrieval/seen/standard/mean_recall"):
        loop._check_best_metric("retrieval/seen/recall", {"retrieval/seen/standard/mean_recall": 0.5})
    with pytest.raises(loop.InputError, match=r"eval.exclude_overlap: every one of the 4 images of eval task "
                                               r"retrieval/seen is also in the training shards"):
        loop.run(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / metrics_lib.METRICS_FILE).exists()  # stopped before the first step


def test_weight_decay_mask_frozen_trees_and_learning_rate_multipliers():
    from geoalign_jax.train import experiment
    from geoalign_jax.params_checkpoint import abstract_params, flatten_params

    config = experiment.get_config()
    config.model.name = "tiny"
    params = abstract_params(experiment.model_config(config))
    decays = flatten_params(optim.decay_mask(params, config.optim.no_decay))
    for path in ("visual/transformer/resblocks_0/mlp/c_fc/kernel", "text/text_projection",
                 "text/token_embedding/embedding", "text/positional_embedding"):  # open_clip decays embeddings
        assert decays[path], path
    for path in ("visual/ln_pre/scale", "visual/transformer/resblocks_1/attn/query/bias", "logit_scale",
                 "visual/class_embedding"):
        assert not decays[path], path

    config.optim.layer_decay = 0.5
    config.optim.lr_multipliers = (("^text/", 0.1), ("^text/", 7.0))  # first match wins
    factors = flatten_params(optim.lr_multipliers(params, config.optim))
    # tiny has 2 blocks per tower: embeddings are layer 0 (0.5**3), block i layer i + 1, the head layer 3 (1)
    assert factors["visual/conv1/kernel"] == 0.125 and factors["visual/transformer/resblocks_0/ln_1/scale"] == 0.25
    assert factors["visual/transformer/resblocks_1/ln_1/scale"] == 0.5 and factors["visual/proj"] == 1.0
    assert factors["text/token_embedding/embedding"] == pytest.approx(0.0125) and factors["logit_scale"] == 1.0

    config.optim.frozen = ("^text/",)
    config.optim.warmup_steps = 0  # a non-zero learning rate at the first update
    tx = optim.make_optimizer(config.optim, params, num_steps=10)
    grads = jax.tree.map(lambda p: np.ones(p.shape, p.dtype), params)
    values = jax.tree.map(lambda p: np.zeros(p.shape, p.dtype), params)
    state = tx.init(values)
    moments = [leaf for leaf in jax.tree.leaves(state) if np.asarray(leaf).dtype.kind == "f"]  # not the counts
    text_size = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["text"]))
    all_size = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert sum(np.size(m) for m in moments) == 2 * (all_size - text_size)  # no moments for the frozen text tower
    updates, _ = jax.jit(tx.update)(grads, state, values)
    flat_updates = flatten_params(updates)
    assert all(not np.any(u) for k, u in flat_updates.items() if k.startswith("text/"))
    assert np.any(flat_updates["visual/proj"])


def test_a_resumed_log_drops_records_logged_after_the_checkpoint(tmp_path, capsys):
    """... and its last line when a kill cut it; a non-finite value is written as null (strict JSON); the
    console line shows evaluation results; the step timer leaves out evaluation and checkpoint time."""
    log = tmp_path / metrics_lib.METRICS_FILE
    log.write_text("".join(json.dumps({"step": step, "loss": 1.0}) + "\n" for step in range(1, 6)) + '{"step": 6, "lo')
    writer = metrics_lib.MetricsWriter(tmp_path, total_steps=10, initial_step=3, progress=False)
    writer.write(4, {"loss": np.float32(np.nan), "grad_norm": np.float32(2.0)})
    writer.write(4, {"eval/zeroshot/aid/top1": 0.625, "eval_seconds": 1.5})
    writer.close()

    def strict(constant):
        raise ValueError(f"not strict JSON: {constant}")

    records = [json.loads(line, parse_constant=strict) for line in log.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 4] and records[3] == {"step": 4, "loss": None, "grad_norm": 2.0}
    aside = (tmp_path / "metrics.jsonl.after_3").read_text().splitlines()  # set aside, not lost
    assert [json.loads(line)["step"] for line in aside] == [4, 5]
    assert "eval/zeroshot/aid/top1 0.625" in capsys.readouterr().out
    log.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')  # damaged before the end: not guessed at
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not JSON"):
        metrics_lib.MetricsWriter(tmp_path, total_steps=10, initial_step=3, progress=False)
    timer = metrics_lib.StepTimer()
    timer.exclude(3600.0)
    assert timer.lap() == 0.0 and timer.lap() > 0.0  # an hour excluded from the first interval only


def test_micro_batches_take_strided_rows():
    batch = {"x": np.arange(8)[:, None] * np.ones((1, 3))}
    micro = step_lib.split_micro_batches(batch, 2, mesh=None)
    assert micro["x"].shape == (2, 4, 3)
    np.testing.assert_array_equal(micro["x"][1, :, 0], [1, 3, 5, 7])


# ----------------------------------------------------------------------------------------------------------
# Runs


def test_demo_config_learns_and_reports_and_exports_to_open_clip(tmp_path, caplog):
    """configs/demo.py (every loss term on): the loss falls over a few dozen steps; metrics.jsonl, TensorBoard
    and config.json are written; evaluation runs during training and the best checkpoint by its metric is
    kept beside the latest; the workdir exports to open_clip with the JAX embeddings."""
    import data_fixtures
    from configs import demo

    data = data_fixtures.load_demo_module().make_demo_data(
        tmp_path / "data", num_train=48, num_val=0, num_per_class=4, image_size=64
    )
    config = demo.get_config()
    config.data.train_shards = data["scenes"]
    config.data.batch_size = 8
    config.train.num_steps = 24
    config.train.log_every = 3
    config.optim.warmup_steps = 3
    config.checkpoint.every_steps = 8
    config.checkpoint.keep = 1
    config.checkpoint.best_metric = "zeroshot/landcover/top1"
    # A task on 8 of the training images themselves (allowed explicitly): the overlap check must find them.
    config.eval.tasks = (f"zeroshot:landcover={data['landcover']}", f"retrieval:seen={data['scenes']},split=train,limit=8")
    config.eval.allow_train_split = True
    config.eval.every_steps = 8
    workdir = tmp_path / "run"
    with caplog.at_level(logging.INFO, logger="geoalign_jax"):  # the loop's and the evaluation's loggers
        result = loop.run(config, workdir, progress=False)
    assert result.status == "finished" and result.step == 24
    overlap_logs = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval overlap")]
    assert len(overlap_logs) == 2  # once, before training, not at every evaluation
    assert "retrieval/seen: 8 of its 8 images also occur in the training shards (8 exact" in overlap_logs[1]
    assert "zeroshot/landcover: none of its" in overlap_logs[0]

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == list(range(3, 25, 3))
    for key in ("loss", "learning_rate", "grad_norm", "logit_scale", "step_seconds", "examples_per_second",
                "nonfinite_total", "decode_errors", "scene/loss", "patch_distill/loss", "region_cls/loss"):
        assert key in train_records[-1], key
    assert "mfu" not in train_records[-1]  # a CPU's peak is unknown: not reported rather than made up
    first = np.mean([r["loss"] for r in train_records[:2]])
    last = np.mean([r["loss"] for r in train_records[-2:]])
    assert last < 0.85 * first, (first, last)
    assert train_records[-1]["decode_errors"] == 0 and train_records[-1]["nonfinite_total"] == 0
    assert list((workdir / metrics_lib.TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert json.loads((workdir / loop.CONFIG_FILE).read_text())["train"]["num_steps"] == 24

    evaluated = {r["step"]: r["eval/zeroshot/landcover/top1"] for r in records if "eval/zeroshot/landcover/top1" in r}
    assert sorted(evaluated) == [8, 16, 24]
    assert all(r["eval_seconds"] > 0 for r in records if "eval/zeroshot/landcover/top1" in r)  # timed apart
    assert [r["step"] for r in records if r.get("eval/retrieval/seen/overlap/exact") == 8] == [8, 16, 24]
    assert records[0]["step"] == 0 and {key for key in records[0] if key != "step"} == {
        f"data/truncated/{kind}" for kind in text_stats.TEXT_KINDS}  # demo reads every kind of text
    # Each evaluation's results.json (process 0): provenance of the weights evaluated and of the overlap.
    hashes = {}
    for step in (8, 16, 24):
        written = json.loads((workdir / "eval" / f"step_{step}" / "results.json").read_text())
        assert written["run"]["trainer"]["step"] == step and written["run"]["exclude_overlap"] is False
        assert written["metrics"]["zeroshot/landcover/top1"] == evaluated[step]
        tasks = written["provenance"]["tasks"]
        assert tasks["retrieval/seen"]["overlap"]["exact"] == 8 and tasks["retrieval/seen"]["training_split_allowed"]
        assert tasks["zeroshot/landcover"]["overlap"]["overlapping"] == 0
        assert tasks["zeroshot/landcover"]["overlap"]["train_data"]["records"] == 48
        hashes[step] = written["provenance"]["model"]["parameter_hash"]
    assert len(set(hashes.values())) == 3 and hashes[24] == provenance.parameter_hash(result.state.params)
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert 24 in kept and len(kept) <= 2  # keep = 1 latest, keep_best = 1
    assert max(evaluated[step] for step in kept) == max(evaluated.values())  # the best one survived

    from geoalign_jax.convert import __main__ as convert_cli
    from geoalign_jax.params_checkpoint import load_params
    import param_fixtures
    import open_clip
    import torch

    exported = tmp_path / "open_clip"
    assert convert_cli.main(["export", "--params", str(workdir), "--format", "open_clip", "--out", str(exported)]) == 0
    model_config, params = load_params(workdir)
    assert_bitwise_equal(params, result.state.params)
    images = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    from geoalign_jax import tokenizer

    tokens = tokenizer.tokenize(param_fixtures.CAPTIONS[:2], model_config.text.context_length)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{exported}")
    with torch.inference_mode():
        torch_image = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
        torch_text = model.encode_text(torch.from_numpy(tokens.astype(np.int64))).numpy()
    np.testing.assert_allclose(torch_image, param_fixtures.embed_images(model_config, params, images), atol=param_fixtures.ATOL)
    np.testing.assert_allclose(torch_text, param_fixtures.embed_texts(model_config, params, tokens), atol=param_fixtures.ATOL)


def _next_batch(config, checkpoint_step_dir: pathlib.Path) -> dict[str, np.ndarray]:
    state = (checkpoint_step_dir / "data" / "process_0-of-1.json").read_text()
    iterator = pipeline.make_train_iterator(config.data, process_index=0, process_count=1, state=state)
    try:
        return next(iterator)
    finally:
        iterator.close()


def test_sigterm_then_resume_equals_an_uninterrupted_run(scenes, tmp_path):
    """With 4 micro-batches (GradCache) and the EMA of the parameters, which checkpoints keep and export reads.
    Both runs evaluate at step 6 (4 training images): the straight one the EMA (eval.use_ema), the resumed one
    the raw parameters; each results.json must hash the weights it names."""
    evaluated_at_6 = {"eval.tasks": (f"retrieval:seen={scenes},split=train,limit=4",), "eval.every_steps": 6,
                      "eval.batch_size": 4, "eval.allow_train_split": True}
    config = tiny_config(scenes, **{"train.num_steps": 6, "checkpoint.every_steps": 4, "train.micro_batches": 4,
                                    "train.ema_decay": 0.9, **evaluated_at_6})
    with_ema_evaluated = config.copy_and_resolve_references()
    with_ema_evaluated.eval.use_ema = True
    straight = loop.run(with_ema_evaluated, tmp_path / "straight", progress=False)

    def preempt_at_3(step: int) -> None:
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    interrupted = loop.run(config, tmp_path / "interrupted", progress=False, on_step=preempt_at_3)
    assert (interrupted.status, interrupted.step) == ("preempted", 3)
    assert (tmp_path / "interrupted" / "checkpoints" / "3").is_dir()  # saved at the signal, not at a multiple of 4
    reordered = tiny_config(scenes, **{"train.num_steps": 6, "checkpoint.every_steps": 4, "train.micro_batches": 4,
                                       "train.ema_decay": 0.9, "data.seed": 1})
    with pytest.raises(ValueError, match=r"data order changed since the checkpoints .*\(data.seed: 0 -> 1\)"):
        loop.run(reordered, tmp_path / "interrupted", progress=False)  # refused before it touches anything
    resumed = loop.run(config, tmp_path / "interrupted", progress=False)
    assert (resumed.status, resumed.resumed_from, resumed.step) == ("finished", 3, 6)

    assert_bitwise_equal(straight.state.params, resumed.state.params)
    assert_bitwise_equal(straight.state.opt_state, resumed.state.opt_state)
    assert_bitwise_equal(straight.state.ema, resumed.state.ema)
    _check_ema_and_its_export(straight.state, tmp_path / "straight", tmp_path / "export")
    for run, weights in ((tmp_path / "straight", straight.state.ema), (tmp_path / "interrupted", resumed.state.params)):
        written = json.loads((run / "eval" / "step_6" / "results.json").read_text())
        assert written["provenance"]["model"]["parameter_hash"] == provenance.parameter_hash(weights), run.name
        assert ("(EMA, train.ema_decay 0.9)" in written["run"]["weights"]) == (run.name == "straight")
    for step in (4, 6):  # step 4: saved while training went on (the iterator state is taken before save returns)
        data_file = pathlib.Path("checkpoints", str(step), "data", "process_0-of-1.json")
        assert (tmp_path / "straight" / data_file).read_text() == (tmp_path / "interrupted" / data_file).read_text()
    batch_a = _next_batch(config, tmp_path / "straight" / "checkpoints" / "6")
    batch_b = _next_batch(config, tmp_path / "interrupted" / "checkpoints" / "6")
    assert_bitwise_equal(batch_a, batch_b)
    records = [json.loads(line) for line in (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in records if "loss" in r) == [1, 2, 3, 4, 5, 6]  # the resumed run appends
    # The truncation statistics: the step-0 record of the fresh run, not repeated by the resumed one.
    assert [r for r in records if r["step"] == 0] == [{"step": 0, **text_stats.pipeline_truncation_metrics(config.data)}]
    assert records[0].keys() == {"step", "data/truncated/captions"}  # the only texts this config reads
    again = loop.run(config, tmp_path / "straight", progress=False)  # the same command once more: nothing to do
    assert (again.status, again.resumed_from, again.step) == ("finished", 6, 6)


def _check_ema_and_its_export(state, workdir, out):
    """The EMA trails the parameters (6 updates at warm-up decays 0.1 ... 0.6), is what the checkpoint's ema/
    holds, and is what `convert export --ema` writes (read back by the open_clip importer)."""
    from geoalign_jax.convert import load_pretrained
    from geoalign_jax.convert.__main__ import main as convert_main
    from geoalign_jax.params_checkpoint import load_params

    ema, params = flat(state.ema), flat(state.params)
    assert all(not np.array_equal(ema[key], params[key]) for key in ("['visual']['proj']", "['text']['text_projection']"))
    _, stored = load_params(workdir, ema=True)
    assert_bitwise_equal(state.ema, stored)
    assert convert_main(["export", "--params", str(workdir), "--format", "open_clip", "--out", str(out), "--ema"]) == 0
    _, exported = load_pretrained(out, "open_clip", quick_gelu=False)
    for key, value in flat(exported).items():
        np.testing.assert_allclose(value, ema[key], rtol=1e-6, atol=1e-7, err_msg=key)


def test_micro_batches_and_ema_errors_name_the_numbers(scenes, monkeypatch):
    with pytest.raises(ValueError, match=r"train.micro_batches = 3: must divide data.batch_size \(8\)"):
        loop.build(tiny_config(scenes, **{"train.micro_batches": 3}))
    monkeypatch.setattr(loop.jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^train.micro_batches 8 does not divide the per-process batch 4 "
                                         r"\(data.batch_size 8 / 2 processes\)$"):
        loop._check_batch_layout(tiny_config(scenes, **{"train.micro_batches": 8}), mesh_lib.make_mesh())
    with pytest.raises(ValueError, match=r"eval.use_ema = True: needs train.ema_decay > 0"):
        loop.build(tiny_config(scenes, **{"eval.use_ema": True}))
    with pytest.raises(ValueError, match=r"train.ema_decay = 1.0: must be in \[0, 1\)"):
        loop.build(tiny_config(scenes, **{"train.ema_decay": 1.0}))


def test_ema_warm_up():
    from geoalign_jax.train.ema import ema_decay_at, update_ema

    np.testing.assert_allclose([float(ema_decay_at(0.9999, t)) for t in (0, 90, 10**6)], [0.1, 0.91, 0.9999], rtol=1e-6)
    moved = update_ema({"w": np.float32([1.0])}, {"w": np.float32([3.0])}, 0.5, 10**6)
    np.testing.assert_allclose(moved["w"], [2.0])


def test_a_failed_compile_uninstalls_the_sigterm_handler_and_closes_the_run(scenes, tmp_path, monkeypatch):
    before = signal.getsignal(signal.SIGTERM)
    closed = []
    monkeypatch.setattr(metrics_lib.MetricsWriter, "close", lambda self: closed.append("writer"))

    def fail(*args, **kwargs):
        assert signal.getsignal(signal.SIGTERM) is not before  # the run's handler is installed by now
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while compiling")

    monkeypatch.setattr(loop.step_lib, "compile_step", fail)
    with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
        loop.run(tiny_config(scenes), tmp_path / "run", progress=False)
    assert signal.getsignal(signal.SIGTERM) is before and closed == ["writer"]


def test_nonfinite_step_is_skipped_and_counted(scenes):
    config = tiny_config(scenes)
    setup = loop.build(config)
    state = loop.initial_state(setup)
    compiled = step_lib.compile_step(setup.train_step, setup.abstract_state, setup.shardings, setup.batch_spec, setup.mesh)
    iterator = pipeline.make_train_iterator(config.data)
    good = next(iterator)
    iterator.close()
    pipeline.pop_host_metrics(good)
    bad = {**good, "image": np.full_like(good["image"], np.nan)}
    sharding = mesh_lib.batch_sharding(setup.mesh)
    before_params, before_opt = flat(state.params), flat(state.opt_state)
    state, metrics = compiled.run(state, multihost.host_batch_to_global(bad, sharding))
    metrics = jax.device_get(metrics)
    assert not np.isfinite(metrics["loss"])
    assert (metrics["nonfinite"], metrics["nonfinite_streak"], metrics["nonfinite_total"]) == (1, 1, 1)
    assert_bitwise_equal(before_params, flat(state.params))  # not applied
    assert_bitwise_equal(before_opt, flat(state.opt_state))
    assert int(state.step) == 1
    state, metrics = compiled.run(state, multihost.host_batch_to_global(good, sharding))
    metrics = jax.device_get(metrics)
    assert (metrics["nonfinite"], metrics["nonfinite_streak"], metrics["nonfinite_total"]) == (0, 0, 1)
    # The optimizer's count did not advance on the skipped step: the update used (and the log shows) the
    # schedule's first value, not the one at state.step (tiny: warm-up 2, so they differ).
    assert metrics["learning_rate"] == pytest.approx(float(setup.schedule(0))) != float(setup.schedule(1))
    assert not np.array_equal(before_params["['visual']['proj']"], np.asarray(state.params["visual"]["proj"]))


def test_nonfinite_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(scenes, tmp_path, monkeypatch):
    """The streak is read only at log and save steps (here 3 and 6): steps 4 and 5 are non-finite, step 6 is
    finite again, yet the run stops at step 6 without saving it."""
    config = tiny_config(scenes, **{"train.max_consecutive_nonfinite": 2, "train.log_every": 6,
                                    "checkpoint.every_steps": 3})
    calls = {"count": 0}
    to_global = multihost.host_batch_to_global

    def poisoned_steps_4_and_5(batch, sharding):
        calls["count"] += 1
        if calls["count"] in (4, 5):
            batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
        return to_global(batch, sharding)

    monkeypatch.setattr(loop.multihost, "host_batch_to_global", poisoned_steps_4_and_5)
    with pytest.raises(loop.NonFiniteError, match=r"2 non-finite steps in a row.*by step 6.*checkpoint \(step 3\)"):
        loop.run(config, tmp_path / "run", progress=False)
    from geoalign_jax.params_checkpoint import load_params

    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [3]
    _, params = load_params(tmp_path / "run")
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(params))


def test_init_from_params_and_open_clip_with_long_clip_stretch_and_a_truncated_file_is_exit_2(scenes, tmp_path):
    import param_fixtures
    from geoalign_jax.train import experiment
    from geoalign_jax.convert import __main__ as convert_cli
    from geoalign_jax.params_checkpoint import save_params

    config = tiny_config(scenes)
    model_config = experiment.model_config(config)
    params = param_fixtures.random_params(model_config, seed=3)
    save_params(tmp_path / "ckpt", model_config, params)
    config.init.kind, config.init.path = "params", str(tmp_path / "ckpt")
    state = loop.initial_state(loop.build(config))
    assert_bitwise_equal(params, state.params)

    convert_cli.run_export(tmp_path / "ckpt", "open_clip", tmp_path / "open_clip")
    long_config = tiny_config(scenes, **{"init.kind": "open_clip", "init.path": str(tmp_path / "open_clip")})
    long_config.model.overrides.text_context_length = 248
    stretched = loop.initial_state(loop.build(long_config)).params
    positions = np.asarray(stretched["text"]["positional_embedding"])
    assert positions.shape == (248, 64)
    np.testing.assert_array_equal(positions[:20], params["text"]["positional_embedding"][:20])  # Long-CLIP keeps 20
    np.testing.assert_array_equal(np.asarray(stretched["visual"]["proj"]), params["visual"]["proj"])

    config.init.path = str(tmp_path / "missing")
    with pytest.raises(state_lib.InitError, match=r"init.path '.*missing' \(init.kind 'params'\)"):
        loop.initial_state(loop.build(config))

    # A truncated weights file (an interrupted download): one line naming it, exit status 2, nothing compiled.
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((tmp_path / "open_clip" / "open_clip_model.safetensors").read_bytes())
    bad_files.truncate(truncated)
    long_config.init.path = str(truncated)
    with pytest.raises(state_lib.InitError, match=r"^init.path \(init.kind 'open_clip'\): .*truncated\.safetensors"):
        state_lib.load_initial_params(long_config.init, experiment.model_config(long_config))
    workdir = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "geoalign_jax.train", "--config", "configs/demo.py", "--workdir", str(workdir),
         f"--config.data.train_shards={scenes}", "--config.init.kind=open_clip", f"--config.init.path={truncated}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(truncated) in errors[0] and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "compiled the train step" not in result.stdout + result.stderr
    assert not list((workdir / "checkpoints").glob("[0-9]*"))

    # A first run that died before its first checkpoint (here: the truncated init file) leaves model_config.json
    # describing no checkpoint; the same workdir then reruns with another (good) config and trains.
    rerun = tmp_path / "rerun"
    with pytest.raises(loop.InputError, match=r"truncated\.safetensors"):
        loop.run(long_config, rerun, progress=False)
    assert (rerun / "checkpoints" / "model_config.json").is_file() and not list((rerun / "checkpoints").glob("[0-9]*"))
    good = tiny_config(scenes, **{"checkpoint.every_steps": 4})  # the preemption test's program (compile cache)
    assert loop.run(good, rerun, progress=False).status == "finished"
    from geoalign_jax.params_checkpoint import read_model_config
    from geoalign_jax.train import checkpoint as checkpoint_lib

    assert read_model_config(rerun) == model_config
    # Once steps exist: other numerics (remat, dtype) resume, another architecture is refused on every process.
    checkpointer = checkpoint_lib.Checkpointer(rerun, keep=1)
    try:
        checkpointer.write_model_config(dataclasses.replace(model_config, remat=True, dtype="bfloat16"))
        with pytest.raises(ValueError, match=r"model_config.json: the checkpoints in this workdir are of another model "
                                              r"\(model.embed_dim: 32 -> 64\); use another --workdir"):
            checkpointer.write_model_config(dataclasses.replace(model_config, embed_dim=model_config.embed_dim * 2))
    finally:
        checkpointer.close()
