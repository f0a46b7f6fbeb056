"""FarSLIP's benchmark layout (label-column CSVs + classnames.txt), the paper suites and table.md, long-text
retrieval, and bad inputs of the new readers; on the real AID and RSICD samples with a tiny random model."""
from __future__ import annotations

import json
import pathlib
import re

import jax
import numpy as np
import pytest

from geoalign_jax import tokenizer
from geoalign_jax.data import prepare_csv, prepare_formats, skip_accounting
from geoalign_jax.eval import benchmark_root, datasets, embed, label_csv, runner, paper_tables, suites
from geoalign_jax.models import clip

CONFIG = clip.get_model_config("tiny")


@pytest.fixture(scope="module")
def params():
    return clip.init_params(CONFIG, jax.random.key(3))


@pytest.fixture(scope="module")
def embedder(params):
    return embed.JaxEmbedder(CONFIG, params, batch_size=16)


def _readable(folder: str) -> str:
    return " ".join(re.findall(r"[A-Z][a-z]*", folder)).lower()


@pytest.fixture(scope="module")
def bench(shared_data, tmp_path_factory) -> pathlib.Path:
    """A FarSLIP benchmark root from the real AID sample: aid (test CSV, integer labels) and nwpu (train CSV,
    class-name labels, one row without a label, one image missing), paths relative to the root."""
    root = tmp_path_factory.mktemp("bench")
    folders = sorted(p.name for p in (shared_data / "aid_sample").iterdir() if p.is_dir())
    names = [_readable(folder) for folder in folders]
    for dataset in ("aid", "nwpu"):
        (root / dataset).mkdir()
        (root / dataset / "classnames.txt").write_text("\n".join(names) + "\n\n")
    rows = [(f"images/{folder}/{file.name}", label) for label, folder in enumerate(folders)
            for file in sorted((shared_data / "aid_sample" / folder).iterdir())]
    (root / "images").symlink_to(shared_data / "aid_sample", target_is_directory=True)
    (root / "aid" / "aid_img_txt_pairs_test.csv").write_text(
        "filepath,label,title\n" + "".join(f"{path},{label},x\n" for path, label in rows))
    (root / "nwpu" / "img_txt_pairs_train.csv").write_text(
        "filepath,label\n" + "".join(f"{path},{names[label]}\n" for path, label in rows)
        + "images/Airport/not_there.jpg,airport\nimages/Airport/airport_5.jpg,\n")
    return root


def test_csv_zero_shot_equals_the_class_folder_reading_of_the_same_images(shared_data, bench, params, embedder):
    csv_task = runner.TaskSpec(kind="zeroshot", name="aid", path=str(bench / "aid" / "aid_img_txt_pairs_test.csv"),
                                image_root=str(bench))
    folder_task = f"zeroshot:aidfolders={shared_data / 'aid_sample'},dataset=aid"
    report = runner.run_tasks(CONFIG, params, [csv_task, folder_task], embedder=embedder, progress=False,
                               describe_model=False)
    metrics = report.metrics
    assert metrics["zeroshot/aid/num_samples"] == 120
    for key in ("top1", "top5", "mean_per_class"):
        assert metrics[f"zeroshot/aid/{key}"] == pytest.approx(metrics[f"zeroshot/aidfolders/{key}"], abs=1e-9)
    assert report.details["zeroshot/aid"]["per_class_accuracy"] == \
        pytest.approx(report.details["zeroshot/aidfolders"]["per_class_accuracy"], nan_ok=True)
    record = report.provenance["tasks"]["zeroshot/aid"]
    assert record["split"] == "test" and record["split_choice"] == {"by": "task", "split": "test"}


