"""Provenance of evaluation numbers on the real RSICD / AID samples: content hashes that do not depend on
runs, record order, shard counts or how records are split between processes, but change with one caption
character or one image; the parameter hash; the split guard; results.json from the library and the CLI."""
from __future__ import annotations

import io
import json
import os
import random
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import data_fixtures
from geoalign_jax.data import prepare_formats, sources
from geoalign_jax.eval import datasets, runner, provenance, report
from geoalign_jax.evaluate import main
from geoalign_jax.models import clip
from geoalign_jax.params_checkpoint import save_params

records = data_fixtures.records  # the real AID / RSICD / DOTA samples as records (module scope)
QUIET = {"progress": False}


@pytest.fixture(scope="module")
def rsicd_variants(shared_data, tmp_path_factory):
    """The RSICD sample converted into 1 and 3 shards per split, with one val caption changed by one
    character, and with one val image re-encoded (same picture, other bytes)."""
    root = tmp_path_factory.mktemp("provenance")
    folder = shared_data / "rsicd_sample"
    raw = json.loads((folder / "dataset_rsicd.json").read_text())
    out = {}
    for name, shards in (("one", 1), ("three", 3)):
        prepare_formats.prepare_karpathy(folder / "dataset_rsicd.json", folder / "images", root / name, name="rsicd",
                                    num_shards=shards, **QUIET)
        out[name] = root / name
    val = [entry for entry in raw["images"] if entry["split"] == "val"]
    edited = json.loads(json.dumps(raw))
    target = next(e for e in edited["images"] if e["filename"] == val[3]["filename"])
    caption = target["sentences"][2]["raw"]
    target["sentences"][2]["raw"] = caption[:-1] + ("x" if caption[-1] != "x" else "y")
    (root / "edited.json").write_text(json.dumps(edited))
    prepare_formats.prepare_karpathy(root / "edited.json", folder / "images", root / "edited", name="rsicd", **QUIET)
    out["edited"] = root / "edited"
    images = root / "images"
    shutil.copytree(folder / "images", images)
    buffer = io.BytesIO()
    Image.open(images / val[5]["filename"]).save(buffer, "JPEG", quality=60)
    (images / val[5]["filename"]).write_bytes(buffer.getvalue())
    prepare_formats.prepare_karpathy(folder / "dataset_rsicd.json", images, root / "new_image", name="rsicd", **QUIET)
    out["new_image"] = root / "new_image"
    return out


def _retrieval_hashes(folder, split="val") -> dict[str, str]:
    data = datasets.load_retrieval(folder, split=split)
    return provenance.content_hashes("retrieval", data, provenance.image_digests(data.images))


def test_content_hash_is_stable_across_runs_shard_counts_order_and_processes(rsicd_variants):
    assert len(sources.shard_paths(rsicd_variants["three"], "val")) == 3
    first = _retrieval_hashes(rsicd_variants["one"])
    assert _retrieval_hashes(rsicd_variants["one"]) == first
    assert _retrieval_hashes(rsicd_variants["three"]) == first
    data = datasets.load_retrieval(rsicd_variants["one"], split="val")
    items = provenance.retrieval_items(data, provenance.image_digests(data.images))
    for processes in (2, 3, 5):  # each process hashes its slice; the partial hashes merge to the same value
        merged = provenance.ContentHash()
        for index in range(processes):
            merged.update(provenance.ContentHash(items[index::processes]))
        assert merged.hexdigest() == first["content_sha256"]
    shuffled = list(items)
    random.Random(0).shuffle(shuffled)
    assert provenance.ContentHash(shuffled).hexdigest() == first["content_sha256"]
    # a multiset: a record counted twice is not the same set
    assert provenance.ContentHash(items + items[:1]).hexdigest() != first["content_sha256"]


def test_one_caption_character_changes_the_content_hash_not_the_image_hash(rsicd_variants):
    original, edited = _retrieval_hashes(rsicd_variants["one"]), _retrieval_hashes(rsicd_variants["edited"])
    assert edited["content_sha256"] != original["content_sha256"]
    assert edited["images_sha256"] == original["images_sha256"]
    assert _retrieval_hashes(rsicd_variants["edited"], "train") == _retrieval_hashes(rsicd_variants["one"], "train")


def test_one_re_encoded_image_changes_both_hashes(rsicd_variants):
    original, changed = _retrieval_hashes(rsicd_variants["one"]), _retrieval_hashes(rsicd_variants["new_image"])
    assert changed["content_sha256"] != original["content_sha256"]
    assert changed["images_sha256"] != original["images_sha256"]


