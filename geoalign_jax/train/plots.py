"""Training curves of a run as one PNG: every loss term, the learning rate, gradient norm and temperature, and
the evaluation metrics over steps, read from WORKDIR/metrics.jsonl (what `metrics.MetricsWriter` appends).

    python -m geoalign_jax.train.plots WORKDIR [--out PNG]      # default WORKDIR/training_curves.png
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
from typing import Mapping, Sequence

from geoalign_jax.eval.plots import pyplot
from geoalign_jax.train.metrics import METRICS_FILE

CURVES_FILE = "training_curves.png"
# Evaluation metrics worth a curve (the rest of eval/... are counts and per-class values).
_EVAL_SUFFIXES = ("/top1", "/mean_recall")


def read_metrics(path: str | pathlib.Path) -> list[dict[str, float]]:
    """The records of a metrics.jsonl (a workdir or the file), in step order. A line that is not a JSON object
    with a "step" is an error naming the file and line (a half-written last line included)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics log (a trainer workdir has {METRICS_FILE} after its first logged step)")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON record ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}:{number}: a record needs an integer 'step'")
        records.append(record)
    return sorted(records, key=lambda record: record["step"])


def _series(records: Sequence[Mapping[str, float]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
    return [step for step, _ in points], [value for _, value in points]


def _draw(axis, steps: list[int], values: list[float], *args, **style) -> int:
    """Plots a series; a short one (a run of a few logged steps) with markers, since a line through one point
    draws nothing. Returns the number of points drawn."""
    if not values:
        return 0
    if len(values) < 3:
        style.setdefault("marker", "o")
    axis.plot(steps, values, *args, **style)
    return len(values)


def _say_empty(axis, drawn: int, why: str) -> None:
    """A panel with nothing to draw says why, instead of showing empty axes."""
    if not drawn:
        axis.text(0.5, 0.5, why, ha="center", va="center", transform=axis.transAxes, fontsize=9, color="gray")


def eval_keys(records: Sequence[Mapping[str, float]]) -> list[str]:
    """The headline evaluation metrics logged by the run (eval/.../top1, eval/.../mean_recall)."""
    keys = {key for record in records for key in record if key.startswith("eval/") and key.endswith(_EVAL_SUFFIXES)}
    return sorted(keys)


def plot_training_curves(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None, *,
                         chance: Mapping[str, float] | None = None, title: str | None = None) -> pathlib.Path:
    """Writes the curves of the run in `workdir` (or of a metrics.jsonl) to `out` (default
    WORKDIR/training_curves.png) and returns the path. `chance`: evaluation key (without "eval/") -> the
    chance level, drawn as a dashed line in the metric's colour."""
    source = pathlib.Path(workdir)
    records = read_metrics(source)
    train = [r for r in records if "loss" in r]
    if not train:
        raise ValueError(f"{source}: no training records (with a 'loss') to plot")
    run_dir = source if source.is_dir() else source.parent
    out = pathlib.Path(out) if out is not None else run_dir / CURVES_FILE
    plt = pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    losses, schedule, health, evaluation = axes.ravel()

    terms = sorted({key for record in train for key in record if key.endswith("/loss")})
    drawn = _draw(losses, *_series(train, "loss"), color="black", linewidth=2, label="total (weighted)")
    for term in terms:
        steps, values = _series(train, term)
        if values and min(values) > 0:
            drawn += _draw(losses, steps, values, label=term.removesuffix("/loss"))
    _say_empty(losses, drawn, "no finite loss logged (every logged step was skipped as non-finite)")
    losses.set_yscale("log")
    losses.set_title("loss terms (unweighted)", fontsize=10)
    losses.legend(fontsize=7, ncol=2)

    _say_empty(schedule, _draw(schedule, *_series(train, "learning_rate"), color="tab:purple"),
               "no learning rate logged")
    schedule.set_title("learning rate", fontsize=10)
    schedule.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    drawn = 0
    for key, colour in (("grad_norm", "tab:red"), ("logit_scale", "tab:green")):
        drawn += _draw(health, *_series(train, key), color=colour,
                       label=key + (" (exp, the temperature's inverse)" if key == "logit_scale" else ""))
    _say_empty(health, drawn, "no finite gradient norm or logit scale logged")
    health.set_yscale("log")
    health.set_title("gradient norm (before clipping) and logit scale", fontsize=10)
    if drawn:
        health.legend(fontsize=7)

    keys = eval_keys(records)
    for index, key in enumerate(keys):
        steps, values = _series(records, key)
        colour = f"C{index % 10}"
        name = key.removeprefix("eval/")
        _draw(evaluation, steps, values, color=colour, marker="o", markersize=3, label=name)
        if chance and name in chance:
            evaluation.axhline(chance[name], color=colour, linestyle="--", linewidth=1)
    evaluation.set_ylim(0, 100)
    evaluation.set_title("evaluation (%)" + (", dashed: chance" if chance else "") if keys else
                         "evaluation: none logged (config.eval.tasks)", fontsize=10)
    if keys:
        evaluation.legend(fontsize=7)
    _say_empty(evaluation, len(keys), "no evaluation in this run (config.eval.tasks is empty)\nor none reached yet "
               "(config.eval.every_steps)")

    for axis in axes.ravel():
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.suptitle(title or str(run_dir), fontsize=11)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m geoalign_jax.train.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", help="a trainer workdir (or its metrics.jsonl)")
    parser.add_argument("--out", help=f"PNG to write (default WORKDIR/{CURVES_FILE})")
    args = parser.parse_args(argv)
    try:
        path = plot_training_curves(args.workdir, args.out)
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