def test_farslip_suite_reads_the_layout_records_the_authors_split_and_writes_the_table(bench, params, embedder,
                                                                                     tmp_path):
    specs, skipped = suites.discover("farslip", bench)
    assert [spec.prefix for spec in specs] == ["zeroshot/aid", "zeroshot/nwpu"]
    assert set(skipped) >= {"zeroshot/SkyScript_cls", "zeroshot/fmow", "retrieval/rsicd", "segmentation/loveda"}
    assert skipped["segmentation/loveda"] == "not in the benchmark root (segmentation/loveda not found)"
    with pytest.raises(runner.TaskError, match=r"split 'train' is a training split.*split_by"):
        runner.run_tasks(CONFIG, params, [runner.TaskSpec(**{**specs[1].__dict__, "split_by": None})],
                          embedder=embedder, progress=False, describe_model=False)
    result = suites.run_suite(specs, skipped, model_config=CONFIG, params=params, embedder=embedder, progress=False)
    metrics, tasks = result.report.metrics, result.report.provenance["tasks"]
    # nwpu holds the same images with name labels, one unlabelled row and one missing file: counted, same numbers.
    assert metrics["zeroshot/nwpu/skipped/unlabelled"] == 1
    assert metrics["zeroshot/nwpu/skipped/missing_image_files"] == 1
    assert metrics["zeroshot/nwpu/top1"] == pytest.approx(metrics["zeroshot/aid/top1"])
    assert tasks["zeroshot/nwpu"]["split_choice"] == {
        "by": "authors", "authors": "farslip", "source": benchmark_root.FARSLIP_SOURCE, "split": "train"}
    assert tasks["zeroshot/nwpu"]["training_split_allowed"] is True
    assert any("evaluated because the authors do" in n for n in result.report.notes["zeroshot/nwpu"])
    assert result.report.provenance["model"]["parameter_hash"]
    table = suites.format_tables(suites.get_suite("farslip"), metrics, result.skipped, result.report.notes, "tiny")
    zs_ours = next(line for line in table.splitlines()[table.splitlines().index(
        "## Zero-shot scene classification, top-1 accuracy (%)"):] if line.startswith("| ours |"))
    cells = [cell.strip() for cell in zs_ours.strip("|").split("|")]
    assert cells[2] == f"{metrics['zeroshot/aid/top1']:.2f}" and cells[7] == f"{metrics['zeroshot/nwpu/top1']:.2f}"
    assert cells[1] == "skipped" and cells[-1] == "n/a (2 of 8 run)"
    assert "| FarSLIP-s2 ViT-B/16 (published) | 57.98 | 73.95 |" in table
    assert "assets/classification.png" in table and "zeroshot/fmow: not in the benchmark root" in table


def test_farslip_suite_puts_the_segmentation_miou_in_the_ovss_row(shared_data, params, embedder, tmp_path):
    """segmentation/loveda (prepared with its preset, real AID crops, random masks) is scored with the preset's
    protocol: its mIoU is the task's own and lands in the LoveDA column; a folder of another preset is skipped."""
    from PIL import Image

    from geoalign_jax.data import prepare_segmentation, segmentation_presets
    from geoalign_jax.eval import seg_task

    assert [c.task.split("/")[1] for c in paper_tables.OVSS_COLUMNS] == \
        ["openearthmap", "loveda", "potsdam", "vaihingen", "udd5", "vdd", "uavid", "isaid"]
    assert {c.task.split("/")[1] for c in paper_tables.OVSS_COLUMNS} == set(segmentation_presets.PRESETS)
    raw, rng = tmp_path / "raw", np.random.default_rng(0)
    (raw / "img").mkdir(parents=True)
    (raw / "ann").mkdir()
    for index, file in enumerate(sorted((shared_data / "aid_sample").glob("*/*.jpg"))[:2]):
        image = np.asarray(Image.open(file).convert("RGB"))[:40, :56]
        Image.fromarray(image).save(raw / "img" / f"tile_{index}.png")
        Image.fromarray(rng.integers(0, 7, image.shape[:2]).astype(np.uint8)).save(raw / "ann" / f"tile_{index}.png")
    seg_root = tmp_path / "bench" / "segmentation"
    prepare_segmentation.prepare_segmentation(raw / "img", raw / "ann", seg_root / "loveda", preset="loveda")
    prepare_segmentation.prepare_segmentation(raw / "img", raw / "ann", seg_root / "potsdam", preset="vaihingen")
    specs, skipped = suites.discover("farslip", tmp_path / "bench")
    assert [spec.prefix for spec in specs] == ["segmentation/loveda"]
    assert skipped["segmentation/potsdam"] == "segmentation/potsdam was prepared with preset 'vaihingen', not 'potsdam'"
    result = suites.run_suite(specs, skipped, model_config=CONFIG, params=params, embedder=embedder, progress=False)
    miou = result.report.metrics["segmentation/loveda/mIoU"]
    own = seg_task.evaluate_segmentation(CONFIG, params, seg_root / "loveda", embed_texts=embedder.embed_texts,
                                         matmul_precision=embedder.matmul_precision)
    assert own.options.threshold == 0.3 and own.options.resize == (448, 448)  # LoveDA's SegEarth-OV settings
    assert 0.0 < miou == pytest.approx(own.metrics["mIoU"], abs=1e-9)
    assert result.report.provenance["tasks"]["segmentation/loveda"]["split"] == "val"
    table = suites.format_tables(suites.get_suite("farslip"), result.report.metrics, result.skipped,
                                 result.report.notes, "tiny")
    lines = table.splitlines()
    ours = next(line for line in lines[lines.index("## Open-vocabulary semantic segmentation, mIoU (%)"):]
                if line.startswith("| ours |"))
    cells = [cell.strip() for cell in ours.strip("|").split("|")]
    assert cells[1:5] == ["skipped", f"{miou:.2f}", "skipped", "skipped"] and cells[-1] == "n/a (1 of 8 run)"


