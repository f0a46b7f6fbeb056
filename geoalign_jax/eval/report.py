"""Human-readable outputs of an evaluation: the printed table and results.json."""
from __future__ import annotations

import json
import pathlib
from typing import Any, Mapping, Sequence

from geoalign_jax.data import filesystem

_HEADLINE = ("top1", "top5", "mean_per_class", "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5",
             "t2i_R@10", "i2t_mean", "t2i_mean", "mean_recall", "mIoU", "mAcc", "aAcc")


def format_table(metrics: Mapping[str, float], notes: Mapping[str, Sequence[str]] | None = None) -> str:
    """One row per task (and protocol / method), the headline numbers as columns; per-class values omitted.

    notes: per task prefix ("retrieval/rsicd"), warnings printed under the table; the task's rows are
    marked with "!" so a number evaluated on a training split or on images seen in training is not
    mistaken for a clean test number."""
    notes = {prefix: list(lines) for prefix, lines in (notes or {}).items() if lines}
    rows: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        row, _, name = key.rpartition("/")
        if name in _HEADLINE and "/class/" not in key:
            rows.setdefault(row, {})[name] = value
    columns = [c for c in _HEADLINE if any(c in r for r in rows.values())]
    width = max([len("task")] + [len(r) for r in rows])
    widths = [max(len(c), 6) + 2 for c in columns]
    lines = ["task".ljust(width) + "".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    lines.append("-" * len(lines[0]))
    for row, values in rows.items():
        cells = "".join(f"{values[c]:>{w}.2f}" if c in values else " " * w for c, w in zip(columns, widths))
        flagged = any(row == prefix or row.startswith(prefix + "/") for prefix in notes)
        lines.append(row.ljust(width) + cells + ("  !" if flagged else ""))
    for prefix, task_notes in notes.items():
        lines.extend(f"! {prefix}: {note}" for note in task_notes)
    return "\n".join(lines)


def write_results(path: str | pathlib.Path, metrics: Mapping[str, float], details: Mapping[str, Any],
                  run_info: Mapping[str, Any], *, provenance: Mapping[str, Any] | None = None,
                  notes: Mapping[str, Sequence[str]] | None = None) -> pathlib.Path:
    """results.json: {"run": how it was run, "metrics": flat dict, "details": per-task arrays, "provenance":
    model, software and per-task data hashes (``eval.provenance``), "notes": per-task warnings}."""
    path = filesystem.path(path)  # a folder, or gs:// (a trainer's workdir in a bucket)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = _finite_or_none({"run": dict(run_info), "metrics": dict(metrics), "details": dict(details),
                               "provenance": dict(provenance or {}),
                               "notes": {prefix: list(lines) for prefix, lines in (notes or {}).items()}})
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, allow_nan=False, default=_json_default) + "\n")
    return path


def _finite_or_none(value: Any) -> Any:
    """NaN (a class with no samples) becomes null: JSON has no NaN, and readers must not see a number."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(item) for item in value]
    return value


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
