"""Training curves from a metrics.jsonl (geoalign_jax/train/plots.py): every loss term, the learning rate and the
evaluation metrics are drawn; a damaged log is refused naming the file and line."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from geoalign_jax.train import plots


def _write_log(workdir, records):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _run_records():
    records = []
    for step in range(5, 45, 5):
        records.append({"step": step, "loss": 8.0 / step, "scene/loss": 4.0 / step, "region_cls/loss": 3.0 / step,
                        "learning_rate": 1e-3, "grad_norm": 2.0, "logit_scale": 14.3})
        if step % 20 == 0:
            records.append({"step": step, "eval/zeroshot/a/top1": step * 2.0, "eval/zeroshot/a/num_samples": 40,
                            "eval/retrieval/b/standard/mean_recall": step * 1.0, "eval/zeroshot/a/class/x": 1.0})
    return records


def test_curves_png_is_written_beside_the_run(tmp_path):
    _write_log(tmp_path / "run", _run_records())
    path = plots.plot_training_curves(tmp_path / "run", chance={"zeroshot/a/top1": 20.0})
    assert path == tmp_path / "run" / plots.CURVES_FILE
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1200, 800)
    records = plots.read_metrics(tmp_path / "run")
    assert plots.eval_keys(records) == ["eval/retrieval/b/standard/mean_recall", "eval/zeroshot/a/top1"]
    assert plots.main([str(tmp_path / "run"), "--out", str(tmp_path / "elsewhere.png")]) == 0
    assert (tmp_path / "elsewhere.png").is_file()


def test_a_damaged_or_empty_log_is_refused_naming_it(tmp_path, capsys):
    _write_log(tmp_path / "run", _run_records()[:2])
    with open(tmp_path / "run" / "metrics.jsonl", "a") as log:
        log.write('{"step": 10, "loss": 0.')  # a half-written last line
    with pytest.raises(ValueError, match=r"metrics.jsonl:3: not a JSON record"):
        plots.read_metrics(tmp_path / "run")
    _write_log(tmp_path / "evals_only", [{"step": 5, "eval/zeroshot/a/top1": 10.0}])
    with pytest.raises(ValueError, match="no training records"):
        plots.plot_training_curves(tmp_path / "evals_only")
    assert plots.main([str(tmp_path / "missing")]) == 2
    assert "no metrics log" in capsys.readouterr().err


def test_a_short_run_shows_its_points_and_says_why_a_panel_is_empty(tmp_path, monkeypatch):
    """One logged step: drawn with a marker (a line through one point draws nothing); empty panels say why."""
    drawn, empty = [], []
    draw, say_empty = plots._draw, plots._say_empty

    def spy(axis, steps, values, *args, **style):
        count = draw(axis, steps, values, *args, **style)
        drawn.append((count, axis.lines[-1].get_marker() if count else None))
        return count

    monkeypatch.setattr(plots, "_draw", spy)
    monkeypatch.setattr(plots, "_say_empty", lambda axis, count, why: (count or empty.append(why), say_empty(axis, count, why)))
    _write_log(tmp_path / "run", [{"step": 1, "loss": 2.0, "learning_rate": 1e-4, "grad_norm": None}])
    plots.plot_training_curves(tmp_path / "run")
    assert drawn[:2] == [(1, "o"), (1, "o")] and (0, None) in drawn  # loss, learning rate; no grad_norm
    assert empty[0] == "no finite gradient norm or logit scale logged" and empty[1].startswith("no evaluation in this run")