def test_zero_shot_hash_is_of_the_content_not_the_container(shared_data, records):
    """The AID class folders and their converted records hold the same bytes, labels and names."""
    hashes = []
    for location in (records["aid"], shared_data / "aid_sample"):
        data = datasets.load_classification(location, dataset="aid")
        hashes.append(provenance.content_hashes("zeroshot", data, provenance.image_digests(data.images)))
    assert hashes[0] == hashes[1]
    data = datasets.load_classification(records["aid"], dataset="aid")
    data.class_names[0] = data.class_names[0] + "s"  # another prompt name is another evaluation
    renamed = provenance.content_hashes("zeroshot", data, provenance.image_digests(data.images))
    assert renamed["content_sha256"] != hashes[0]["content_sha256"]
    assert renamed["images_sha256"] == hashes[0]["images_sha256"]


@pytest.fixture(scope="module")
def tiny():
    config = clip.get_model_config("tiny")
    return config, clip.init_params(config, jax.random.key(0))


def test_parameter_hash_follows_the_values_not_their_placement(tiny):
    _, params = tiny
    on_host = jax.tree.map(np.asarray, params)
    assert provenance.parameter_hash(params) == provenance.parameter_hash(on_host)
    changed = jax.tree.map(np.array, on_host)
    changed["logit_scale"] = changed["logit_scale"] + np.float32(1e-3)
    assert provenance.parameter_hash(changed) != provenance.parameter_hash(on_host)
    renamed = {"logit_scale": on_host["logit_scale"], "visual": on_host["text"], "text": on_host["visual"]}
    assert provenance.parameter_hash(renamed) != provenance.parameter_hash(on_host)  # paths are hashed too


# ---------------------------------------------------------------------------------------------------------
# Split guard.


def test_training_splits_need_an_explicit_flag_and_the_table_says_so(shared_data, records, tmp_path):
    task = f"retrieval:rsicd={records['rsicd']},split=train"
    with pytest.raises(runner.TaskError, match=r"split 'train' is a training split.*allow_train_split"):
        runner.run_tasks(None, None, [task], embedder=data_fixtures.MeanEmbedder(), progress=False)
    # the DOTA sample's manifest has only a train split, which is what an unnamed split resolves to
    with pytest.raises(runner.TaskError, match=r"split 'train' \(the only split in its manifest\)"):
        runner.run_tasks(None, None, [f"regions:dota={records['dota']},methods=crop"], embedder=data_fixtures.MeanEmbedder(),
                          progress=False)
    allowed = runner.run_tasks(None, None, [task, f"retrieval:val={records['rsicd']},split=val"],
                                embedder=data_fixtures.MeanEmbedder(), progress=False, allow_train_split=True)
    assert list(allowed.notes) == ["retrieval/rsicd"]
    assert allowed.provenance["tasks"]["retrieval/rsicd"]["training_split_allowed"] is True
    assert allowed.provenance["tasks"]["retrieval/val"]["training_split_allowed"] is False
    table = report.format_table(allowed.metrics, allowed.notes).splitlines()
    assert [line for line in table if line.startswith("retrieval/rsicd/")][0].endswith("!")
    assert not [line for line in table if line.startswith("retrieval/val/")][0].endswith("!")
    assert any(line.startswith("! retrieval/rsicd: TRAINING split 'train'") for line in table)
    assert runner.is_training_split("trainval") and runner.is_training_split("restval")
    # a tree of class folders has no manifest: a folder named like a training split (AID/train) is that split
    (tmp_path / "AID").mkdir()
    (tmp_path / "AID" / "train").symlink_to(shared_data / "aid_sample", target_is_directory=True)
    folder_task = f"zeroshot:aid={tmp_path / 'AID' / 'train'},limit=4"
    with pytest.raises(runner.TaskError, match=r"split 'train' is a training split"):
        runner.run_tasks(None, None, [folder_task], embedder=data_fixtures.MeanEmbedder(), progress=False)
    allowed = runner.run_tasks(None, None, [folder_task], embedder=data_fixtures.MeanEmbedder(), progress=False,
                                allow_train_split=True)
    entry = allowed.provenance["tasks"]["zeroshot/aid"]
    assert (entry["dataset"], entry["split"], entry["training_split_allowed"]) == ("AID", "train", True)
    assert not runner.is_training_split("test") and not runner.is_training_split("val")


def test_cli_refuses_a_training_split_without_the_flag(records, tmp_path, capsys):
    code = main(["--model", "tiny", "--tasks", f"retrieval:rsicd={records['rsicd']},split=train", "--out",
                 str(tmp_path / "o"), "--no_progress", "--no_plots"])
    assert code == 2
    assert "--allow-train-split" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


