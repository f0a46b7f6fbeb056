"""tools/demo.py, what `bash launch/demo.sh` runs, on a few steps and a few dozen scenes: every stage runs through
the CLIs (data, untrained evaluation, the trainer, evaluation, export, PyTorch reload), the numbers it reports are
the ones on disk, and its helpers (data reuse, chance levels, the output folder guard) do what they say.
The full-size demo (learning well above chance) is run by hand; its table is in the README."""
from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest

import data_fixtures

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _demo_module():
    data_fixtures.load_demo_module()  # tools/make_demo_data.py as `make_demo_data`, which the demo imports
    spec = importlib.util.spec_from_file_location("geoalign_demo", REPO_ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


demo = _demo_module()
SIZES = {"num_train": 32, "num_val": 12, "num_per_class": 3}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("demo")
    argv = ["--out", str(out), "--steps", "4", "--eval-every", "2", "--no-learning-check"]
    argv += [f"--{key.replace('_', '-')}={value}" for key, value in SIZES.items()]
    assert demo.main(argv + ["--", "--config.data.batch_size=8"]) == 0
    return out


def test_every_stage_ran_and_the_pytorch_reloads_match_jax(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    assert summary["failures"] == []
    assert set(summary["embedding_max_abs_difference"]) == {"open_clip", "hf"}
    assert all(diff <= demo.EMBEDDING_TOLERANCE for diff in summary["embedding_max_abs_difference"].values())
    assert summary["jax_vs_pytorch_max_metric_difference"] <= demo.METRIC_TOLERANCE
    assert (demo_run / "export" / "open_clip" / "open_clip_config.json").is_file()
    assert (demo_run / "export" / "hf" / "config.json").is_file()
    for name in ("untrained", "trained", "open_clip"):
        assert (demo_run / "eval" / name / "results.json").is_file(), name
    assert set(summary["seconds"]) >= {"data", "training", "total"}
    assert all(pathlib.Path(path).exists() for path in summary["paths"].values())


def test_training_went_through_the_trainer_from_the_evaluated_init(demo_run):
    run = demo_run / "run"
    config = json.loads((run / "config.json").read_text())
    assert (config["init"]["kind"], config["init"]["path"]) == ("params", str(demo_run / "init"))
    assert config["train"]["num_steps"] == 4 and config["data"]["batch_size"] == 8
    assert summary_command(demo_run)[1:4] == ["-m", "geoalign_jax.train", "--config"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["step"]: r for r in records if any(key.startswith("eval/") for key in r)}
    assert sorted(evaluated) == [2, 4]
    # The trainer's last evaluation and the evaluate CLI on the saved workdir score the same parameters.
    trained = json.loads((demo_run / "eval" / "trained" / "results.json").read_text())["metrics"]
    for key, _ in demo.HEADLINE:
        assert evaluated[4][f"eval/{key}"] == pytest.approx(trained[key], abs=1e-9), key
    losses = [r for r in records if "loss" in r]
    assert losses and {"scene/loss", "patch_distill/loss", "region_cls/loss"} <= set(losses[-1])


def summary_command(out: pathlib.Path) -> list[str]:
    return json.loads((out / "summary.json").read_text())["trainer_command"]


def test_the_table_reports_chance_and_the_numbers_on_disk(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    rows = {row["metric"]: row for row in summary["table"]}
    assert list(rows) == [key for key, _ in demo.HEADLINE]
    untrained = json.loads((demo_run / "eval" / "untrained" / "results.json").read_text())["metrics"]
    through_torch = json.loads((demo_run / "eval" / "open_clip" / "results.json").read_text())["metrics"]
    for key, row in rows.items():
        assert row["untrained"] == untrained[key] and row["trained_pytorch"] == through_torch[key]
    assert rows["zeroshot/landcover/top1"]["chance"] == pytest.approx(20.0)  # five land covers
    # 12 held-out scenes with one caption each: mean of 1/12, 5/12, 10/12 in both directions
    assert rows["retrieval/demo/standard/mean_recall"]["chance"] == pytest.approx(100 * 16 / 3 / 12)
    png = (demo_run / "run" / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000


def test_chance_level_of_retrieval_with_several_captions_per_image():
    metrics = {"retrieval/x/standard/num_images": 100, "retrieval/x/standard/num_texts": 500}
    # image queries: P(one of its 5 captions in the top k of 500) = 1.000%, 4.920%, 9.645% for k = 1, 5, 10;
    # text queries: k / 100 images
    expected = (1.0 + 4.9203 + 9.6450 + 1.0 + 5.0 + 10.0) / 6
    assert demo.chance_level("retrieval/x/standard/mean_recall", metrics) == pytest.approx(expected, abs=1e-3)
    assert demo.chance_level("zeroshot/y/top1", {f"zeroshot/y/class/c{i}": 0.0 for i in range(8)}) == 12.5
    with pytest.raises(ValueError, match="no chance level"):
        demo.chance_level("regions/z/roi/top1", {})


def test_demo_data_is_reused_only_when_written_with_the_same_sizes(tmp_path):
    sizes = {"num_train": 4, "num_val": 2, "num_per_class": 1, "image_size": 32, "seed": 0}
    demo.ensure_data(tmp_path, sizes)
    shard = next((tmp_path / "scenes").glob("*.array_record"))
    written = shard.stat().st_mtime_ns
    demo.ensure_data(tmp_path, dict(sizes))
    assert shard.stat().st_mtime_ns == written  # reused
    demo.ensure_data(tmp_path, {**sizes, "num_train": 6})
    manifest = json.loads((tmp_path / "scenes" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 6


def test_the_demo_never_clears_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert demo.main(["--out", str(tmp_path)]) == 2
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert "was not made by this demo" in capsys.readouterr().err
