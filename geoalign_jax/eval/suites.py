"""One command per paper table: ``evaluate --suite farslip|geoalignclip|dgtrs --benchmark-root DIR``.

A suite finds, under the benchmark root, the data of every task its paper reports (``discover``), runs the
ones present (each on its own, so one unreadable set does not cost the others: ``run_suite``) and writes
``table.md`` (``format_tables``): the paper's tables in its layout, its published numbers for its own
model beside ours, each table citing its source (``paper_tables``). A task whose data are absent, or whose
kind geoalign-jax does not implement, is listed by name with the reason.

Benchmark root layout (every part optional):

- FarSLIP's zero-shot and retrieval CSVs, as ``benchmark_root`` describes (``aid/aid_img_txt_pairs_test.csv``,
  ``retrieval/RSICD/RSICD_img_txt_pairs_test.csv``, ...);
- converted record folders (``python -m geoalign_jax.prepare``) named ``rsitmd``, ``rsicd`` (Karpathy JSON,
  standard protocol, test split), ``nwpu_vhr10``, ``rrsis_d`` (regions), ``dgtrsd`` (records with
  ``long_caption``: long-text retrieval);
- ``segmentation/<preset>`` segmentation folders (``python -m geoalign_jax.prepare segmentation --preset
  <preset>``; OVSS, SegEarth-OV's protocol with the preset's settings, mIoU in the OVSS table).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
from typing import Any, Callable, Mapping, Sequence

from geoalign_jax.eval import benchmark_root, datasets, paper_tables, runner, seg_data

log = logging.getLogger(__name__)

Discovery = tuple[list[runner.TaskSpec], dict[str, str]]


@dataclasses.dataclass(frozen=True)
class Suite:
    name: str
    paper: str
    tables: tuple[paper_tables.PaperTable, ...]
    discover: Callable[[pathlib.Path], Discovery]
    not_implemented: Mapping[str, str] = dataclasses.field(default_factory=dict)  # paper task -> why not run


def _record_task(root: pathlib.Path, folder: str, kind: str, name: str, **options: Any
                 ) -> tuple[runner.TaskSpec | None, str | None]:
    path = root / folder
    if not datasets.is_record_dir(path):
        return None, f"not in the benchmark root ({folder}/manifest.json not found)"
    return runner.TaskSpec(kind=kind, name=name, path=str(path), **options), None


def _standard_retrieval(root: pathlib.Path, key: str) -> tuple[runner.TaskSpec | None, str | None]:
    """RSITMD / RSICD under the standard protocol: a record folder ``root/<key>`` (test split), else
    FarSLIP's test CSV of the same set."""
    spec, why = _record_task(root, key, "retrieval", key, split="test", protocol="standard")
    if spec is not None:
        return spec, None
    caption_set = next(s for s in benchmark_root.RETRIEVAL_SETS if s.key == key)
    csv = root / caption_set.csv
    if csv.is_file():
        return runner.TaskSpec(kind="retrieval", name=key, path=str(csv), protocol="standard",
                                image_root=str(root / caption_set.image_root),
                                caption_column=caption_set.caption_column), None
    return None, f"{why}; nor {caption_set.csv}"


def _add(specs: list[runner.TaskSpec], skipped: dict[str, str], prefix: str, spec: runner.TaskSpec | None,
         why: str | None) -> None:
    if spec is not None:
        specs.append(spec)
    else:
        skipped[prefix] = str(why)


