"""The seed papers' corpus converters (MGRS-200k JSON, webdataset shards, SkyScript CSV) on fixtures written here
in exactly the published layouts, with every kind of bad input; every record that comes back is checked."""
from __future__ import annotations

import gzip
import io
import json
import pathlib
import tarfile

import numpy as np
import pytest
from PIL import Image

from geoalign_jax.data import prepare_corpora, records, skip_accounting, sources
from geoalign_jax.data.skip_accounting import ConversionError

QUIET = {"progress": False, "workers": 1}


def _image_bytes(size: tuple[int, int], fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _truncated_jpeg() -> bytes:
    data = _image_bytes((64, 64), "JPEG")
    return data[: len(data) // 2]  # header intact (PIL opens it), pixel data cut


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _records(out_dir: pathlib.Path, split: str) -> dict[str, dict]:
    source = sources.RecordSource.from_dir(out_dir, split)
    return {record["id"]: record for record in (source[i] for i in range(len(source)))}


def _regions(record: dict) -> list[tuple]:
    return [(r["box"], r["category"], r["category_id"], r["caption"]) for r in record["regions"]]


# ---------------------------------------------------------------------------------------------------------
# MGRS-200k


def _bbox(x1, y1, x2, y2, width=40, height=30) -> dict:
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "W": width, "H": height}


def _mgrs_fixture(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    root = tmp_path / "global_imgs"
    _write(root / "a.jpg", _image_bytes((40, 30), "JPEG", 1))
    _write(root / "sub" / "b.png", _image_bytes((20, 20), "PNG", 2))
    _write(root / "c.jpg", _image_bytes((20, 15), "JPEG", 3))  # stored at half the annotated 40 x 30
    _write(root / "d.jpg", _image_bytes((40, 30), "JPEG", 4))
    _write(root / "broken.jpg", _truncated_jpeg())
    items = [
        {"global_filepath": "a.jpg", "global_caption": "an airport", "brief_caption": "airport",
         "detailed_caption": "A long view of an airport with one plane.",
         "segment": [
             {"bbox": _bbox(2, 3, 12, 13), "category": "airplane", "category_id": 7},
             {"bbox": _bbox(20, 5, 30, 15), "cap": "a white plane near the terminal"},
             {"bbox": _bbox(50, 5, 60, 10), "category": "ship", "category_id": 3},  # outside the image
             {"bbox": _bbox(-4, 0, 16, 10), "category": " airplane ", "category_id": 7},  # 80% inside: clipped
             {"bbox": {"x1": "a", "y1": 0, "x2": 5, "y2": 5, "W": 40, "H": 30}, "category": "ship",
              "category_id": 3},  # malformed
             {"bbox": [1, 1, 9, 9, 40, 30], "category": "ship", "category_id": 3},  # FarSLIP's values() order
         ]},
        {"global_filepath": "sub/b.png", "detailed_caption": "A harbour with a single boat.",
         "segment": [{"bbox": _bbox(0, 0, 10, 10, 20, 20), "category": "ship", "category_id": 3},
                     {"bbox": _bbox(5, 5, 15, 15, 20, 20), "category": "boat", "category_id": 3},  # id conflict
                     {"bbox": _bbox(1, 1, 4, 4, 20, 20), "category": "ship"}]},  # no category_id
        {"global_filepath": "broken.jpg", "global_caption": "a farm"},
        {"global_filepath": "missing.jpg", "global_caption": "a lake"},
        {"global_filepath": "c.jpg", "global_caption": "   ", "brief_caption": "a harbour",
         "segment": [{"bbox": _bbox(10, 6, 30, 24), "category": "ship", "category_id": 3}]},
        {"segment": []},  # no global_filepath
        {"global_filepath": "d.jpg", "global_caption": "", "segment": None},  # no text at all
        {"global_filepath": "a.jpg", "global_caption": "the same image again"},
    ]
    json_path = tmp_path / "text_info.json"
    json_path.write_text(json.dumps(items))
    return json_path, root


def test_mgrs_records_boxes_and_every_skip(tmp_path):
    json_path, root = _mgrs_fixture(tmp_path)
    out = tmp_path / "out"
    summary = prepare_corpora.prepare_mgrs(json_path, root, out, max_bad_fraction=1.0, **QUIET)

    assert summary.written == {"train": 3}
    assert summary.skipped == {
        skip_accounting.MALFORMED_ANNOTATION: 3, prepare_corpora.CATEGORY_ID_CONFLICT: 1, skip_accounting.BOX_OUTSIDE_IMAGE: 1,
        skip_accounting.BROKEN_IMAGE: 1, skip_accounting.UNKNOWN_FILE: 1, skip_accounting.EMPTY_CAPTION: 2, skip_accounting.NO_TEXT: 1,
        skip_accounting.DUPLICATE_ID: 1,
    }
    examples = summary.skipped_examples
    assert examples[skip_accounting.MALFORMED_ANNOTATION] == [
        "text_info.json[0].segment[4]",
        "text_info.json[1].segment[2] (needs 'cap', or 'category' and an int 'category_id')",
        "text_info.json[5]"]
    assert examples[prepare_corpora.CATEGORY_ID_CONFLICT] == ["text_info.json[1].segment[1] (3: 'boat', earlier 'ship')"]
    assert examples[skip_accounting.BOX_OUTSIDE_IMAGE] == ["text_info.json[0].segment[2]"]
    assert examples[skip_accounting.BROKEN_IMAGE] == ["text_info.json[2] (broken.jpg)"]
    assert examples[skip_accounting.UNKNOWN_FILE] == ["text_info.json[3] (missing.jpg)"]
    assert examples[skip_accounting.NO_TEXT] == ["text_info.json[6] (d.jpg)"]
    assert examples[skip_accounting.DUPLICATE_ID] == ["text_info.json[7] (a.jpg)"]
    assert (summary.records_seen, summary.records_skipped) == (8, 5)

    manifest = sources.read_manifest(out)
    assert manifest["category_names"] == ["ship", "airplane"] and manifest["mgrs_category_ids"] == [3, 7]
    got = _records(out, "train")
    assert sorted(got) == ["a.jpg", "c.jpg", "sub/b.png"]
    a = got["a.jpg"]
    assert (a["width"], a["height"]) == (40, 30)
    assert a["captions"] == ["an airport", "airport"]
    assert a["long_caption"] == "A long view of an airport with one plane."
    assert _regions(a) == [
        ([2.0, 3.0, 12.0, 13.0], "airplane", 1, None),
        ([20.0, 5.0, 30.0, 15.0], None, -1, "a white plane near the terminal"),  # a region caption: no category
        ([0.0, 0.0, 16.0, 10.0], "airplane", 1, None),
        ([1.0, 1.0, 9.0, 9.0], "ship", 0, None),
    ]
    b = got["sub/b.png"]
    assert b["captions"] == [] and b["long_caption"] == "A harbour with a single boat."
    assert _regions(b) == [([0.0, 0.0, 10.0, 10.0], "ship", 0, None)]
    c = got["c.jpg"]
    assert (c["width"], c["height"]) == (20, 15) and c["captions"] == ["a harbour"]
    assert _regions(c) == [([5.0, 3.0, 15.0, 12.0], "ship", 0, None)]  # 40 x 30 frame -> 20 x 15 pixels
    assert c["image"] == (root / "c.jpg").read_bytes()  # JPEG bytes stored as they are


def test_mgrs_default_bad_fraction_fails_and_writes_nothing(tmp_path):
    json_path, root = _mgrs_fixture(tmp_path)
    with pytest.raises(ConversionError, match="inputs skipped") as error:
        prepare_corpora.prepare_mgrs(json_path, root, tmp_path / "out", **QUIET)
    assert error.value.summary.failed and not (tmp_path / "out").exists()  # not even an empty folder


def test_mgrs_box_parsing():
    assert prepare_corpora.mgrs_box(_bbox(1, 2, 3, 4, 10, 20)) == ((1.0, 2.0, 3.0, 4.0), (10.0, 20.0))
    assert prepare_corpora.mgrs_box({"x1": 1, "y1": 2, "x2": 3, "y2": 4}) == ((1.0, 2.0, 3.0, 4.0), None)
    assert prepare_corpora.mgrs_box((1, 2, 3, 4, 10, 20)) == ((1.0, 2.0, 3.0, 4.0), (10.0, 20.0))
    assert prepare_corpora.mgrs_box([1, 2, 3, 4]) == ((1.0, 2.0, 3.0, 4.0), None)
    for bad in (None, [1, 2, 3], [1, 2, 3, 4, 5], _bbox(1, 2, 3, 4, 0, 20), _bbox(1, 2, 3, True),
                {"x1": 1, "y1": 2, "x2": 3}, {"x1": 1, "y1": 2, "x2": 3, "y2": 4, "W": 10},
                {"x": 1, "y": 2, "w": 3, "h": 4}):  # by position this could be read as a wrong box
        assert prepare_corpora.mgrs_box(bad) is None, bad


def test_mgrs_refuses_a_file_that_is_not_a_list(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"images": []}))
    with pytest.raises(ConversionError, match="expected an MGRS JSON list"):
        prepare_corpora.prepare_mgrs(tmp_path / "t.json", tmp_path, tmp_path / "out", **QUIET)


