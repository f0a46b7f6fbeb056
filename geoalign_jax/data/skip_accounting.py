"""Skip accounting of dataset preparation: the reasons an input or annotation is dropped (shared words for
reports and tests), one `Skip`, the per-reason `SkipLog`, and the error a preparation raises past its allowed
bad fraction. Every format skips, counts and names the file the same way."""
from __future__ import annotations

import dataclasses
from collections import Counter, defaultdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from geoalign_jax.data.writers import ConversionSummary

# ---------------------------------------------------------------------------------------------------------
# Skip bookkeeping

RECORD = "record"  # a whole input (image / line) was dropped
ANNOTATION = "annotation"  # one caption, region or hard negative of a kept record was dropped

# Reasons shared by every prepare format, so reports and tests use the same words.
UNKNOWN_FILE = "missing image"  # the image file the annotation names does not exist
BROKEN_IMAGE = "broken image"
UNSUPPORTED_IMAGE_MODE = "unsupported image mode"
EMPTY_CAPTION = "empty caption"
NO_CAPTIONS = "no captions"
NO_TEXT = "no text"
BOX_OUTSIDE_IMAGE = "box outside image"
DEGENERATE_BOX = "degenerate box"
REGION_WITHOUT_TEXT = "region without text"
MALFORMED_LINE = "malformed line"
MALFORMED_ANNOTATION = "malformed annotation"
DUPLICATE_ID = "duplicate id"
SIZE_MISMATCH = "image size differs from annotation"
UNKNOWN_CATEGORY = "unknown category"
UNKNOWN_IMAGE_ID = "unknown image id"
INVALID_RECORD = "invalid record"
NOT_AN_IMAGE_FILE = "not an image file"
NO_LABEL_FILE = "no label file"


@dataclasses.dataclass(frozen=True)
class Skip:
    """One dropped input or annotation: why, which file (and line/index), and whether a record or annotation."""

    reason: str
    name: str
    kind: str = RECORD


class ConversionError(RuntimeError):
    """A conversion that found more bad input than allowed, or a configuration it cannot use."""

    def __init__(self, message: str, summary: "ConversionSummary | None" = None):
        super().__init__(message)
        self.summary = summary


@dataclasses.dataclass
class SkipLog:
    """Counts of skips per reason and kind, with the first few file names per reason for the report."""

    max_examples: int = 10
    counts: Counter = dataclasses.field(default_factory=Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=lambda: defaultdict(list))
    records_seen: int = 0
    records_skipped: int = 0
    annotations_seen: int = 0
    annotations_skipped: int = 0

    def add(self, skip: Skip) -> None:
        self.counts[skip.reason] += 1
        if len(self.examples[skip.reason]) < self.max_examples:
            self.examples[skip.reason].append(skip.name)
        if skip.kind == RECORD:
            self.records_skipped += 1
        else:
            self.annotations_skipped += 1

    def add_input(self, skip: Skip | None = None) -> None:
        """Count one input (image, line) the parent looked at; with `skip`, it was dropped before building."""
        self.records_seen += 1
        if skip is not None:
            self.add(skip)

    def record_fraction(self) -> float:
        return self.records_skipped / self.records_seen if self.records_seen else 0.0

    def annotation_fraction(self) -> float:
        return self.annotations_skipped / self.annotations_seen if self.annotations_seen else 0.0
