"""Thin wrapper around the convert CLI, for those who look in tools/: same arguments as
`python -m geoalign_jax.convert` (export --params CKPT --format open_clip|hf --out DIR, or
import --src PATH --format open_clip|hf --out CKPT [--quick-gelu|--no-quick-gelu] [--model NAME])."""
from __future__ import annotations

import sys

from geoalign_jax.convert.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