# ---------------------------------------------------------------------------------------------------------
# Webdataset shards


def _tar(path: pathlib.Path, members: list[tuple[str, bytes]]) -> pathlib.Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _webdataset_fixture(tmp_path: pathlib.Path) -> dict[str, bytes]:
    images = {name: _image_bytes((24, 16), fmt, seed) for seed, (name, fmt) in
              enumerate([("p0", "JPEG"), ("p1", "PNG"), ("p3", "WEBP"), ("q0", "JPEG"), ("r0", "PNG"),
                         ("r1", "JPEG"), ("t0", "PNG")])}
    _tar(tmp_path / "pub11-train-0000.tar", [
        ("000000.jpg", images["p0"]), ("000000.txt", "a harbour with ships".encode()),
        ("000000.json", b'{"source": "pub11"}'),
        ("000001.png", images["p1"]), ("000001.txt", b"  \n"),  # blank caption
        ("000002.txt", b"a caption without its image"),
        ("000003.webp", images["p3"]), ("000003.txt", "a road".encode()),
        ("000004.jpg", _truncated_jpeg()), ("000004.txt", b"a field"),
        ("000005.jpg", images["t0"]),  # no caption member
    ])
    _tar(tmp_path / "pub11-train-0001.tar", [("sub/000006.jpg", images["q0"]), ("sub/000006.txt", b"a bridge")])
    # RS5M's own member names
    _tar(tmp_path / "rs3-train-0000.tar", [
        ("100.img_content", images["r0"]), ("100.img_name", b"x.png"), ("100.caption", "ships in a port".encode()),
        ("101.img_content", images["r1"]), ("101.caption", b"\xff\xfe bad utf-8"),
    ])
    # a shard cut short inside the second sample's image: the first sample is kept
    full = _tar(tmp_path / "full.tar", [("200.jpg", images["r1"]), ("200.txt", b"a beach"),
                                        ("201.jpg", images["p0"]), ("201.txt", b"a lake")])
    with tarfile.open(full) as archive:
        cut = archive.getmember("201.jpg").offset_data + len(images["p0"]) // 2
    (tmp_path / "rs3-train-0001.tar").write_bytes(full.read_bytes()[:cut])
    full.unlink()
    return images


