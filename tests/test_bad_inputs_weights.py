"""Truncated or damaged weight files and model folders missing a file: `convert import` and `evaluate
--open_clip/--hf` (both through `convert.load_pretrained`) exit 2 with one line naming the file and what is
wrong, never a traceback; intact files still load. The damage is made here, on the tiny model's weights."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Any, Callable

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from bad_files import truncate, wrong_magic, zero_block
from geoalign_jax.convert import WeightsFileError, hf, load_pretrained, open_clip
from geoalign_jax.convert.__main__ import main as convert_main
from geoalign_jax.evaluate import main as evaluate_main
from geoalign_jax.models import clip

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The tiny model's weights in every format the loader reads, intact: {kind: path} plus the params."""
    root = tmp_path_factory.mktemp("weights")
    config = clip.get_model_config("tiny")
    params = clip.init_params(config, jax.random.key(3))
    state_dict = {key: torch.from_numpy(np.ascontiguousarray(value))
                  for key, value in open_clip.params_to_open_clip(config, params).items()}
    torch.save(state_dict, root / "tiny.pt")  # zip format
    torch.save(state_dict, root / "tiny.bin", _use_new_zipfile_serialization=False)  # legacy pickle format
    save_file(open_clip.params_to_open_clip(config, params), str(root / "tiny.safetensors"))
    open_clip.export_open_clip(config, params, root / "open_clip_dir")
    hf_dir = root / "hf_dir"
    hf_dir.mkdir()
    (hf_dir / hf.CONFIG_FILE).write_text(json.dumps({"model_type": "clip", **hf.hf_config_dict(config)}))
    save_file(hf.params_to_hf(config, params), str(hf_dir / hf.WEIGHTS_FILE))
    return {"root": root, "params": params}


def _leaves(params):
    return [np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(params)]


@pytest.mark.parametrize("src,fmt", [("tiny.pt", "open_clip"), ("tiny.bin", "open_clip"),
                                     ("tiny.safetensors", "open_clip"), ("open_clip_dir", "open_clip"),
                                     ("hf_dir", "hf")])
def test_intact_weights_still_load(weights, src, fmt):
    _, params = load_pretrained(weights["root"] / src, fmt, quick_gelu=False, model="tiny")
    for got, want in zip(_leaves(params), _leaves(weights["params"])):
        np.testing.assert_array_equal(got, want)


def test_a_torch_file_saved_without_crc_still_loads(weights, tmp_path):
    """torch can save zip entries without CRC-32 (CRC field 0): nothing to check, not an error."""
    saved = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        state_dict = torch.load(weights["root"] / "tiny.pt", weights_only=True)
        torch.save(state_dict, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(saved)
    _, params = load_pretrained(tmp_path / "nocrc.pt", "open_clip", quick_gelu=False, model="tiny")
    np.testing.assert_array_equal(_leaves(params)[0], _leaves(weights["params"])[0])


def _damaged_copy(weights, tmp_path, src, damage, target, copy_as=None):
    """Copy `src` (file or folder, renamed to `copy_as`) and apply `damage` to `target` inside it (to the copy
    itself when `target` is None); returns (copy, damaged path)."""
    copy = tmp_path / (copy_as or src)
    if (weights["root"] / src).is_dir():
        shutil.copytree(weights["root"] / src, copy)
    else:
        shutil.copy(weights["root"] / src, copy)
    damaged = copy / target if target else copy
    damage(damaged)
    return copy, damaged


def _write_sharded_index(path):
    """Replace a HF folder's single weights file by an index whose second shard is missing."""
    folder = path.parent
    path.rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))


@dataclasses.dataclass(frozen=True)
class Case:
    src: str  # intact source in the fixture
    fmt: str
    damage: Callable[[pathlib.Path], Any]
    words: str  # regex the message must match (what is wrong)
    target: str | None = None  # the damaged file inside a folder source
    named: str | None = None  # the file the message names, relative to the copy ("" = the copy); default: damaged
    copy_as: str | None = None