def _segmentation_tasks(root: pathlib.Path) -> Discovery:
    """OVSS tasks from ``root/segmentation/<preset>`` (``prepare segmentation --preset <preset>``), each run
    with its preset's protocol (SegEarth-OV's defaults, as FarSLIP reports them). A folder prepared with
    another preset is skipped, so its mIoU never lands in the wrong column."""
    specs, skipped = [], {}
    for name in (column.metric.split("/")[1] for column in paper_tables.OVSS_COLUMNS):
        path = root / "segmentation" / name
        if not path.is_dir():
            skipped[f"segmentation/{name}"] = f"not in the benchmark root (segmentation/{name} not found)"
            continue
        try:
            preset = seg_data.read_manifest(path).get("preset")
        except datasets.EvalDataError:
            preset = None  # the run reports the folder's problem as failed, naming the file
        if preset not in (None, name):
            skipped[f"segmentation/{name}"] = f"segmentation/{name} was prepared with preset {preset!r}, not {name!r}"
            continue
        specs.append(runner.TaskSpec(kind="segmentation", name=name, path=str(path)))
    return specs, skipped


def _farslip(root: pathlib.Path) -> Discovery:
    fields, skipped = benchmark_root.farslip_tasks(root)
    specs = [runner.TaskSpec(**task) for task in fields]
    seg_specs, seg_skipped = _segmentation_tasks(root)
    return specs + seg_specs, {**skipped, **seg_skipped}


def _geoalignclip(root: pathlib.Path) -> Discovery:
    specs, skipped = [], {}
    for key in ("rsitmd", "rsicd"):
        spec, why = _standard_retrieval(root, key)
        _add(specs, skipped, f"retrieval/{key}", spec, why)
    for folder in ("nwpu_vhr10", "rrsis_d"):
        spec, why = _record_task(root, folder, "regions", folder, methods=("roi",))
        _add(specs, skipped, f"regions/{folder}", spec, why)
    return specs, skipped


def _dgtrs(root: pathlib.Path) -> Discovery:
    specs, skipped = [], {}
    spec, why = _record_task(root, "dgtrsd", "retrieval", "dgtrsd_long", split="test", protocol="standard",
                             text="long")
    _add(specs, skipped, "retrieval/dgtrsd_long", spec, why)
    for key in ("rsitmd", "rsicd"):
        spec, why = _standard_retrieval(root, key)
        _add(specs, skipped, f"retrieval/{key}", spec, why)
    fields, zs_skipped = benchmark_root.farslip_tasks(root)
    specs += [runner.TaskSpec(**task) for task in fields if task["kind"] == "zeroshot"]
    skipped.update({key: why for key, why in zs_skipped.items() if key.startswith("zeroshot/")})
    return specs, skipped