def test_webdataset_shards_with_braces_every_record_and_skip(tmp_path):
    images = _webdataset_fixture(tmp_path)
    out = tmp_path / "out"
    pattern = str(tmp_path / "{pub11,rs3}-train-{0000..0001}.tar")
    summary = prepare_corpora.prepare_webdataset(pattern, out, name="rs5m", max_bad_fraction=1.0, **QUIET)

    got = _records(out, "train")
    assert sorted(got) == ["pub11-train-0000/000000", "pub11-train-0000/000003", "pub11-train-0001/sub/000006",
                           "rs3-train-0000/100", "rs3-train-0001/200"]
    assert got["pub11-train-0000/000000"]["captions"] == ["a harbour with ships"]
    assert got["pub11-train-0000/000000"]["image"] == images["p0"]
    webp = got["pub11-train-0000/000003"]
    assert records.image_format(webp["image"][:8]) == "png" and (webp["width"], webp["height"]) == (24, 16)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(webp["image"]))),
                          np.asarray(Image.open(io.BytesIO(images["p3"])).convert("RGB")))  # lossless re-encode
    assert got["pub11-train-0001/sub/000006"]["captions"] == ["a bridge"]
    assert got["rs3-train-0000/100"]["captions"] == ["ships in a port"]
    assert got["rs3-train-0000/100"]["image"] == images["r0"]
    assert got["rs3-train-0001/200"]["captions"] == ["a beach"]
    assert all(record["source"] == "rs5m" and record["regions"] == [] for record in got.values())

    assert summary.skipped == {skip_accounting.EMPTY_CAPTION: 1, skip_accounting.NO_CAPTIONS: 2, prepare_corpora.NO_IMAGE_IN_SAMPLE: 1,
                               skip_accounting.BROKEN_IMAGE: 1, prepare_corpora.CAPTION_NOT_UTF8: 1, prepare_corpora.UNREADABLE_SHARD: 1}
    examples = summary.skipped_examples
    assert examples[skip_accounting.NO_CAPTIONS] == ["pub11-train-0000.tar:000001", "pub11-train-0000.tar:000005"]
    assert examples[prepare_corpora.NO_IMAGE_IN_SAMPLE] == ["pub11-train-0000.tar:000002 (members: txt)"]
    assert examples[skip_accounting.BROKEN_IMAGE] == ["pub11-train-0000.tar:000004"]
    assert examples[prepare_corpora.CAPTION_NOT_UTF8] == ["rs3-train-0000.tar:101"]
    assert examples[prepare_corpora.UNREADABLE_SHARD][0].startswith("rs3-train-0001.tar (ReadError")
    assert (summary.records_seen, summary.records_skipped) == (11, 6)  # 10 samples + the damaged shard
    manifest = sources.read_manifest(out)
    assert manifest["shards_read"] == ["pub11-train-0000.tar", "pub11-train-0001.tar", "rs3-train-0000.tar",
                                       "rs3-train-0001.tar"]


