"""How many texts are longer than the text tower's context: token-length histograms and truncation fractions.

CLIP text towers read a fixed number of tokens (77; Long-CLIP 248) and the tokenizer cuts anything longer,
silently. `prepare` therefore counts each record's tokens per kind of text (``TEXT_KINDS``) and keep a
token-length histogram per split in the manifest (``text_tokens``), with the fractions above the usual
context lengths (``truncation``); the summary they print says the same. A histogram answers the question for
any context length later, so the training pipeline reports the fractions for its own config without reading
a single record (``pipeline_truncation_metrics``), and only scans the records of shards without a manifest.

Token counts include SOT and EOT (``tokenizer.count_tokens``): a text is truncated when its count exceeds
the context length. Captions are the texts the short-context tower reads as the image's caption: a record
without captions but with a long caption has its long caption read there too (cut at 77, the pipeline's
stand-in), so it is counted under both kinds. Region texts are the regions' free-text captions;
category-only regions get a short prompt ("a satellite image of {category}.") in the pipeline and are not
counted.
"""
from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from geoalign_jax import tokenizer

CAPTIONS = "captions"
LONG_CAPTION = "long_caption"
HARD_NEGATIVES = "hard_negatives"
REGION_CAPTIONS = "region_captions"
TEXT_KINDS = (CAPTIONS, LONG_CAPTION, HARD_NEGATIVES, REGION_CAPTIONS)
SHORT_CONTEXT_LENGTH = tokenizer.DEFAULT_CONTEXT_LENGTH  # 77
LONG_CONTEXT_LENGTH = 248  # Long-CLIP / DGTRS-CLIP
#: The context each kind of text is read with in training (long captions by the stretched Long-CLIP tower).
DEFAULT_CONTEXT_LENGTHS = {CAPTIONS: SHORT_CONTEXT_LENGTH, LONG_CAPTION: LONG_CONTEXT_LENGTH,
                           HARD_NEGATIVES: SHORT_CONTEXT_LENGTH, REGION_CAPTIONS: SHORT_CONTEXT_LENGTH}


def record_texts(record: Mapping[str, Any]) -> dict[str, list[str]]:
    """The texts of a record (or example dict) by kind; blank or missing texts are left out."""
    regions = record.get("regions") or []
    captions = [t for t in record.get("captions") or [] if isinstance(t, str) and t.strip()]
    if not captions and record.get("long_caption"):  # the pipeline's caption then (data/transforms.py)
        captions = [record["long_caption"]]
    texts = {
        CAPTIONS: captions,
        LONG_CAPTION: [record["long_caption"]] if record.get("long_caption") else [],
        HARD_NEGATIVES: list(record.get("hard_negatives") or []),
        REGION_CAPTIONS: [r["caption"] for r in regions if isinstance(r, Mapping) and r.get("caption")],
    }
    return {kind: [t for t in values if isinstance(t, str) and t.strip()] for kind, values in texts.items()}


