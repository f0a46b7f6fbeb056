"""A conversion that writes nothing leaves no output folder behind.

`write_dataset` creates `--out` before it knows whether any record will be written; when it then fails (every
image missing, too many bad inputs, an interrupt) an empty folder would stay, which the next run or a reader
takes for a dataset. The decorator removes the folder again when the call created it and it is still empty.
"""
from __future__ import annotations

import functools
import os
import pathlib
from typing import Any, Callable, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


def leaves_no_empty_folder(function: F) -> F:
    """Wraps `function(tasks, out_dir, ...)`: on failure, removes `out_dir` if the call created it and it is empty."""

    @functools.wraps(function)
    def wrapper(tasks: Any, out_dir: str | os.PathLike, *args: Any, **kwargs: Any) -> Any:
        created = not pathlib.Path(out_dir).exists()
        try:
            return function(tasks, out_dir, *args, **kwargs)
        except BaseException:
            if created:
                try:
                    pathlib.Path(out_dir).rmdir()  # only an empty folder: never a file someone put there
                except OSError:
                    pass
            raise

    return wrapper  # type: ignore[return-value]


__all__ = ["leaves_no_empty_folder"]