def test_webdataset_output_is_the_same_with_worker_processes(tmp_path):
    _webdataset_fixture(tmp_path)
    pattern = str(tmp_path / "{pub11,rs3}-train-{0000..0001}.tar")
    for workers, out in ((1, "one"), (2, "two")):
        prepare_corpora.prepare_webdataset(pattern, tmp_path / out, name="w", max_bad_fraction=1.0,
                                   records_per_shard=2, workers=workers, progress=False)
    shards = sorted(path.name for path in (tmp_path / "one").glob("*.array_record"))
    assert shards == [f"w-train-{index:05d}-of-00003.array_record" for index in range(3)]  # 5 records
    assert shards == sorted(path.name for path in (tmp_path / "two").glob("*.array_record"))
    assert all((tmp_path / "one" / shard).read_bytes() == (tmp_path / "two" / shard).read_bytes() for shard in shards)


def test_webdataset_shard_cut_at_a_member_boundary_counts_and_keeps_the_samples_before(tmp_path):
    image = _image_bytes((8, 8), "PNG")
    for compressed in (False, True):
        full = _tar(tmp_path / "full.tar", [("0.png", image), ("0.txt", b"a"), ("1.png", image), ("1.txt", b"b"),
                                            ("2.png", image), ("2.txt", b"c")])
        with tarfile.open(full) as archive:
            cut = archive.getmember("2.txt").offset  # just before a header: tarfile alone reads this as complete
        data = full.read_bytes()[:cut]
        shard = tmp_path / ("cut.tar.gz" if compressed else "cut.tar")
        shard.write_bytes(gzip.compress(data) if compressed else data)
        out = tmp_path / f"out{compressed}"
        summary = prepare_corpora.prepare_webdataset(str(shard), out, name="w", max_bad_fraction=1.0, **QUIET)
        assert sorted(_records(out, "train")) == ["cut/0", "cut/1"]  # sample 2 (image, no caption) is dropped
        assert summary.skipped == {prepare_corpora.UNREADABLE_SHARD: 1}, compressed


def test_brace_expansion_and_missing_shards(tmp_path):
    names = prepare_corpora.expand_braces("{pub11,rs3}-train-{0000..0031}.tar")
    assert len(names) == 64 and names[:2] == ["pub11-train-0000.tar", "pub11-train-0001.tar"]
    assert names[31:33] == ["pub11-train-0031.tar", "rs3-train-0000.tar"] and names[-1] == "rs3-train-0031.tar"
    assert prepare_corpora.expand_braces("a-{8..11}.tar") == ["a-8.tar", "a-9.tar", "a-10.tar", "a-11.tar"]
    assert prepare_corpora.expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(ConversionError, match="cannot expand"):
        prepare_corpora.expand_braces("a-{x}.tar")
    _tar(tmp_path / "s-0.tar", [("0.jpg", b"")])
    with pytest.raises(ConversionError, match=r"shard\(s\) not found: .*s-1.tar"):
        prepare_corpora.resolve_shards(str(tmp_path / "s-{0..1}.tar"))
    with pytest.raises(ConversionError, match="not found: .*nothing-\\*.tar"):
        prepare_corpora.resolve_shards([str(tmp_path / "s-*.tar"), str(tmp_path / "nothing-*.tar")])
    assert prepare_corpora.resolve_shards(str(tmp_path / "s-*.tar")) == [tmp_path / "s-0.tar"]