SUITES: dict[str, Suite] = {
    "farslip": Suite("farslip", "FarSLIP (arXiv 2511.14901)",
                     (paper_tables.FARSLIP_OVSS, paper_tables.FARSLIP_ZEROSHOT, paper_tables.FARSLIP_RETRIEVAL),
                     _farslip),
    "geoalignclip": Suite("geoalignclip", "GeoAlignCLIP (arXiv 2603.09566)",
                          (paper_tables.GEOALIGNCLIP_RETRIEVAL, paper_tables.GEOALIGNCLIP_REGIONS), _geoalignclip,
                          {"CHOICE / RRSIS-HR fine-grained understanding": "task kind not implemented in geoalign-jax",
                           "DOTA / DIOR object detection": "task kind not implemented in geoalign-jax"}),
    "dgtrs": Suite("dgtrs", "DGTRS-CLIP (arXiv 2503.19311)",
                   (paper_tables.DGTRS_LONG, paper_tables.DGTRS_SHORT, paper_tables.DGTRS_ZEROSHOT), _dgtrs,
                   {"semantic localization (SeLo)": "task kind not implemented in geoalign-jax"}),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise runner.TaskError(f"unknown suite {name!r} (known: {', '.join(SUITES)})")
    return SUITES[name]


def discover(name: str, root: str | pathlib.Path) -> Discovery:
    """(tasks to run, {task prefix: why it is skipped}) of a suite on a benchmark root."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise runner.TaskError(f"benchmark root not found: {root}")
    return get_suite(name).discover(root)


@dataclasses.dataclass
class SuiteResult:
    report: runner.EvalReport
    skipped: dict[str, str]  # task prefix -> why it was not run (absent data, unknown kind, failed)


def run_suite(specs: Sequence[runner.TaskSpec], skipped: Mapping[str, str], *, model_config: Any = None,
              params: Any = None, **run_options: Any) -> SuiteResult:
    """Run each task on its own with ``runner.run_tasks`` (the embedder's compiled functions are shared),
    so a set that cannot be read is reported as skipped with its error rather than stopping the suite."""
    merged = runner.EvalReport({}, {}, {"tasks": {}}, {})
    skipped = dict(skipped)
    for spec in specs:
        try:
            report = runner.run_tasks(model_config, params, [spec], describe_model=False, **run_options)
        except runner.TaskError as error:
            log.error("%s: %s", spec.prefix, error)
            skipped[spec.prefix] = f"failed: {error}"
            continue
        merged.metrics.update(report.metrics)
        merged.details.update(report.details)
        merged.notes.update(report.notes)
        merged.provenance["tasks"].update(report.provenance["tasks"])
        merged.provenance["software"] = report.provenance["software"]
    from geoalign_jax.eval import provenance

    merged.provenance["model"] = provenance.model_provenance(model_config, params, run_options.get("embedder"))
    return SuiteResult(merged, skipped)


def _cell(value: float | None) -> str:
    return paper_tables.NOT_READ if value is None else f"{value:.2f}"


def _our_cells(table: paper_tables.PaperTable, metrics: Mapping[str, float], skipped: Mapping[str, str]
               ) -> list[str]:
    cells, values = [], []
    for column in table.columns:
        value = metrics.get(column.metric)
        if value is None:
            reason = skipped.get(column.task, "")
            cells.append("failed" if reason.startswith("failed") else "skipped" if reason else "not run")
        else:
            cells.append(f"{value:.2f}")
            values.append(value)
    if table.mean:
        if len(values) == len(table.columns) and all(math.isfinite(v) for v in values):
            cells.append(f"{sum(values) / len(values):.2f}")
        else:
            cells.append(f"n/a ({len(values)} of {len(table.columns)} run)")
    return cells


def format_tables(suite: Suite, metrics: Mapping[str, float], skipped: Mapping[str, str],
                  notes: Mapping[str, Sequence[str]], weights: str) -> str:
    """table.md: per paper table, its published rows and ours, the source, and what was skipped and why."""
    lines = [f"# {suite.paper}: published numbers and ours", "",
             f"Ours: {weights}. Published rows are the paper's own model, cited from the source under each table; "
             f"'{paper_tables.NOT_READ}' marks a number the sources read do not give.", ""]
    for table in suite.tables:
        header = [column.label for column in table.columns] + (["Mean"] if table.mean else [])
        lines += [f"## {table.title}", "", "| Model | " + " | ".join(header) + " |",
                  "|---|" + "---|" * len(header)]
        for row in table.published:
            lines.append(f"| {row.label} (published) | " + " | ".join(_cell(v) for v in row.values) + " |")
        lines.append("| ours | " + " | ".join(_our_cells(table, metrics, skipped)) + " |")
        lines += ["", f"Source: {table.source}."]
        if table.note:
            lines.append(f"Note: {table.note}")
        for task in dict.fromkeys(column.task for column in table.columns):  # each task once, in column order
            if task in skipped:
                lines.append(f"- {task}: {skipped[task]}")
            lines += [f"- {task}: {note}" for note in notes.get(task, [])]
        lines.append("")
    shown = {column.task for table in suite.tables for column in table.columns}
    extra = {prefix: why for prefix, why in skipped.items() if prefix not in shown}
    if suite.not_implemented or extra:
        lines += ["## Not run", ""]
        lines += [f"- {task}: {why}" for task, why in suite.not_implemented.items()]
        lines += [f"- {prefix}: {why}" for prefix, why in extra.items()]
        lines.append("")
    ran = sorted({"/".join(key.split("/")[:2]) for key in metrics} - shown)
    if ran:
        lines += ["Also evaluated (no published number): " + ", ".join(ran) + " (see results.json).", ""]
    return "\n".join(lines)
