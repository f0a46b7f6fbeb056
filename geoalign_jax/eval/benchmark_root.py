"""FarSLIP's benchmark root read as it is laid out, and whose split choice a task follows.

FarSLIP (NJU-LHRS/FarSLIP @ d32ef2c) evaluates zero-shot classification on SkyScript's benchmark folders
(``open_clip_train/benchmark_dataset_info.py``): per dataset a CSV with ``filepath`` and integer ``label``
columns (separator ``,``) and a ``classnames.txt``, image paths relative to the benchmark root. Four of the
eight sets are read on their *train* CSV; that is the authors' choice, and a number reproduced from it is
recorded as such (``SPLIT_CHOICES``, ``authors_split_note``): the train-split guard of ``runner.split_guard``
accepts it because the task names whose choice it is (``split_by=farslip``), not because the guard is off.

Retrieval (``tests/test_retrieval.py``): CSVs with ``filepath`` and ``title`` under one retrieval image
root (RSICD, RSITMD, ucmcaptions), and SkyScript's ``title_multi_objects`` CSV under its own root. In a
benchmark root they are expected at ``retrieval/`` and ``skyscript/`` (``RETRIEVAL_SETS``).

``farslip_tasks(root)`` returns the tasks the root allows and, by name, the datasets it lacks.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any

from geoalign_jax.eval import label_csv

log = logging.getLogger(__name__)

FARSLIP_SOURCE = "FarSLIP open_clip_train/benchmark_dataset_info.py (github.com/NJU-LHRS/FarSLIP @ d32ef2c)"

#: Whose split choice a task may follow (``split_by=KEY``), with the source that documents it.
SPLIT_CHOICES: dict[str, str] = {"farslip": FARSLIP_SOURCE}


@dataclasses.dataclass(frozen=True)
class ClassificationSet:
    """One of FarSLIP's zero-shot datasets: its key, the CSV and class list relative to the root."""

    key: str
    csv: str
    classnames: str

    @property
    def split(self) -> str | None:
        return label_csv.split_of_file(self.csv)


#: benchmark_dataset_info.py, in the order of FarSLIP's table (tests/test_scene_classification.py).
FARSLIP_CLASSIFICATION: tuple[ClassificationSet, ...] = (
    ClassificationSet("SkyScript_cls", "SkyScript_cls/img_txt_pairs_val.csv", "SkyScript_cls/classnames.txt"),
    ClassificationSet("aid", "aid/aid_img_txt_pairs_test.csv", "aid/classnames.txt"),
    ClassificationSet("eurosat", "eurosat/eurosat_img_txt_pairs_test.csv", "eurosat/classnames.txt"),
    ClassificationSet("fmow", "fmow/fmow_img_txt_pairs_val.csv", "fmow/classnames.txt"),
    ClassificationSet("millionaid", "millionaid/img_txt_pairs_train.csv", "millionaid/classnames.txt"),
    ClassificationSet("patternnet", "patternnet/img_txt_pairs_train.csv", "patternnet/classnames.txt"),
    ClassificationSet("nwpu", "nwpu/img_txt_pairs_train.csv", "nwpu/classnames.txt"),
    ClassificationSet("rsicb", "rsicb256/img_txt_pairs_train.csv", "rsicb256/classnames.txt"),
)


@dataclasses.dataclass(frozen=True)
class CaptionSet:
    """One of FarSLIP's retrieval CSVs: its key, path and image root relative to the benchmark root, the
    caption column and the protocol FarSLIP scores it with (``skyscript``: 'a satellite image. ' prefix;
    ``skyscript-raw``: no prefix, as FarSLIP does for SkyScript retrieval)."""

    key: str
    csv: str
    image_root: str
    caption_column: str
    protocol: str


RETRIEVAL_SETS: tuple[CaptionSet, ...] = (
    CaptionSet("rsicd", "retrieval/RSICD/RSICD_img_txt_pairs_test.csv", "retrieval", "title", "skyscript"),
    CaptionSet("rsitmd", "retrieval/RSITMD/RSITMD_img_txt_pairs_test.csv", "retrieval", "title", "skyscript"),
    CaptionSet("ucm", "retrieval/ucmcaptions/ucmcaptions_img_txt_pairs_test.csv", "retrieval", "title",
               "skyscript"),
    CaptionSet("skyscript", "skyscript/SkyScript_test_30K_filtered_by_CLIP_openai.csv", "skyscript",
               "title_multi_objects", "skyscript-raw"),
)


#: FarSLIP dataset key -> the class table shipped in ``eval.classnames`` (SkyScript_cls has none: no source
#: of its 70 classes was found outside the benchmark download, so its own classnames.txt is used unchecked).
SHIPPED_CLASS_TABLES = {"aid": "aid", "eurosat": "eurosat", "fmow": "fmow", "nwpu": "resisc45",
                        "patternnet": "patternnet", "millionaid": "millionaid", "rsicb": "rsicb256"}


