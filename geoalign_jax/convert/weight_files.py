"""Reading and writing PyTorch weight files: state dicts from `.safetensors` / `.pt` / `.bin` / `.pth`, a
model folder's JSON files, and the `.safetensors` file an export writes.

Reading never unpickles arbitrary objects: `.safetensors` files are read with safetensors (no torch),
`.pt`/`.bin`/`.pth` files only with `torch.load(path, map_location="cpu", weights_only=True)`. A file that
cannot be read (empty, truncated, damaged, not that format) raises `WeightsFileError`, one line naming the
file and what is wrong; zip-format torch files are checked entry by entry against their CRC-32 first, so a
changed block fails instead of loading as wrong weights (safetensors and legacy torch files carry no checksum).

Writing: safetensors' writer creates its file with mode 0600 (owner only) whatever the umask, while every other
file the project writes (the JSON beside it, checkpoints) gets the user's normal permissions; on a shared file
system an export would be unreadable for the rest of the team. `save_safetensors` writes through safetensors
and then gives the file the mode an ordinary `open()` would have (0666 less the umask).
"""
from __future__ import annotations

import json
import os
import pathlib
import warnings
import zipfile
from typing import Any, Mapping

import numpy as np

from geoalign_jax.convert.layout import StateDict
from geoalign_jax.error_text import one_line

# Prefixes added by DistributedDataParallel / DataParallel and by torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def _to_numpy(key: str, value: Any, source: str) -> np.ndarray:
    """A tensor of any dtype -> numpy (bf16 via float32, since numpy has no bfloat16)."""
    if isinstance(value, np.ndarray):
        return value
    try:
        import torch
    except ImportError:  # pragma: no cover - only reached with torch-produced values
        torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.to(torch.float32)
        return tensor.numpy()
    raise ValueError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")


class WeightsFileError(ValueError):
    """A weights file or model folder that cannot be read; the one-line message names the file and what is
    wrong (missing, empty, truncated, damaged, not that format)."""


def read_json_file(path: pathlib.Path, what: str) -> Any:
    """A model folder's JSON file (`what` says which, e.g. "open_clip config"); WeightsFileError when it is
    missing, unreadable or not JSON."""
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such file (the {what} is missing)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise WeightsFileError(f"{path}: the {what} is not readable JSON ({one_line(error)})") from None


def _read_safetensors(path: pathlib.Path) -> StateDict:
    from safetensors import safe_open

    state_dict: StateDict = {}
    try:
        with safe_open(str(path), framework="np") as handle:
            keys = list(handle.keys())
            bf16 = {key for key in keys if handle.get_slice(key).get_dtype() == "BF16"}
            for key in keys:
                if key not in bf16:
                    state_dict[key] = handle.get_tensor(key)
        if bf16:  # numpy cannot hold bfloat16: read those through jax and widen to float32
            with safe_open(str(path), framework="flax") as handle:
                for key in bf16:
                    state_dict[key] = np.asarray(handle.get_tensor(key), dtype=np.float32)
    except Exception as error:  # noqa: BLE001 - SafetensorError, OSError: the file is what is wrong
        empty = " (the file is empty)" if path.stat().st_size == 0 else ""
        raise WeightsFileError(f"{path}: not a readable safetensors file, truncated or damaged{empty} "
                               f"({one_line(error)})") from None
    return {key: state_dict[key] for key in keys}


