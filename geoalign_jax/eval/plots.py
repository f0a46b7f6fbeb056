"""PNG plots of an evaluation report: per-class accuracy bars and recall@k curves (matplotlib, Agg)."""
from __future__ import annotations

import pathlib
from typing import Any

import numpy as np


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _file_name(prefix: str, suffix: str) -> str:
    return prefix.replace("/", "_") + f"_{suffix}.png"


def plot_per_class(path: pathlib.Path, title: str, class_ids: list[str], accuracy: list[float]) -> pathlib.Path:
    """Horizontal bars, one per class, sorted from best to worst (NaN classes left out)."""
    plt = pyplot()
    values = np.asarray(accuracy, dtype=float)
    keep = ~np.isnan(values)
    order = np.argsort(-values[keep], kind="stable")
    names = [name for name, k in zip(class_ids, keep) if k]
    names = [names[i] for i in order]
    values = values[keep][order]
    figure, axes = plt.subplots(figsize=(7, max(2.5, 0.22 * len(names) + 1)))
    axes.barh(range(len(names)), values, color="tab:blue")
    axes.set_yticks(range(len(names)), names, fontsize=7)
    axes.invert_yaxis()
    axes.set_xlim(0, 100)
    axes.set_xlabel("top-1 accuracy (%)")
    axes.axvline(float(np.mean(values)) if len(values) else 0.0, color="tab:red", linestyle="--", linewidth=1,
                 label="mean per class")
    axes.legend(loc="lower right", fontsize=7)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_recall(path: pathlib.Path, title: str, protocols: dict[str, dict[str, list[float]]]) -> pathlib.Path:
    """Recall@k against k for each direction and protocol."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5.5, 4))
    for protocol, curves in protocols.items():
        for direction, style in (("i2t", "-o"), ("t2i", "--s")):
            axes.plot(curves["ks"], curves[direction], style, label=f"{protocol} {direction}")
    axes.set_xscale("log")
    axes.set_xlabel("k")
    axes.set_ylabel("recall@k (%)")
    axes.set_ylim(0, 100)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_plots(details: dict[str, dict[str, Any]], out_dir: str | pathlib.Path) -> list[pathlib.Path]:
    """All plots of a report's details into ``out_dir``; returns the files written."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for prefix, detail in details.items():
        if detail["kind"] == "zeroshot":
            written.append(plot_per_class(out / _file_name(prefix, "per_class"), f"{prefix} ({detail['templates']})",
                                          detail["class_ids"], detail["per_class_accuracy"]))
        elif detail["kind"] == "retrieval":
            written.append(plot_recall(out / _file_name(prefix, "recall"), prefix, detail["protocols"]))
        elif detail["kind"] == "segmentation":
            written.append(plot_per_class(out / _file_name(prefix, "per_class_iou"), f"{prefix} (IoU)",
                                          detail["class_names"], detail["per_class_iou"]))
        elif detail["kind"] == "regions":
            for method, accuracy in detail["methods"].items():
                written.append(plot_per_class(out / _file_name(prefix, f"{method}_per_class"),
                                              f"{prefix} ({method})", detail["class_ids"], accuracy))
    return written
