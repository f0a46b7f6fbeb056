"""The grain stages of the training dataset: attach each record's index, decode and transform it (a failure
becomes a counted skip naming shard and record), drop the skipped ones while counting them, and carry the
running total of decode errors in every batch and in the iterator state. Top-level classes, so grain's
spawned workers can unpickle them. `pipeline.py` strings them together."""
from __future__ import annotations

import logging
from typing import Any

import grain
import numpy as np

from geoalign_jax.data import records, sources, transforms

logger = logging.getLogger(__name__)

#: Per-example key carrying the number of records skipped right before it in the same worker.
SKIPPED_KEY = "_skipped"
#: Batch key of the running per-host count of skipped (undecodable / unusable) records: a host-side metric.
DECODE_ERRORS_KEY = "decode_errors"


class AttachIndex(grain.transforms.MapWithIndex):
    """raw record -> (index in the source, raw record): the index names the shard and record on failure.

    grain hands a repeated dataset's indices past the end through to the parent (it reads them modulo the
    length), so the index is reduced here to the record's position in the source.
    """

    def __init__(self, num_records: int):
        self.num_records = num_records

    def map_with_index(self, index: int, element: bytes) -> tuple[int, bytes]:
        return (index % self.num_records, element)


class DecodeAndTransform(grain.transforms.RandomMap):
    """(source index, raw bytes) -> example dict, or a ``SkippedRecord`` (logged) when the record is unusable
    (including an ``UnreadableRecord``: bytes the source could not read from a damaged shard).

    Any failure of one record (bytes that are not a record, a record of another version, an image that does
    not decode, no text...) becomes a skip rather than a crash: one bad record must not stop a week-long run.
    A dataset that is bad throughout still fails loudly, in ``SkipAndCount`` (``max_consecutive_skips``).
    """

    def __init__(self, source: sources.RecordSource, config: transforms.TransformConfig):
        self.source = source
        self.transform = transforms.TrainTransform(config)

    def _where(self, index: int) -> str:
        try:
            path, local = self.source.locate(index)
            return f"{path} record {local}"
        except Exception:  # never let the error message itself fail
            return f"record {index}"

    def random_map(self, element: tuple[int, bytes | sources.UnreadableRecord], rng: np.random.Generator) -> Any:
        index, data = element
        if isinstance(data, sources.UnreadableRecord):  # the shard's bytes were damaged (see open_train_source)
            logger.warning("skipping unreadable record at %s: %s", data.where, data.reason)
            return transforms.SkippedRecord(where=data.where, reason=data.reason)
        record_id = "?"
        try:
            record = records.decode_record(data)  # the location is added below, only when it fails
            record_id = record["id"]
            return self.transform.random_map(record, rng)
        except Exception as error:  # noqa: BLE001 - every per-record failure is a counted skip, see above
            where = self._where(index)
            reason = transforms.describe_failure(error)
            logger.warning("skipping record id=%s at %s: %s", record_id, where, reason)
            return transforms.SkippedRecord(where=f"{where} (id {record_id})", reason=reason)


class SkipAndCountIterDataset(grain.IterDataset):
    """Drops ``SkippedRecord`` sentinels; each kept example gets ``_skipped`` = sentinels dropped before it."""

    def __init__(self, parent: grain.IterDataset, max_consecutive_skips: int):
        super().__init__(parent)
        self._max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> SkipAndCountIterator:
        return SkipAndCountIterator(self._parent.__iter__(), self._max_consecutive_skips)

    def __str__(self) -> str:
        return f"SkipAndCountIterDataset(max_consecutive_skips={self._max_consecutive_skips})"


class SkipAndCountIterator(grain.DatasetIterator):
    """Iterator of ``SkipAndCountIterDataset``; its state is the parent's (the count is per element)."""

    def __init__(self, parent: grain.DatasetIterator, max_consecutive_skips: int):
        super().__init__(parent)
        self._max_consecutive_skips = max_consecutive_skips

    def __next__(self) -> dict[str, Any]:
        skipped = 0
        last: transforms.SkippedRecord | None = None
        while True:
            element = next(self._parent)
            if not isinstance(element, transforms.SkippedRecord):
                break
            skipped += 1
            last = element
            if skipped > self._max_consecutive_skips:
                raise RuntimeError(
                    f"{skipped} records in a row could not be used (max_consecutive_skips="
                    f"{self._max_consecutive_skips}); the data or the data config is broken. "
                    f"Last: {last.where}: {last.reason}"
                )
        example = dict(element)
        example[SKIPPED_KEY] = np.int32(skipped)
        return example

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def __str__(self) -> str:
        return "SkipAndCountIterator"


class DecodeErrorTotalIterDataset(grain.IterDataset):
    """Replaces the per-example ``_skipped`` [B] with the running host total ``decode_errors`` (int64 scalar)."""

    def __iter__(self) -> DecodeErrorTotalIterator:
        return DecodeErrorTotalIterator(self._parent.__iter__())

    def __str__(self) -> str:
        return "DecodeErrorTotalIterDataset"


class DecodeErrorTotalIterator(grain.DatasetIterator):
    """Keeps the running total in its state: ``{"parent": <grain state>, "decode_errors": int}``."""

    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)
        self._total = 0

    def __next__(self) -> dict[str, Any]:
        batch = next(self._parent)
        batch = dict(batch)
        self._total += int(np.sum(batch.pop(SKIPPED_KEY)))
        batch[DECODE_ERRORS_KEY] = np.int64(self._total)
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), DECODE_ERRORS_KEY: self._total}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._total = int(state[DECODE_ERRORS_KEY])

    def __str__(self) -> str:
        return "DecodeErrorTotalIterator"