def test_suite_cli_writes_table_md_and_results(bench, tmp_path):
    from geoalign_jax.eval.__main__ import main

    out = tmp_path / "out"
    assert main(["--model", "tiny", "--suite", "dgtrs", "--benchmark-root", str(bench), "--out", str(out),
                 "--no-progress", "--no-plots", "--batch-size", "16"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["suite"] == "dgtrs"
    assert "retrieval/dgtrsd_long" in results["run"]["suite_skipped"]
    table = (out / "table.md").read_text()
    assert "| DGTRS-CLIP (published) | " + " | ".join([paper_tables.NOT_READ] * 3) + " |" in table
    assert "semantic localization (SeLo): task kind not implemented" in table
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--suite", "farslip", "--out", str(out)])  # no --benchmark-root


def test_published_tables_are_rectangular_and_means_match_the_source():
    for suite in suites.SUITES.values():
        for table in suite.tables:
            for row in table.published:
                assert len(row.values) == len(table.columns) + int(table.mean)
                if table.mean and all(v is not None for v in row.values):  # the paper's own mean, to rounding
                    assert np.mean(row.values[:-1]) == pytest.approx(row.values[-1], abs=0.011)


@pytest.fixture(scope="module")
def long_records(shared_data, tmp_path_factory) -> pathlib.Path:
    """12 AID images with short captions and long captions (every third one longer than 77 tokens, one
    record without a long caption)."""
    out = tmp_path_factory.mktemp("long")
    files = sorted((shared_data / "aid_sample").glob("*/*.jpg"))[:12]
    lines = []
    for index, file in enumerate(files):
        scene = _readable(file.parent.name)
        long = f"an aerial scene of {scene} " + ("with roads, trees and buildings " * (12 if index % 3 == 0 else 1))
        obj = {"image": str(file), "split": "test", "captions": [f"a photo of {scene}"]}
        if index != 5:
            obj["long_caption"] = long.strip()
        lines.append(json.dumps(obj))
    (out / "long.jsonl").write_text("\n".join(lines) + "\n")
    prepare_formats.prepare_jsonl(out / "long.jsonl", out / "records", name="long", progress=False)
    return out / "records"


def test_long_text_retrieval_scores_long_captions_and_counts_truncation(long_records, params, embedder):
    report = runner.run_tasks(
        CONFIG, params, [f"retrieval:dg={long_records},text=long", f"retrieval:short={long_records}"],
        embedder=embedder, progress=False, describe_model=False)
    metrics = report.metrics
    data = datasets.load_retrieval(long_records, text="long")
    assert data.skipped == {"records_without_long_caption": 1} and len(data.captions) == 11
    texts = [caption for captions in data.captions for caption in captions]
    assert all(t.startswith("an aerial scene of") for t in texts)
    context = CONFIG.text.context_length
    too_long = sum(tokenizer.count_tokens(t) > context for t in texts)
    assert too_long == 4  # the 12-fold texts of records 0, 3, 6, 9
    assert metrics["retrieval/dg/standard/truncated_texts"] == too_long
    assert metrics["retrieval/dg/standard/context_length"] == context
    assert metrics["retrieval/dg/standard/skipped/records_without_long_caption"] == 1
    assert metrics["retrieval/short/standard/truncated_texts"] == 0
    assert any("truncated" in note for note in report.notes["retrieval/dg"])
    # The long-text score is retrieval over exactly those texts: recompute R@1 from the embeddings.
    images = embedder.embed_images(np.stack([
        __import__("geoalign_jax.eval.preprocess", fromlist=["x"]).preprocess_bytes(
            data.images.image_bytes(i), CONFIG.vision.image_size) for i in range(len(data.images))]))
    sims = (images / np.linalg.norm(images, axis=1, keepdims=True)) @ \
        (lambda t: t / np.linalg.norm(t, axis=1, keepdims=True))(embedder.embed_texts(texts)).T
    i2t_r1 = np.mean([sims[i].max() == sims[i, i] and (sims[i] == sims[i, i]).sum() == 1 for i in range(11)])
    assert metrics["retrieval/dg/standard/i2t_R@1"] == pytest.approx(100 * i2t_r1)
    assert report.provenance["tasks"]["retrieval/dg"]["protocol"]["text"] == "long"


# ---------------------------------------------------------------------------------------------------------
# Bad inputs of the new readers: one clear error naming the file and line, or a counted skip.


@pytest.mark.parametrize("content, message", [
    ("a\n\nb\n", r"classnames.txt:2: blank line between class names"),
    ("a\nb\na\n", r"classnames.txt:3: class 'a' repeats line 1"),
    ("\n\n", r"classnames.txt: no class names"),
])
def test_bad_class_lists_are_refused_naming_the_line(tmp_path, content, message):
    path = tmp_path / "classnames.txt"
    path.write_text(content)
    with pytest.raises(datasets.EvalDataError, match=message):
        label_csv.read_class_names(path)
    with pytest.raises(datasets.EvalDataError, match="class list not found"):
        label_csv.read_class_names(tmp_path / "absent.txt")


@pytest.mark.parametrize("rows, message", [
    ("filepath,label\nimg.jpg,2\n", r"x.csv:2: label 2 is outside the 2 classes"),
    ("filepath,label\nimg.jpg,-1\n", r"x.csv:2: label -1 is outside"),
    ("filepath,label\nimg.jpg,cat\n", r"x.csv:2: label 'cat' is neither a class index nor a name"),
    ("filepath,klass\nimg.jpg,1\n", r"no column 'label'"),
    ("filepath,label\nimg.jpg,1,extra\n", r"x.csv:2: the row's fields differ from the header"),
    ("filepath,label\n,1\n", r"x.csv:2: empty 'filepath'"),
    ("filepath,label\nabsent.jpg,1\n", r"no labelled rows with an existing image file"),
])
def test_bad_label_csvs_are_refused_naming_the_line(shared_data, tmp_path, rows, message):
    image = next((shared_data / "aid_sample").glob("*/*.jpg"))
    (tmp_path / "img.jpg").write_bytes(image.read_bytes())
    (tmp_path / "x.csv").write_text(rows)
    with pytest.raises(datasets.EvalDataError, match=message):
        label_csv.load_label_csv(tmp_path / "x.csv", class_names=["airport", "beach"])


def test_bad_caption_csv_and_task_options_are_refused(shared_data, tmp_path):
    (tmp_path / "ret.csv").write_text("filepath,caption\nimg.jpg,a\n")
    with pytest.raises(datasets.EvalDataError, match=r"no column 'title'"):
        label_csv.load_caption_csv(tmp_path / "ret.csv")
    with pytest.raises(runner.TaskError, match=r"split_by must be one of \['farslip'\]"):
        runner.parse_task(f"zeroshot:x={tmp_path / 'ret.csv'},split_by=someone")
    with pytest.raises(runner.TaskError, match=r"text must be one of"):
        runner.parse_task(f"retrieval:x={tmp_path / 'ret.csv'},text=medium")
    spec = runner.parse_task(f"retrieval:x={tmp_path / 'ret.csv'},text=long")
    with pytest.raises(datasets.EvalDataError, match=r"text=long needs records with long_caption"):
        benchmark_root.load_csv_task(spec)
    with pytest.raises(datasets.EvalDataError, match=r"no class list: .*classnames.txt not found"):
        benchmark_root.load_csv_task(runner.parse_task(f"zeroshot:x={tmp_path / 'ret.csv'}"))
    with pytest.raises(runner.TaskError, match=r"benchmark root not found"):
        suites.discover("farslip", tmp_path / "absent")
    with pytest.raises(runner.TaskError, match=r"unknown suite"):
        suites.discover("clip", tmp_path)


def test_split_by_admits_only_the_authors_files_on_their_split(tmp_path):
    """split_by=farslip lets a training split past the guard only for a file FarSLIP reads on that split: on any
    other training data, or another split of FarSLIP's file, it is refused naming why (not a switch)."""
    ours = runner.parse_task(f"zeroshot:nwpu={tmp_path / 'nwpu' / 'img_txt_pairs_train.csv'},split_by=farslip")
    assert "evaluated because the authors do" in runner.split_guard(ours, "train", [], allow=False)
    for task, split, message in (
            (f"zeroshot:mine={tmp_path / 'mine' / 'img_txt_pairs_train.csv'},split_by=farslip", "train",
             r"split_by=farslip: .*mine.*is not one of the files"),
            (f"zeroshot:nwpu={tmp_path / 'nwpu' / 'img_txt_pairs_train.csv'},split=val,split_by=farslip", "val",
             r"the authors read nwpu/img_txt_pairs_train.csv as split 'train', this task asks for 'val'"),
            (f"retrieval:rs5m={tmp_path / 'rs5m'},split=train,split_by=farslip", "train", "is not one of the files")):
        with pytest.raises(runner.TaskError, match=message):
            runner.split_guard(runner.parse_task(task), split, ["train"], allow=False)
    retrieval = runner.parse_task(f"retrieval:rsicd={tmp_path / 'retrieval/RSICD/RSICD_img_txt_pairs_test.csv'},"
                                  "split_by=farslip")
    assert runner.split_guard(retrieval, "test", [], allow=False) is None


def test_class_lists_ship_for_seven_farslip_sets_and_flag_a_different_list():
    from geoalign_jax.eval import classnames

    assert len(classnames.dataset_class_names("fmow")) == 62 and len(classnames.dataset_class_names("nwpu")) == 45
    assert len(classnames.dataset_class_names("millionaid")) == 51 and len(classnames.dataset_class_names("rsicb")) == 35
    assert benchmark_root.class_list_mismatch("rsicb", sorted(classnames.RSICB256.values(), reverse=True)) is None
    assert "not in it: ['city_avenue']" in benchmark_root.class_list_mismatch(  # RSI-CB128's, not RSI-CB256's
        "rsicb", list(classnames.RSICB256)[:-1] + ["city_avenue"])
    aid_readable = list(classnames.AID.values())
    assert benchmark_root.class_list_mismatch("aid", aid_readable) is None
    assert benchmark_root.class_list_mismatch("aid", list(classnames.AID)) is None
    assert "not in it: ['volcano']" in benchmark_root.class_list_mismatch("aid", aid_readable[:-1] + ["volcano"])
    assert benchmark_root.class_list_mismatch("SkyScript_cls", ["anything"]) is None  # nothing shipped to compare


def test_prepare_labels_csv_writes_records_and_counts_bad_rows(bench, tmp_path):
    from geoalign_jax import prepare

    csv = tmp_path / "set_img_txt_pairs_val.csv"
    rows = (bench / "aid" / "aid_img_txt_pairs_test.csv").read_text().splitlines()
    csv.write_text("\n".join(rows[:5] + [rows[1], "images/Airport/airport_5.jpg,77,x",
                                         "images/Beach/x.jpg,zebra,x"]) + "\n")
    summary = prepare_csv.prepare_label_csv(csv, bench / "aid" / "classnames.txt", tmp_path / "out", name="aid",
                                            image_root=bench, progress=False, max_bad_fraction=0.5)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["val"] and manifest["splits"]["val"]["count"] == 4
    assert manifest["raw_class_names"][1] == "bare land" and len(manifest["class_names"]) == 30
    assert summary.skipped == {skip_accounting.DUPLICATE_ID: 1, skip_accounting.MALFORMED_LINE: 2}
    examples = " ".join(summary.skipped_examples[skip_accounting.MALFORMED_LINE])
    assert "set_img_txt_pairs_val.csv:7 (label 77 is outside the 30 classes" in examples
    assert "set_img_txt_pairs_val.csv:8 (label 'zebra' is neither" in examples
    assert prepare.main(["labels-csv", "--csv", str(csv), "--classnames", str(tmp_path / "absent.txt"),
                         "--name", "x", "--out", str(tmp_path / "bad"), "--no-progress"]) == 1
    with pytest.raises(skip_accounting.ConversionError, match=r"class list not found"):
        prepare_csv.read_class_lines(tmp_path / "absent.txt")
