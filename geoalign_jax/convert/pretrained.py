"""`load_pretrained`: the one loader of PyTorch-format CLIP weights (open_clip or Hugging Face) into
geoalign-jax parameters, shared by `python -m geoalign_jax.convert import`, `python -m geoalign_jax.evaluate
--open-clip/--hf` and the trainer's init from pretrained weights.

Why one loader: weights arrive truncated by interrupted downloads, damaged by copies, or as folders missing
a file, and every entry point must answer the same way: `WeightsFileError`, one line naming the file and
what is wrong, never a traceback from torch's zip reader or from safetensors.
"""
from __future__ import annotations

import contextlib
import pathlib
from collections.abc import Iterator
from typing import Literal

from geoalign_jax.convert import hf, open_clip
from geoalign_jax.error_text import one_line
from geoalign_jax.convert.weight_files import WeightsFileError, read_json_file, read_state_dict
from geoalign_jax.models.clip import CLIPConfig, Params

WeightsFormat = Literal["open_clip", "hf"]
FORMATS: tuple[str, ...] = ("open_clip", "hf")


def check_weights_path(src: str | pathlib.Path, fmt: WeightsFormat) -> pathlib.Path:
    """The path as given, refused (WeightsFileError) when it does not exist or has the wrong kind for `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weights format {fmt!r} (known: {', '.join(FORMATS)})")
    path = pathlib.Path(src)
    if not path.exists():
        raise WeightsFileError(f"{path}: no such file or folder")
    if fmt == "hf" and not path.is_dir():
        raise WeightsFileError(f"{path}: not a folder (a Hugging Face model folder holds {hf.CONFIG_FILE} and "
                               f"{hf.WEIGHTS_FILE})")
    return path


@contextlib.contextmanager
def _file_errors(path: pathlib.Path) -> Iterator[None]:
    """OS-level failures to read the weights as WeightsFileError naming the file."""
    try:
        yield
    except WeightsFileError:
        raise
    except FileNotFoundError as error:
        raise WeightsFileError(f"{error.filename or path}: no such file") from None
    except OSError as error:  # permissions, a directory where a file belongs, I/O errors
        raise WeightsFileError(f"{error.filename or path}: cannot be read ({one_line(error.strerror or error)})") \
            from None


def load_pretrained(
    src: str | pathlib.Path, fmt: WeightsFormat, *, quick_gelu: bool | None = None, model: str | None = None
) -> tuple[CLIPConfig, Params]:
    """(config, float32 params) from an open_clip weights file / folder (`fmt="open_clip"`) or a Hugging Face
    CLIPModel folder (`fmt="hf"`).

    A file that cannot be read raises WeightsFileError (a ValueError) whose one-line message names the file
    and what is wrong: missing (also a file a folder or an index should hold), empty, truncated, damaged
    (a torch zip entry failing its CRC-32), not JSON / not that format. Weights that read but do not fit
    the architecture raise ValueError naming the first offending key. `quick_gelu` and `model` as in
    `open_clip.load_open_clip` / `hf.load_hf`.
    """
    path = check_weights_path(src, fmt)
    loader = open_clip.load_open_clip if fmt == "open_clip" else hf.load_hf
    with _file_errors(path):
        return loader(path, quick_gelu=quick_gelu, model=model)


def check_weights_readable(src: str | pathlib.Path, fmt: WeightsFormat) -> None:
    """Read the files `load_pretrained(src, fmt)` reads, with the same checks and errors, without converting:
    for callers that hand the files to another loader (the evaluation's open_clip-in-torch backend)."""
    path = check_weights_path(src, fmt)
    with _file_errors(path):
        if fmt == "hf":
            read_json_file(path / hf.CONFIG_FILE, "Hugging Face model config")
            hf.read_hf_weights(path)
            return
        weights = open_clip.read_open_clip_folder_config(path)[1] if path.is_dir() else path
        read_state_dict(weights)