def record_token_counts(record: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """Token count (with SOT and EOT) of every text of a record, by kind."""
    return {kind: tuple(tokenizer.count_tokens(text) for text in texts) for kind, texts in record_texts(record).items()}


@dataclasses.dataclass
class TokenHistogram:
    """Per kind of text, how many texts have each token count. Mergeable (``update``), JSON round-trip."""

    counts: dict[str, Counter] = dataclasses.field(default_factory=lambda: {kind: Counter() for kind in TEXT_KINDS})

    def add(self, token_counts: Mapping[str, Iterable[int]]) -> None:
        for kind, values in token_counts.items():
            self.counts.setdefault(kind, Counter()).update(int(v) for v in values)

    def add_record(self, record: Mapping[str, Any]) -> None:
        self.add(record_token_counts(record))

    def update(self, other: "TokenHistogram") -> None:
        for kind, counter in other.counts.items():
            self.counts.setdefault(kind, Counter()).update(counter)

    def num_texts(self, kind: str) -> int:
        return sum(self.counts.get(kind, Counter()).values())

    def num_longer_than(self, kind: str, context_length: int) -> int:
        return sum(count for length, count in self.counts.get(kind, Counter()).items() if length > context_length)

    def truncation(self, context_lengths: Mapping[str, int] | None = None) -> dict[str, dict[str, float]]:
        """Per kind with texts: {"texts", "truncated", "fraction", "context_length", "max_tokens"}."""
        context_lengths = dict(DEFAULT_CONTEXT_LENGTHS if context_lengths is None else context_lengths)
        result = {}
        for kind in TEXT_KINDS:
            total = self.num_texts(kind)
            if not total or kind not in context_lengths:
                continue
            truncated = self.num_longer_than(kind, context_lengths[kind])
            result[kind] = {"texts": total, "truncated": truncated, "fraction": truncated / total,
                            "context_length": int(context_lengths[kind]),
                            "max_tokens": max(self.counts[kind])}
        return result

    def to_json(self) -> dict[str, dict[str, Any]]:
        return {kind: {"texts": self.num_texts(kind),
                       "histogram": {str(length): count for length, count in sorted(self.counts[kind].items())}}
                for kind in TEXT_KINDS if self.num_texts(kind)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TokenHistogram":
        histogram = cls()
        for kind, entry in data.items():
            histogram.counts.setdefault(kind, Counter()).update(
                {int(length): int(count) for length, count in entry.get("histogram", {}).items()})
        return histogram


def format_truncation(histogram: TokenHistogram, context_lengths: Mapping[str, int] | None = None) -> str:
    """One line for summaries: 'captions 12 of 600 (2.0%) > 77 tokens; long_caption ...'."""
    parts = [f"{kind} {row['truncated']} of {row['texts']} ({row['fraction']:.1%}) > {row['context_length']} tokens"
             for kind, row in histogram.truncation(context_lengths).items()]
    return "; ".join(parts) if parts else "no texts"


def truncation_metrics(histogram: TokenHistogram, context_lengths: Mapping[str, int] | None = None,
                       prefix: str = "data/truncated") -> dict[str, float]:
    """Flat metrics for a training log: ``data/truncated/<kind>`` = fraction of those texts that are cut."""
    return {f"{prefix}/{kind}": float(row["fraction"]) for kind, row in histogram.truncation(context_lengths).items()}


def dataset_token_histogram(dir_or_glob: str | os.PathLike, split: str) -> TokenHistogram:
    """The token histogram of a split: from the manifests' ``text_tokens`` where `prepare` wrote them,
    else by reading the records (shards without a manifest, or prepared before histograms existed)."""
    from geoalign_jax.data import sources

    histogram = TokenHistogram()
    paths = sources.shard_paths(dir_or_glob, split)
    for (folder, _), group in sources.group_by_dataset(paths).items():
        stored = _manifest_histogram(folder, split, group)
        if stored is not None:
            histogram.update(stored)
            continue
        source = sources.RecordSource(group)
        for index in range(len(source)):
            histogram.add_record(source[index])
    return histogram


def _manifest_histogram(folder: str, split: str, group: list[str]) -> TokenHistogram | None:
    """The manifest's histogram when it describes exactly these shards (a glob may pick only some of them)."""
    from geoalign_jax.data import sources

    try:
        manifest = sources.read_manifest(folder)
    except sources.SourceError:
        return None
    entry = (manifest.get("text_tokens") or {}).get(split)
    shards = manifest["splits"].get(split, {}).get("shards", [])
    listed = sorted(os.path.abspath(os.path.join(folder, s)) for s in shards)
    if entry is None or sorted(os.path.abspath(p) for p in group) != listed:
        return None
    return TokenHistogram.from_json(entry)


def pipeline_truncation_metrics(data_config: Any) -> dict[str, float]:
    """``data/truncated/<kind>`` fractions of the training split for the data config's context lengths
    (``context_length`` for captions, hard negatives and region captions; ``long_context_length`` for long
    captions), for the trainer to log once at the start. Only the texts the pipeline reads are reported: long
    captions when ``long_context_length`` > 0, hard negatives when ``num_hard_negatives`` > 0, region
    captions when ``max_regions`` > 0."""
    context = int(data_config.context_length)
    lengths = {CAPTIONS: context}
    if int(data_config.long_context_length):
        lengths[LONG_CAPTION] = int(data_config.long_context_length)
    if int(data_config.num_hard_negatives):
        lengths[HARD_NEGATIVES] = context
    if int(data_config.max_regions):
        lengths[REGION_CAPTIONS] = context
    histogram = dataset_token_histogram(data_config.train_shards, data_config.train_split)
    return truncation_metrics(histogram, lengths)
