"""Error messages as users read them: one line. Plain Python with no imports from the rest of the package,
so every room (and every CLI) uses this one definition."""
from __future__ import annotations

from typing import Callable


def one_line(error: BaseException | str, limit: int | None = 300) -> str:
    """An error message as one line (library messages span several), cut at `limit` characters (None: whole);
    an exception without a message is named by its type."""
    text = " ".join(str(error).split()) or (type(error).__name__ if isinstance(error, BaseException) else "")
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


DEBUG_ENV = "GEOALIGN_DEBUG"


def debug_env() -> bool:
    """GEOALIGN_DEBUG set to anything but "", "0", "false": the CLIs print tracebacks."""
    import os

    return os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false")


def run_main(main: Callable[[], int]) -> int:
    """Runs a CLI's `main` (which prints its own one-line refusals, exit status 2); anything it raises is a
    failure: one line naming the error's type, exit status 1, the traceback only with GEOALIGN_DEBUG=1."""
    import sys
    import traceback

    try:
        return main()
    except Exception as error:  # noqa: BLE001 - every failure is a line (and a traceback when asked)
        if debug_env():
            traceback.print_exception(error, file=sys.stderr)
            hint = ""
        else:
            hint = f" (the traceback: {DEBUG_ENV}=1)"
        print(f"error: {type(error).__name__}: {one_line(error, limit=600)}{hint}", file=sys.stderr)
        return 1
