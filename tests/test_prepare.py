"""`python -m geoalign_jax.prepare FORMAT ...`: one CLI for every dataset format, run from the installed package."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from geoalign_jax import prepare
from geoalign_jax.data import sources

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
ALL_FORMATS = ("karpathy", "coco", "dota", "jsonl", "folders", "tfds", "mgrs", "webdataset", "csv", "labels-csv")
SHARED_OPTIONS = ("--out", "--workers", "--num-shards", "--records-per-shard", "--max-bad-fraction",
                  "--min-box-visible", "--overwrite", "--no-progress")
# Each format's own input options, as the README and docs/data_format.md use them.
FORMAT_OPTIONS = {
    "karpathy": ("--json", "--images", "--name", "--splits", "--split-map"),
    "coco": ("--ann", "--images", "--name"),
    "dota": ("--images", "--labels", "--split", "--name", "--categories", "--skip-difficult"),
    "jsonl": ("--jsonl", "--name", "--image-root", "--default-split"),
    "folders": ("--root", "--name", "--split"),
    "tfds": ("--dataset", "--splits", "--data-dir", "--name", "--map"),
    "mgrs": ("--json", "--images", "--name", "--split"),
    "webdataset": ("--shards", "--name", "--split", "--image-ext", "--caption-ext"),
    "csv": ("--csv", "--name", "--image-column", "--caption-column", "--separator", "--image-root", "--split"),
    "labels-csv": ("--csv", "--classnames", "--name", "--image-root", "--split", "--image-column", "--label-column",
                   "--separator"),
}


def _png(size=(12, 10), seed=0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_every_format_has_a_subcommand():
    assert tuple(prepare.FORMATS) == ALL_FORMATS
    assert set(FORMAT_OPTIONS) == set(ALL_FORMATS)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_each_format_documents_its_inputs_and_the_shared_options(fmt, capsys):
    with pytest.raises(SystemExit) as exit_info:
        prepare.main([fmt, "--help"])
    assert exit_info.value.code == 0
    options = set(re.findall(r"--[a-z][a-z-]*", capsys.readouterr().out))
    assert set(FORMAT_OPTIONS[fmt] + SHARED_OPTIONS) <= options


def _run_module(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    # From another folder, with only the package importable: nothing under tools/ is needed.
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "geoalign_jax.prepare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_module_cli_from_another_folder_exit_codes_and_summary(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png())
    (tmp_path / "imgs" / "b.png").write_bytes(_png(seed=1))
    (tmp_path / "pairs.tsv").write_text("path\ttext\nimgs/a.png\ta pond\nimgs/b.png\ta road\nimgs/gone.png\ta lake\n")
    args = ["csv", "--csv", "val=pairs.tsv", "--name", "pairs", "--image-column", "path", "--caption-column", "text",
            "--out", "out", "--workers", "1", "--no-progress"]
    failed = _run_module(args, tmp_path)
    assert failed.returncode == 1, failed.stderr
    assert "missing image: 1 (e.g. pairs.tsv:4 (imgs/gone.png))" in failed.stderr and "NOTHING written" in failed.stderr
    assert not (tmp_path / "out").exists()  # nothing written: not even an empty --out folder

    done = _run_module(args + ["--max-bad-fraction", "0.5"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pairs: wrote 2 records" in done.stdout and "val: 2 records in 1 shards" in done.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["created_by"] == "python -m geoalign_jax.prepare csv"
    assert manifest["splits"]["val"]["count"] == 2

    usage = _run_module(["csv", "--csv", "pairs.tsv"], tmp_path)
    assert usage.returncode == 2 and "--out" in usage.stderr and "--name" in usage.stderr
    unknown = _run_module(["parquet"], tmp_path)
    assert unknown.returncode == 2 and "invalid choice: 'parquet'" in unknown.stderr


def test_csv_split_assignment_must_be_all_or_nothing(tmp_path, capsys):
    (tmp_path / "a.csv").write_text("filepath,title\n")
    code = prepare.main(["csv", "--csv", "train=a.csv", "--csv", "a.csv", "--name", "x", "--out", str(tmp_path / "o"),
                         "--no-progress"])
    assert code == 1 and "give every file as SPLIT=FILE, or none" in capsys.readouterr().err


def test_webdataset_and_mgrs_flags_reach_the_converters(tmp_path, capsys):
    shard = tmp_path / "s-0000.tar"
    with tarfile.open(shard, "w") as archive:
        for name, data in (("k1.image", _png()), ("k1.text", b"a pond"), ("k2.jpg", _png(seed=2)),
                           ("k2.text", b"ignored: jpg is not an --image-ext here")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    code = prepare.main(["webdataset", "--shards", str(tmp_path / "s-{0000..0000}.tar"), "--name", "w",
                         "--split", "val", "--image-ext", "image", "--caption-ext", "text", "--max-bad-fraction", "0.5",
                         "--out", str(tmp_path / "w"), "--workers", "1", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    source = sources.RecordSource.from_dir(tmp_path / "w", "val")
    assert len(source) == 1 and source[0]["id"] == "s-0000/k1" and source[0]["captions"] == ["a pond"]
    assert "sample without image: 1 (e.g. s-0000.tar:k2 (members: jpg, text))" in capsys.readouterr().out

    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "x.png").write_bytes(_png((20, 20)))
    (tmp_path / "text_info.json").write_text(json.dumps([{"global_filepath": "x.png", "global_caption": "a yard",
        "segment": [{"bbox": {"x1": 1, "y1": 2, "x2": 11, "y2": 12, "W": 20, "H": 20}, "category": "car",
                     "category_id": 5}]}]))
    code = prepare.main(["mgrs", "--json", str(tmp_path / "text_info.json"), "--images", str(tmp_path / "g"),
                         "--name", "m", "--split", "train", "--out", str(tmp_path / "m"), "--workers", "1",
                         "--no-progress"])
    assert code == 0, capsys.readouterr().err
    record = sources.RecordSource.from_dir(tmp_path / "m", "train")[0]
    assert record["regions"][0]["box"] == [1.0, 2.0, 11.0, 12.0] and record["regions"][0]["category"] == "car"


@pytest.mark.parametrize("fmt", ("karpathy", "coco", "dota", "jsonl", "folders", "tfds"))
def test_old_tool_scripts_forward_to_the_module(fmt, capsys):
    # tools/convert_<fmt>.py stays for existing command lines; it must be the same parser, not a copy.
    spec = importlib.util.spec_from_file_location(fmt, REPO_ROOT / "tools" / f"convert_{fmt}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit):
        module.main(["--help"])
    assert capsys.readouterr().out.startswith(f"usage: python -m geoalign_jax.prepare {fmt} ")


def test_fingerprints_writes_the_missing_sidecars_once_and_names_what_it_cannot_read(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    lines = ["path\ttext"]
    for index in range(3):
        (tmp_path / "imgs" / f"{index}.png").write_bytes(_png((40, 30), seed=index))
        lines.append(f"imgs/{index}.png\tscene {index}")
    (tmp_path / "pairs.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert prepare.main(["csv", "--csv", f"train={tmp_path / 'pairs.tsv'}",
                         "--name", "p", "--image-column", "path", "--caption-column", "text", "--num-shards", "2",
                         "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    manifest_path = out / "manifest.json"
    converted = json.loads(manifest_path.read_text())
    sidecars = {name: (out / name).read_bytes() for name in converted["image_hashes"]["train"]}
    assert len(sidecars) == 2
    older = {key: value for key, value in converted.items() if key != "image_hashes"}  # as older converters left it
    manifest_path.write_text(json.dumps(older))
    for name in sidecars:
        (out / name).unlink()
    capsys.readouterr()

    assert prepare.main(["fingerprints", str(out), "--no-progress"]) == 0
    assert "2 sidecars written, 0 replaced, 0 already there" in capsys.readouterr().out
    assert {name: (out / name).read_bytes() for name in sidecars} == sidecars  # what the converter wrote
    assert json.loads(manifest_path.read_text()) == {**older, "image_hashes": converted["image_hashes"]}
    assert prepare.main(["fingerprints", str(out), "--no-progress"]) == 0
    assert "0 sidecars written, 0 replaced, 2 already there" in capsys.readouterr().out

    first, second = sorted(sidecars)
    (out / second).write_bytes(sidecars[first])  # a sidecar of another shard: replaced, and said so
    assert prepare.main(["fingerprints", str(out / "*.array_record"), "--no-progress"]) == 0
    assert "1 replaced" in (printed := capsys.readouterr().out) and f"replaced {out / second}" in printed
    assert (out / second).read_bytes() == sidecars[second]

    bare = tmp_path / "bare"  # shards copied without their sidecars, next to a file that is no shard
    bare.mkdir()
    shutil.copy(out / sorted(converted["splits"]["train"]["shards"])[0], bare)
    (bare / "junk-train-00000-of-00001.array_record").write_bytes(b"not an array record")
    assert prepare.main(["fingerprints", str(bare / "*.array_record"), "--no-progress"]) == 1
    captured = capsys.readouterr()
    assert "1 sidecars written" in captured.out and "1 shards unreadable" in captured.out
    assert "listed by no manifest" in captured.out
    assert f"{bare / 'junk-train-00000-of-00001.array_record'}" in captured.err
    assert (bare / first).read_bytes() == sidecars[first]
    assert not (bare / "junk-train-00000-of-00001.hashes.npy").exists()
    assert prepare.main(["fingerprints", str(bare), "--no-progress"]) == 1
    assert "no manifest.json in" in (error := capsys.readouterr().err) and "as a glob" in error
