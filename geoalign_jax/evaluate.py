"""``python -m geoalign_jax.evaluate``: the evaluation CLI (implemented in ``geoalign_jax.eval.__main__``)."""
from __future__ import annotations

import sys

from geoalign_jax.error_text import run_main
from geoalign_jax.eval.__main__ import main

if __name__ == "__main__":
    sys.exit(run_main(main))
