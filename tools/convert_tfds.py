"""Kept for existing command lines: the same as `python -m geoalign_jax.prepare tfds ...` (see its --help)."""
from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from geoalign_jax import prepare  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return prepare.main(["tfds", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