def _zip_problem(path: pathlib.Path) -> str | None:
    """What is wrong with a zip-format torch file (the format torch.save writes since 1.6), or None.

    torch's own reader does not check the entries' CRC-32, so a zeroed block inside a tensor would load as
    wrong weights; every entry is read here against its CRC-32 (entries saved without one, CRC 0, are skipped).
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:
                    continue  # saved with torch.serialization.config.save.compute_crc32 = False: unverifiable
                try:
                    with archive.open(info) as entry:
                        while entry.read(1 << 24):
                            pass
                except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
                    return f"damaged: archive entry {info.filename!r} does not read back ({one_line(error)})"
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        return f"damaged zip archive ({one_line(error)})"
    return None


def _torch_problem(path: pathlib.Path) -> str | None:
    """What is wrong with a .pt/.pth/.bin/.ckpt file before torch reads it, or None when nothing was found."""
    with open(path, "rb") as handle:
        head = handle.read(4)
    if not head:
        return "the file is empty (0 bytes)"
    if zipfile.is_zipfile(path):
        return _zip_problem(path)
    if head.startswith(b"PK"):
        return "truncated: the zip archive's central directory is missing (an interrupted download or copy?)"
    return None  # a legacy (pickle) torch file: torch.load finds what it can


def _torch_load_error(error: BaseException) -> str:
    """The useful part of a torch.load failure (its weights_only messages are paragraphs of advice)."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    return one_line(f"{type(error).__name__}: {text}" if text.strip() else type(error).__name__)


def _read_torch(path: pathlib.Path) -> Any:
    try:
        import torch
    except ImportError as error:
        raise ImportError(
            f"reading {path} needs PyTorch, which the torch extra installs: pip install 'geoalign-jax[torch]' "
            "(.safetensors files are read without it)"
        ) from error
    problem = _torch_problem(path)
    if problem is not None:
        raise WeightsFileError(f"{path}: {problem}")
    try:
        with warnings.catch_warnings():
            # torch warns before refusing a TorchScript archive under weights_only; the refusal is ours to word.
            warnings.filterwarnings("ignore", message=".*looks like a TorchScript archive.*")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - sorted into the three things that go wrong
        if isinstance(error, RuntimeError) and "TorchScript" in str(error):
            raise ValueError(
                f"{path} is a TorchScript archive (like OpenAI's original CLIP .pt files); it is not loaded "
                "because that runs code from the file. Save its state dict first, e.g. "
                "open_clip.create_model('ViT-B-32-quickgelu', pretrained=PATH) then "
                "torch.save(model.state_dict(), 'state_dict.pt')"
            ) from error
        if "Unsupported global" in str(error):
            raise ValueError(
                f"{path} holds objects that torch.load(weights_only=True) refuses (not a plain state dict): "
                f"{_torch_load_error(error)}"
            ) from error
        raise WeightsFileError(f"{path}: not a readable PyTorch checkpoint, truncated or damaged "
                               f"({_torch_load_error(error)})") from None


def unwrap_state_dict(loaded: Any, *, source: str) -> dict[str, Any]:
    """A bare state dict or {"state_dict": ...} (open_clip training checkpoints) -> the state dict,
    with `module.` / `_orig_mod.` wrapper prefixes removed."""
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{source}: expected a state dict (a mapping of names to tensors), got {type(loaded).__name__}")
    if "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
        loaded = loaded["state_dict"]
    state_dict = dict(loaded)
    if not state_dict:
        raise ValueError(f"{source}: the state dict is empty")
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
    return state_dict


def read_state_dict(path: str | pathlib.Path) -> StateDict:
    """Reads a PyTorch state dict file (.safetensors, or .pt/.pth/.bin/.ckpt via torch weights_only);
    WeightsFileError when the file is missing or cannot be read."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsFileError(f"{path}: no such file")
    source = str(path)
    if path.suffix == ".safetensors":
        loaded: Any = _read_safetensors(path)
    elif path.suffix in TORCH_SUFFIXES:
        loaded = _read_torch(path)
    else:
        raise ValueError(f"{path}: unknown weights file type {path.suffix!r} (use .safetensors, {', '.join(TORCH_SUFFIXES)})")
    state_dict = unwrap_state_dict(loaded, source=source)
    return {key: _to_numpy(key, value, source) for key, value in state_dict.items()}


def as_float32(state_dict: Mapping[str, np.ndarray]) -> StateDict:
    """Casts floating tensors (fp16, bf16-widened, fp64) to float32: the dtype of our parameters."""
    return {
        key: value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value
        for key, value in state_dict.items()
    }


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
