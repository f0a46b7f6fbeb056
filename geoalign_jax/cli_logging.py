"""Logging as every CLI of the project sets it up: INFO from this package on stderr, three harmless library
messages left out. Plain Python (imports no room but the error_text leaf), so the train, evaluate and convert CLIs share it.

Why more than `basicConfig(level=INFO)`: importing orbax logs through absl before any CLI runs, and absl then
calls `logging.basicConfig()` at WARNING, which makes a later `basicConfig` a no-op (evaluate and convert lost
their "reading checkpoint step N of ..." line that way). So `setup` removes that plain stderr handler (only it:
a handler of another kind, such as pytest's capture, stays) and sets the root level itself.

The silenced messages, each harmless: orbax's "Metadata file does not exist" (a checkpoint written before orbax
kept that file, or a step it is reading for the first time), jax's "Unable to initialize backend 'tpu'" (jax
probes every platform it knows on a machine without one) and tensorboardX's "Summary name ... is illegal" (tags
such as `recall@1` are written with `_` for `@`).
"""
from __future__ import annotations

import logging

from geoalign_jax.error_text import one_line

_NOISE = ("Metadata file does not exist",)


class _LibraryLines(logging.Filter):
    """Drops the noise; unless tracebacks are wanted, an orbax (absl) or asyncio record becomes one line."""

    def __init__(self, keep_tracebacks: bool) -> None:
        super().__init__()
        self.keep_tracebacks = keep_tracebacks

    def filter(self, record: logging.LogRecord) -> bool:
        if any(str(record.msg).startswith(text) for text in _NOISE):
            return False
        if not self.keep_tracebacks and (record.exc_info or record.stack_info or "\n" in str(record.msg)):
            record.msg, record.args = one_line(record.getMessage()), ()
            record.exc_info = record.exc_text = record.stack_info = None
        return True


def quiet_library_logs(keep_tracebacks: bool = False) -> None:
    """Silences the three harmless library messages named in the module docstring; without `keep_tracebacks`
    (the CLIs' --debug / GEOALIGN_DEBUG) an error orbax or asyncio logs from a background thread (a failed
    async save logs the same traceback from each of its threads) is one line. Calling it again replaces the
    earlier setting."""
    for name in ("absl", "asyncio"):
        library = logging.getLogger(name)
        for existing in [f for f in library.filters if isinstance(f, _LibraryLines)]:
            library.removeFilter(existing)
        library.addFilter(_LibraryLines(keep_tracebacks))
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    logging.getLogger("tensorboardX.summary").setLevel(logging.WARNING)


def setup(fmt: str = "%(levelname)s %(name)s: %(message)s", *, keep_tracebacks: bool = False) -> None:
    """INFO on stderr in `fmt` (replacing the plain handler an import installed), absl (orbax: every file it
    writes) at WARNING, the library noise left out."""
    root = logging.getLogger()
    for handler in [handler for handler in root.handlers if type(handler) is logging.StreamHandler]:
        root.removeHandler(handler)
    logging.basicConfig(level=logging.INFO, format=fmt)
    root.setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    quiet_library_logs(keep_tracebacks)


__all__ = ["quiet_library_logs", "setup"]
