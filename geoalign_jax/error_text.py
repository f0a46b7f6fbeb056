"""Error messages as users read them: one line. Plain Python with no imports from the rest of the package,
so every room (and every CLI) uses this one definition."""
from __future__ import annotations


def one_line(error: BaseException | str, limit: int | None = 300) -> str:
    """An error message as one line (library messages span several), cut at `limit` characters (None: whole);
    an exception without a message is named by its type."""
    text = " ".join(str(error).split()) or (type(error).__name__ if isinstance(error, BaseException) else "")
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