# ---------------------------------------------------------------------------------------------------------
# results.json


def test_results_json_from_library_and_cli_carry_the_same_provenance(records, tiny, tmp_path):
    config, params = tiny
    tasks = [f"retrieval:rsicd={records['rsicd']},split=val,protocol=both", f"zeroshot:aid={records['aid']},limit=30"]
    metrics = runner.evaluate(config, params, tasks, progress=False, batch_size=16,
                               results_path=tmp_path / "lib" / "results.json", run_info={"step": 100})
    from_library = json.loads((tmp_path / "lib" / "results.json").read_text())
    assert from_library["metrics"] == pytest.approx(metrics) and from_library["run"] == {"step": 100}
    model = from_library["provenance"]["model"]
    assert model["parameter_hash"] == provenance.parameter_hash(params)
    assert model["config"] == config.to_dict()
    software = from_library["provenance"]["software"]
    assert software["packages"]["jax"] == jax.__version__ and software["jax_backend"] == jax.default_backend()
    retrieval = from_library["provenance"]["tasks"]["retrieval/rsicd"]
    assert (retrieval["dataset"], retrieval["split"], retrieval["records"], retrieval["captions"]) == \
        ("rsicd", "val", 21, 105)
    assert retrieval["content_sha256"] == _retrieval_hashes(records["rsicd"])["content_sha256"]
    assert [p["name"] for p in retrieval["protocol"]["protocols"]] == ["standard", "skyscript"]
    assert retrieval["protocol"]["protocols"][1]["caption_prefix"] == "a satellite image. "
    assert retrieval["ties"] == "pessimistic" and retrieval["overlap"] is None
    zeroshot = from_library["provenance"]["tasks"]["zeroshot/aid"]
    assert (zeroshot["records"], zeroshot["limit"], zeroshot["template_set"]) == (30, 30, "farslip")
    assert zeroshot["templates"] == ["a satellite photo of {}.", "a satellite image of {}"]

    checkpoint = save_params(tmp_path / "ckpt", config, params)
    for run in ("cli1", "cli2"):  # same data, same weights: the same hashes
        assert main(["--checkpoint", str(checkpoint), "--tasks", *tasks, "--out", str(tmp_path / run),
                     "--no_progress", "--no_plots", "--batch_size", "16"]) == 0
    cli = [json.loads((tmp_path / run / "results.json").read_text())["provenance"] for run in ("cli1", "cli2")]
    for entry in cli:
        assert entry["model"]["parameter_hash"] == model["parameter_hash"]
        for prefix, task in from_library["provenance"]["tasks"].items():
            assert {k: entry["tasks"][prefix][k] for k in ("content_sha256", "images_sha256", "records")} == \
                {k: task[k] for k in ("content_sha256", "images_sha256", "records")}


def test_evaluate_hashes_the_parameters_only_when_it_writes_results(records, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(provenance, "parameter_hash", lambda params: calls.append(params) or "f" * 64)
    config, params = clip.get_model_config("tiny"), {"w": np.ones(3, np.float32)}
    tasks = [f"zeroshot:aid={records['aid']},limit=30"]
    runner.evaluate(config, params, tasks, embedder=data_fixtures.MeanEmbedder(), progress=False)
    assert calls == []
    runner.evaluate(config, params, tasks, embedder=data_fixtures.MeanEmbedder(), progress=False,
                     results_path=tmp_path / "results.json")
    assert calls == [params]
    assert json.loads((tmp_path / "results.json").read_text())["provenance"]["model"]["parameter_hash"] == "f" * 64


def test_code_version_names_this_checkouts_commit_never_an_enclosing_repository(tmp_path):
    """An installed copy that happens to sit inside another git repository (a venv in a project checkout) has
    no commit in results.json, not that project's commit."""
    import subprocess
    import sys
    from pathlib import Path

    own = provenance.code_version()
    head = subprocess.run(["git", "-C", str(Path(provenance.__file__).parents[2]), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    assert own["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)  # None: not a checkout
    project = tmp_path / "project"
    site = project / "venv" / "site-packages"
    shutil.copytree(Path(provenance.__file__).parents[1], site / "geoalign_jax",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    subprocess.run(["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "other project"], check=True)
    code = "import json; from geoalign_jax.eval import provenance; print(json.dumps(provenance.code_version()))"
    printed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(site)}, cwd=tmp_path).stdout
    assert json.loads(printed)["git_commit"] is None