def class_list_mismatch(dataset: str, names: list[str]) -> str | None:
    """Why a benchmark's class list does not match the class table shipped for that dataset (compared as sets
    of identifiers or of readable names, case and separators ignored), or None (also when none is shipped)."""
    from geoalign_jax.eval import classnames

    table = classnames.DATASET_CLASSES.get(SHIPPED_CLASS_TABLES.get(dataset, ""))
    if table is None:
        return None
    given = {classnames._fold(name) for name in names}
    if given in ({classnames._fold(k) for k in table}, {classnames._fold(v) for v in table.values()}):
        return None
    known = {classnames._fold(k) for k in table} | {classnames._fold(v) for v in table.values()}
    unknown = sorted(name for name in names if classnames._fold(name) not in known)
    return (f"its {len(names)} classes differ from the {len(table)} of the shipped {dataset} table"
            + (f" (not in it: {unknown[:5]})" if unknown else ""))


def _authors_files(split_by: str) -> tuple[str, ...]:
    """The files (relative to a benchmark root) whose split ``split_by``'s authors chose."""
    if split_by == "farslip":
        return tuple(entry.csv for entry in FARSLIP_CLASSIFICATION) + tuple(s.csv for s in RETRIEVAL_SETS)
    raise KeyError(split_by)


def authors_split_problem(split_by: str, path: str, split: str | None) -> str | None:
    """Why a task that says it follows ``split_by``'s split choice does not (its data are not one of the files
    those authors evaluate, or another split of it is asked), or None. Without this check ``split_by`` would
    let any training split past the guard."""
    parts = pathlib.PurePath(path).parts
    for relative in _authors_files(split_by):
        tail = pathlib.PurePosixPath(relative).parts
        if tuple(parts[-len(tail):]) == tail:
            chosen = label_csv.split_of_file(relative)
            return None if split == chosen else (f"the authors read {relative} as split {chosen!r}, "
                                                 f"this task asks for {split!r}")
    return (f"{path} is not one of the files whose split {SPLIT_CHOICES[split_by]} chose "
            f"({', '.join(_authors_files(split_by))})")


def authors_split_note(split_by: str, split: str) -> str:
    """The table note of a training split evaluated because the paper's authors evaluate it."""
    return (f"split {split!r} is a training split, evaluated because the authors do ({SPLIT_CHOICES[split_by]}): "
            "comparable with their table, not a held-out test")


def split_choice_record(split_by: str | None, split: str | None) -> dict[str, Any]:
    """results.json provenance of whose choice the evaluated split is."""
    if split_by is None:
        return {"by": "task", "split": split}
    return {"by": "authors", "authors": split_by, "source": SPLIT_CHOICES[split_by], "split": split}


def load_csv_task(spec: Any) -> Any:
    """The evaluation set of a task whose path is a CSV file (``runner._load``)."""
    from geoalign_jax.eval import datasets

    path = pathlib.Path(spec.path)
    if spec.kind == "zeroshot":
        names = spec.classnames or path.parent / "classnames.txt"
        if not pathlib.Path(names).is_file():
            raise datasets.EvalDataError(f"{path}: no class list: {names} not found (task option classnames=FILE)")
        class_names = label_csv.read_class_names(names)
        if (mismatch := class_list_mismatch(spec.name, class_names)) is not None:
            log.warning("%s: %s: %s", spec.name, names, mismatch)
        return label_csv.load_label_csv(path, class_names=class_names, image_root=spec.image_root,
                                        limit=spec.limit)
    if spec.kind == "retrieval":
        if spec.text != "short":
            raise datasets.EvalDataError(f"{path}: text={spec.text} needs records with long_caption; a caption "
                                         "CSV has one caption column (choose it with caption_column=...)")
        return label_csv.load_caption_csv(path, image_root=spec.image_root, limit=spec.limit,
                                          caption_column=spec.caption_column or "title")
    raise datasets.EvalDataError(f"{path}: {spec.kind} tasks read record folders, not CSV files")


def farslip_tasks(root: str | pathlib.Path) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(TaskSpec fields of each task, {dataset key: why it is skipped}) of a FarSLIP benchmark root: every
    zero-shot and retrieval set of FarSLIP's whose CSV is there, with FarSLIP's split choice."""
    root = pathlib.Path(root)
    tasks: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for entry in FARSLIP_CLASSIFICATION:
        csv = root / entry.csv
        if not csv.is_file():
            skipped[f"zeroshot/{entry.key}"] = f"not in the benchmark root ({entry.csv} not found)"
            continue
        tasks.append(dict(kind="zeroshot", name=entry.key, path=str(csv), classnames=str(root / entry.classnames),
                          image_root=str(root), templates="farslip", split_by="farslip"))
    for caption_set in RETRIEVAL_SETS:
        csv = root / caption_set.csv
        if not csv.is_file():
            skipped[f"retrieval/{caption_set.key}"] = f"not in the benchmark root ({caption_set.csv} not found)"
            continue
        tasks.append(dict(kind="retrieval", name=caption_set.key, path=str(csv),
                          image_root=str(root / caption_set.image_root), caption_column=caption_set.caption_column,
                          protocol=caption_set.protocol, split_by="farslip"))
    return tasks, skipped
