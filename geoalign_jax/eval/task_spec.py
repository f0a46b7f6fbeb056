"""What an evaluation task is: ``TaskSpec`` (kind, name, data path, options, checked when built), the task
syntax of the CLI and ``parse_task`` and ``TaskError`` (a task that cannot be run; the message names it).

Task syntax: ``KIND:NAME=PATH[,key=value...]`` with KIND in zeroshot, retrieval, regions, segmentation
(SegEarth-OV's protocol on a ``prepare segmentation`` folder, options: see ``seg_task``); keys: ``split``,
``limit`` (first N images), ``templates`` (farslip | rs | single), ``dataset`` (class table for zero-shot
prompts, default NAME), ``protocol`` (retrieval: standard | skyscript | skyscript-raw | both), ``methods``
(regions: crop+roi, crop, roi), ``text`` (retrieval: short | long, see ``long_text``), ``split_by`` (a training
split evaluated because a paper's authors do, see ``benchmark_root``); a PATH that is a CSV file (FarSLIP /
SkyScript layout, ``label_csv``) also takes ``classnames``, ``image_root`` and ``caption_column``.
``runner`` re-exports every name here.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from geoalign_jax.eval import benchmark_root, long_text, prompts, regions, retrieval, segmentation

TASK_KINDS = ("zeroshot", "retrieval", "regions", "segmentation")
_TASK_KEYS = {
    "zeroshot": {"split", "limit", "templates", "dataset", "classnames", "image_root", "split_by"},
    "retrieval": {"split", "limit", "protocol", "text", "caption_column", "image_root", "split_by"},
    "regions": {"split", "limit", "templates", "methods"},
    "segmentation": {"split", "limit", *segmentation.OPTION_NAMES},
}


class TaskError(ValueError):
    """A task description that cannot be run; the message names the task."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One evaluation: what kind, a name for the results, where the data are, and options."""

    kind: str
    name: str
    path: str
    split: str | None = None
    limit: int | None = None
    templates: str = prompts.DEFAULT_TEMPLATE_SET
    dataset: str | None = None
    protocol: str = "standard"
    methods: tuple[str, ...] = regions.REGION_METHODS
    # segmentation: its protocol options as given (key, value strings), defaults from the data's preset
    options: tuple[tuple[str, str], ...] = ()
    classnames: str | None = None  # label-column CSV: its classnames.txt (label_csv)
    image_root: str | None = None  # CSV: folder the image paths are relative to (default: the CSV's folder)
    caption_column: str | None = None  # caption CSV: the caption column (default "title")
    split_by: str | None = None  # whose split choice this is: a key of benchmark_root.SPLIT_CHOICES
    text: str = "short"  # retrieval: "short" (captions) or "long" (long_caption)

    def __post_init__(self) -> None:
        task = f"task {self.kind}:{self.name}"
        if self.kind not in TASK_KINDS:
            raise TaskError(f"{task}: unknown kind {self.kind!r} (known: {', '.join(TASK_KINDS)})")
        if not self.name or any(ch in self.name for ch in "/ "):
            raise TaskError(f"task name {self.name!r} must be non-empty without '/' or spaces")
        if self.limit is not None and self.limit < 1:
            raise TaskError(f"{task}: limit must be >= 1, got {self.limit}")
        if self.templates not in prompts.TEMPLATE_SETS:
            raise TaskError(f"{task}: unknown templates {self.templates!r} "
                            f"(known: {', '.join(sorted(prompts.TEMPLATE_SETS))})")
        if self.kind == "retrieval":
            for protocol in self.protocols:
                try:
                    retrieval.get_protocol(protocol)
                except ValueError as error:
                    raise TaskError(f"{task}: {error}") from None
        try:  # segmentation options are read when the task runs (the data's preset fills defaults): check now
            segmentation.make_options(dict(self.options)) if self.kind == "segmentation" else None
        except ValueError as error:
            raise TaskError(f"{task}: {error}") from None
        if self.split_by is not None and self.split_by not in benchmark_root.SPLIT_CHOICES:
            raise TaskError(f"{task}: split_by must be one of {sorted(benchmark_root.SPLIT_CHOICES)}, "
                            f"got {self.split_by!r}")
        if self.text not in long_text.TEXT_KINDS:
            raise TaskError(f"{task}: text must be one of {long_text.TEXT_KINDS}, got {self.text!r}")
        bad_methods = [m for m in self.methods if m not in regions.REGION_METHODS]
        if bad_methods or not self.methods:
            raise TaskError(f"{task}: methods must be among {regions.REGION_METHODS}, got {self.methods}")

    @property
    def protocols(self) -> tuple[str, ...]:
        return ("standard", "skyscript") if self.protocol == "both" else (self.protocol,)

    @property
    def prefix(self) -> str:
        return f"{self.kind}/{self.name}"


def parse_task(text: str) -> TaskSpec:
    """``KIND:NAME=PATH[,key=value...]`` -> TaskSpec, with errors that quote the offending task."""
    head, sep, rest = text.partition(":")
    if not sep:
        raise TaskError(f"task {text!r}: expected KIND:NAME=PATH[,key=value...], e.g. zeroshot:aid=/data/aid")
    kind = head.strip()
    if kind not in TASK_KINDS:
        raise TaskError(f"task {text!r}: unknown kind {kind!r} (known: {', '.join(TASK_KINDS)})")
    name, sep, rest = rest.partition("=")
    if not sep or not rest:
        raise TaskError(f"task {text!r}: missing '=PATH' after the task name")
    path, *options = rest.split(",")
    kwargs: dict[str, Any] = {}
    for option in options:
        key, sep, value = option.partition("=")
        key = key.strip()
        if not sep:
            raise TaskError(f"task {text!r}: option {option!r} is not key=value")
        if key not in _TASK_KEYS[kind]:
            raise TaskError(f"task {text!r}: unknown option {key!r} for {kind} (known: {sorted(_TASK_KEYS[kind])})")
        if kind == "segmentation" and key not in ("split", "limit"):
            kwargs["options"] = kwargs.get("options", ()) + ((key, value.strip()),)
        elif key == "limit":
            try:
                kwargs[key] = int(value)
            except ValueError:
                raise TaskError(f"task {text!r}: limit must be an integer, got {value!r}") from None
        elif key == "methods":
            kwargs[key] = tuple(m for m in value.replace("+", " ").split() if m)
        else:
            kwargs[key] = value
    return TaskSpec(kind=kind, name=name.strip(), path=path.strip(), **kwargs)
