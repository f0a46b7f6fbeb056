"""An ordered map over spawned worker processes (dataset preparation builds records with it, the fingerprint
scan hashes images with it). Never imports jax: workers are spawned, and jax must not be forked."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

def ignore_interrupts() -> None:
    """Worker processes leave SIGINT and SIGTERM to the parent, which stops them. Ctrl-C reaches the whole
    process group, and so does SIGTERM from a scheduler or `kill -- -PGID`: a worker killed while it sends a
    result leaves half a message in the pool's pipe, and the parent's pool then waits for the rest forever."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


T = TypeVar("T")
R = TypeVar("R")


def ordered_parallel_map(
    function: Callable[[T], R], items: Iterable[T], workers: int, *, window: int | None = None
) -> Iterator[R]:
    """`map(function, items)` over `workers` spawned processes, results in input order, at most `window`
    items in flight (so a million-image dataset does not queue a million futures). workers <= 1: inline."""
    if workers <= 1:
        yield from map(function, items)
        return
    window = window or workers * 4
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                initializer=ignore_interrupts) as executor:
        pending: deque[concurrent.futures.Future] = deque()
        try:
            for item in items:
                pending.append(executor.submit(function, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BaseException:  # stopped (interrupt, failure, generator closed): do not build what is queued
            for future in pending:
                future.cancel()
            raise