# ---------------------------------------------------------------------------------------------------------
# SkyScript-style CSV / TSV


def _csv_fixture(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    for name, fmt, seed in (("a.jpg", "JPEG", 1), ("b.png", "PNG", 2), ("c.jpg", "JPEG", 3), ("d.png", "PNG", 4)):
        _write(tmp_path / "images" / name, _image_bytes((16, 12), fmt, seed))
    _write(tmp_path / "images" / "broken.jpg", _truncated_jpeg())
    train = tmp_path / "train.csv"
    train.write_text(
        "filepath,title,title_multi_objects\n"
        'images/a.jpg,"a road, with cars",x\n'
        "images/b.png,   ,x\n"
        "images/a.jpg,a second caption of a,x\n"
        "images/missing.jpg,a lake,x\n"
        ",no image,x\n"
        "images/c.jpg,a farm,x,extra\n"
        "images/broken.jpg,a field,x\n"
        "images/c.jpg,a farm with a barn,x\n",
        encoding="utf-8")
    val = tmp_path / "val.tsv"
    val.write_text("filepath\ttitle\nimages/d.png\ta bridge over a river\nimages/a.jpg\tin two splits\n")
    return train, val


def test_csv_train_and_retrieval_split_every_record_and_skip(tmp_path):
    train, val = _csv_fixture(tmp_path)
    out = tmp_path / "out"
    summary = prepare_corpora.prepare_csv({"train": train, "val": val}, out, name="skyscript", max_bad_fraction=1.0,
                                  **QUIET)
    assert summary.written == {"train": 2, "val": 1}
    train_records, val_records = _records(out, "train"), _records(out, "val")
    assert train_records["images/a.jpg"]["captions"] == ["a road, with cars", "a second caption of a"]
    assert train_records["images/c.jpg"]["captions"] == ["a farm with a barn"]
    assert list(val_records) == ["images/d.png"]
    assert val_records["images/d.png"]["captions"] == ["a bridge over a river"]
    assert val_records["images/d.png"]["image"] == (tmp_path / "images" / "d.png").read_bytes()
    assert summary.skipped == {skip_accounting.EMPTY_CAPTION: 1, skip_accounting.NO_CAPTIONS: 1, skip_accounting.UNKNOWN_FILE: 1,
                               skip_accounting.MALFORMED_LINE: 2, skip_accounting.BROKEN_IMAGE: 1, skip_accounting.DUPLICATE_ID: 1}
    assert summary.skipped_examples[skip_accounting.MALFORMED_LINE] == ["train.csv:6 (empty image path)",
                                                               "train.csv:7 (fields differ from the header)"]
    assert summary.skipped_examples[skip_accounting.NO_CAPTIONS] == ["train.csv:3 (images/b.png)"]
    assert summary.skipped_examples[skip_accounting.UNKNOWN_FILE] == ["train.csv:5 (images/missing.jpg)"]
    assert summary.skipped_examples[skip_accounting.DUPLICATE_ID] == ["val.tsv:3 (images/a.jpg)"]
    assert sources.read_manifest(out)["csv_columns"] == {"image": "filepath", "caption": "title"}


def test_csv_column_names_and_separator_are_flags(tmp_path):
    _write(tmp_path / "imgs" / "x.png", _image_bytes((8, 8), "PNG"))
    table = tmp_path / "pairs.txt"
    table.write_text("text;path\na pond;x.png\n")
    with pytest.raises(ConversionError, match=r"no column 'filepath', 'title' \(header: \['text;path'\]"):
        prepare_corpora.prepare_csv(table, tmp_path / "o1", name="t", image_root=tmp_path / "imgs", **QUIET)
    with pytest.raises(ConversionError, match="no column 'filepath'"):
        prepare_corpora.prepare_csv(table, tmp_path / "o2", name="t", separator="semicolon", **QUIET)
    summary = prepare_corpora.prepare_csv(table, tmp_path / "o3", name="t", image_column="path", caption_column="text",
                                  separator=";", image_root=tmp_path / "imgs", split="val", **QUIET)
    assert summary.written == {"val": 1}
    assert _records(tmp_path / "o3", "val")["x.png"]["captions"] == ["a pond"]
    with pytest.raises(ConversionError, match="one character"):
        prepare_corpora.prepare_csv(table, tmp_path / "o4", name="t", separator=";;", **QUIET)
