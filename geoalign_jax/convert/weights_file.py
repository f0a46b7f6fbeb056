"""Writing a safetensors weights file that colleagues can read.

safetensors' writer creates its file with mode 0600 (owner only) whatever the umask, while every other file
the project writes (the JSON beside it, checkpoints) gets the user's normal permissions; on a shared file
system an export would be unreadable for the rest of the team. `save_safetensors` writes through safetensors
and then gives the file the mode an ordinary `open()` would have (0666 less the umask).
"""
from __future__ import annotations

import os
import pathlib
from typing import Mapping

import numpy as np


def current_umask() -> int:
    """The process's umask (read from /proc where there is one: setting it to read it is not thread-safe)."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_safetensors(tensors: Mapping[str, np.ndarray], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """safetensors.numpy.save_file, with the file's mode from the umask (see the module docstring)."""
    from safetensors.numpy import save_file

    save_file(dict(tensors), str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())


__all__ = ["current_umask", "save_safetensors"]