CASES = {
    "truncated .pt": Case("tiny.pt", "open_clip", truncate, "truncated: the zip archive's central directory"),
    "zeroed block in .pt": Case("tiny.pt", "open_clip", lambda p: zero_block(p, size=4096),
                                "damaged: archive entry .* does not read back \\(Bad CRC-32"),
    "wrong magic .pth": Case("tiny.pt", "open_clip", wrong_magic, "damaged: archive entry", copy_as="tiny.pth"),
    "truncated legacy .bin": Case("tiny.bin", "open_clip", truncate, "not a readable PyTorch checkpoint"),
    "empty .bin": Case("tiny.bin", "open_clip", lambda p: os.truncate(p, 0), "the file is empty"),
    "truncated .safetensors": Case("tiny.safetensors", "open_clip", truncate, "not a readable safetensors file"),
    "wrong magic .safetensors": Case("tiny.safetensors", "open_clip", wrong_magic,
                                     "not a readable safetensors file"),
    "open_clip folder, truncated config": Case("open_clip_dir", "open_clip", truncate, "not readable JSON",
                                               target=open_clip.CONFIG_FILE),
    "open_clip folder without weights": Case("open_clip_dir", "open_clip", os.remove, "no weights file",
                                             target=open_clip.WEIGHTS_FILE, named=""),
    "HF folder without config.json": Case("hf_dir", "hf", os.remove, "no such file", target=hf.CONFIG_FILE),
    "HF folder without weights": Case("hf_dir", "hf", os.remove, "no such file", target=hf.WEIGHTS_FILE),
    "HF folder, truncated weights": Case("hf_dir", "hf", truncate, "not a readable safetensors file",
                                         target=hf.WEIGHTS_FILE),
    "HF index naming a missing shard": Case("hf_dir", "hf", _write_sharded_index,
                                            "no such file \\(listed in model.safetensors.index.json",
                                            target=hf.WEIGHTS_FILE, named="model-00002-of-00002.safetensors"),
}


def _error_line(err: str) -> str:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("name", list(CASES))
def test_a_damaged_weights_file_is_one_line_naming_it_in_import_and_evaluate(weights, tmp_path, capsys, name):
    case = CASES[name]
    source, damaged = _damaged_copy(weights, tmp_path, case.src, case.damage, case.target, case.copy_as)
    named = str(damaged) if case.named is None else str(source / case.named) if case.named else str(source)

    with pytest.raises(WeightsFileError) as error:
        load_pretrained(source, case.fmt, quick_gelu=False)
    message = str(error.value)
    assert message.startswith(f"{named}: ") and re.search(case.words, message) and "\n" not in message

    assert convert_main(["import", "--src", str(source), "--format", case.fmt, "--out", str(tmp_path / "ckpt")]) == 2
    assert _error_line(capsys.readouterr().err) == f"error: {message}"
    assert not (tmp_path / "ckpt").exists()

    (tmp_path / "data").mkdir()
    option = "--open_clip" if case.fmt == "open_clip" else "--hf"
    assert evaluate_main([option, str(source), "--tasks", f"zeroshot:x={tmp_path / 'data'}",
                          "--out", str(tmp_path / "out"), "--no_progress", "--no_plots"]) == 2
    assert _error_line(capsys.readouterr().err) == f"error: cannot load the weights: {message}"


def test_the_torch_backend_of_evaluate_checks_the_files_first(weights, tmp_path, capsys):
    source, damaged = _damaged_copy(weights, tmp_path, "open_clip_dir", truncate, open_clip.WEIGHTS_FILE)
    (tmp_path / "data").mkdir()
    assert evaluate_main(["--open_clip", str(source), "--backend", "open_clip", "--tasks",
                          f"zeroshot:x={tmp_path / 'data'}", "--out", str(tmp_path / "out"), "--no_progress",
                          "--no_plots"]) == 2
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"error: cannot load the weights: {damaged}: not a readable safetensors file")


def test_convert_import_of_a_truncated_file_prints_no_traceback_in_a_real_process(weights, tmp_path):
    source, damaged = _damaged_copy(weights, tmp_path, "tiny.pt", truncate, None)
    result = subprocess.run(
        [sys.executable, "-m", "geoalign_jax.convert", "import", "--src", str(source), "--format", "open_clip",
         "--out", str(tmp_path / "ckpt"), "--no-quick-gelu"],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert _error_line(result.stderr).startswith(f"error: {damaged}: truncated")
