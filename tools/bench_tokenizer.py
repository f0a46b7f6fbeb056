"""Captions per second of geoalign_jax.tokenizer against open_clip.tokenize, on real captions, in one run.

Why: the data pipeline tokenises every caption, long text and hard negative on the host each step; the
tokenizer must not be what starves the accelerator. Both tokenizers cache BPE per word, so a warm pass (the
steady state of training) and our cold first pass (empty cache) are reported; ids are checked to be equal.

    .venv/bin/python tools/bench_tokenizer.py [--captions RS_SAMPLES/captions/dataset_rsitmd.json]
        [--context-length 77] [--repeats 3]        (RS_SAMPLES: the sample folder, docs/design.md "Test data")
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Callable, Sequence

import numpy as np

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from geoalign_jax import tokenizer  # noqa: E402

# The real RS samples: $GEOALIGN_SHARED_DATA, as for the tests (default: shared/data beside the checkout).
SAMPLES = pathlib.Path(os.environ.get("GEOALIGN_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")
DEFAULT_CAPTIONS = SAMPLES / "captions" / "dataset_rsitmd.json"


def load_captions(path: pathlib.Path) -> list[str]:
    """All ``images[].sentences[].raw`` of a Karpathy-layout json."""
    with open(path, encoding="utf-8") as file:
        dataset = json.load(file)
    return [sentence["raw"] for image in dataset["images"] for sentence in image["sentences"]]


def captions_per_second(
    tokenize_fn: Callable[[Sequence[str], int], np.ndarray], captions: list[str], context_length: int, repeats: int
) -> tuple[float, np.ndarray]:
    """Best of ``repeats`` timed passes over all captions (the caller warms up first if it wants warm numbers)."""
    best = float("inf")
    ids = np.empty(0)
    for _ in range(repeats):
        start = time.perf_counter()
        ids = np.asarray(tokenize_fn(captions, context_length))
        best = min(best, time.perf_counter() - start)
    return len(captions) / best, ids


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--captions", type=pathlib.Path, default=DEFAULT_CAPTIONS, help="Karpathy-layout json")
    parser.add_argument("--context-length", type=int, default=77)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per tokenizer (best is reported)")
    args = parser.parse_args(argv)
    if not args.captions.is_file():
        parser.error(f"--captions: no such file {args.captions}")
    captions = load_captions(args.captions)
    print(f"{len(captions)} captions from {args.captions}, context length {args.context_length}")

    cold, _ = captions_per_second(tokenizer.tokenize, captions, args.context_length, repeats=1)
    ours, our_ids = captions_per_second(tokenizer.tokenize, captions, args.context_length, args.repeats)

    import open_clip  # test-only dependency; imported here so that the cold pass above does not pay for torch

    def open_clip_tokenize(texts: Sequence[str], context_length: int) -> np.ndarray:
        return open_clip.tokenize(list(texts), context_length=context_length).numpy()

    captions_per_second(open_clip_tokenize, captions, args.context_length, repeats=1)  # warm its word cache
    theirs, their_ids = captions_per_second(open_clip_tokenize, captions, args.context_length, args.repeats)

    identical = bool(np.array_equal(our_ids, their_ids))
    print(f"geoalign_jax.tokenizer  cold (first pass): {cold:10.0f} captions/s")
    print(f"geoalign_jax.tokenizer  warm             : {ours:10.0f} captions/s")
    print(f"open_clip.tokenize      warm             : {theirs:10.0f} captions/s")
    print(f"ratio ours/open_clip (warm): {ours / theirs:.2f}x; ids identical: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
