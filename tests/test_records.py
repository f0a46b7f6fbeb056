"""Record format v1 and the shard sources: round trips, rejection of bad examples, errors naming shard + index."""
from __future__ import annotations

import io
import json
import pickle

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from geoalign_jax.data import records, sources
from geoalign_jax.data.records import RecordError


def _png_bytes(width: int = 12, height: int = 8, color: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="PNG")
    return buffer.getvalue()


def _example(**overrides) -> dict:
    example = records.make_record(
        id="img-1", source="unit", split="train", image=_png_bytes(), width=12, height=8,
        captions=["a small green field", "two roads cross"], long_caption="A long description of the scene.",
        hard_negatives=["a small red field"],
        regions=[{"box": [1, 2, 6, 7], "category": "field", "category_id": 3},
                 records.make_region([0.5, 0.5, 12.0, 8.0], caption="the whole scene")],
        label=4, class_name="farmland",
    )
    example.update(overrides)
    return example


def _write_shard(path, payloads) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for payload in payloads:
        writer.write(payload)
    writer.close()


def test_round_trip_keeps_every_field():
    example = _example()
    decoded = records.decode_record(records.encode_record(example))
    assert decoded["format"] == records.FORMAT_NAME and decoded["version"] == records.FORMAT_VERSION == 1
    for field in records.REQUIRED_FIELDS + tuple(records.OPTIONAL_DEFAULTS):
        if field != "regions":
            assert decoded[field] == example[field], field
    assert decoded["regions"] == [
        {"box": [1.0, 2.0, 6.0, 7.0], "category": "field", "category_id": 3, "caption": None},
        {"box": [0.5, 0.5, 12.0, 8.0], "category": None, "category_id": -1, "caption": "the whole scene"},
    ]
    assert all(isinstance(v, float) for region in decoded["regions"] for v in region["box"])
    assert set(decoded) == set(records.RECORD_FIELDS)


def test_optional_fields_get_defaults_and_encoding_is_deterministic():
    minimal = {"id": "x", "source": "s", "split": "test", "image": _png_bytes(), "width": 12, "height": 8}
    data = records.encode_record(minimal)
    assert data == records.encode_record(dict(reversed(list(minimal.items()))))  # field order does not matter
    decoded = records.decode_record(data)
    assert decoded["captions"] == [] and decoded["regions"] == [] and decoded["hard_negatives"] == []
    assert decoded["long_caption"] is None and decoded["label"] == -1 and decoded["class_name"] is None
    # a decoded record encodes again to the same bytes (format/version fields are accepted)
    assert records.encode_record(decoded) == data


def test_record_is_plain_msgpack_without_pickle():
    data = records.encode_record(_example())
    assert b"pickle" not in data and not data.startswith(b"\x80")  # pickle protocol header
    plain = msgpack.unpackb(data, raw=False)
    assert plain["id"] == "img-1" and isinstance(plain["image"], bytes)


@settings(max_examples=40, deadline=None)
@given(
    captions=st.lists(st.text(min_size=1).filter(lambda t: t.strip() != ""), max_size=4),
    box=st.tuples(st.floats(0, 5), st.floats(0, 3), st.floats(6, 12), st.floats(4, 8)),
    label=st.integers(-1, 10_000),
)
def test_round_trip_property(captions, box, label):
    example = _example(captions=captions, regions=[records.make_region(box, category="x")], label=label)
    decoded = records.decode_record(records.encode_record(example))
    assert decoded["captions"] == captions
    assert decoded["regions"][0]["box"] == [float(v) for v in box]
    assert decoded["label"] == label


@pytest.mark.parametrize(
    "overrides, field_in_message",
    [
        ({"captions": ["good", "  "]}, "captions[1]"),
        ({"captions": "not a list"}, "captions"),
        ({"hard_negatives": [""]}, "hard_negatives[0]"),
        ({"long_caption": ""}, "long_caption"),
        ({"image": b""}, "image"),
        ({"image": None}, "image"),
        ({"image": b"GIF89a" + b"\x00" * 20}, "image"),
        ({"width": "12"}, "width"),
        ({"height": 0}, "height"),
        ({"width": True}, "width"),
        ({"id": ""}, "id"),
        ({"split": 3}, "split"),
        ({"label": -2}, "label"),
        ({"label": 1.5}, "label"),
        ({"regions": [{"box": [0, 0, 13, 8], "category": "a"}]}, "regions[0].box"),  # outside the 12-px width
        ({"regions": [{"box": [-1, 0, 5, 5], "category": "a"}]}, "regions[0].box"),
        ({"regions": [{"box": [5, 1, 5, 6], "category": "a"}]}, "regions[0].box"),  # degenerate x2 == x1
        ({"regions": [{"box": [1, 1, 5], "category": "a"}]}, "regions[0].box"),
        ({"regions": [{"box": [1, 1, 5, float("nan")], "category": "a"}]}, "regions[0].box"),
        ({"regions": [{"box": [1, 1, 5, 5]}]}, "regions[0]"),  # neither category nor caption
        ({"regions": [{"box": [1, 1, 5, 5], "category": "a", "category_id": -3}]}, "regions[0].category_id"),
        ({"regions": [{"box": [1, 1, 5, 5], "category": "a", "colour": "red"}]}, "regions[0]"),
        ({"caption": "misspelt field"}, "caption"),
        ({"version": 2}, "version"),
    ],
)
def test_encode_rejects_bad_examples_naming_the_field(overrides, field_in_message):
    with pytest.raises(RecordError) as error:
        records.encode_record(_example(**overrides))
    assert field_in_message in str(error.value)
    assert "img-1" in str(error.value) or overrides.get("id") == ""


def test_missing_required_field_is_named():
    example = _example()
    del example["image"]
    with pytest.raises(RecordError, match="'image': missing"):
        records.validate_example(example)


def test_decode_names_where_for_other_version_format_and_broken_bytes():
    good = records.decode_record(records.encode_record(_example()))
    where = "shards/x-train-00001-of-00002.array_record record 7"
    newer = msgpack.packb({**good, "version": 2}, use_bin_type=True)
    with pytest.raises(RecordError) as error:
        records.decode_record(newer, where=where)
    assert where in str(error.value) and "version 2" in str(error.value) and "newer" in str(error.value)
    foreign = msgpack.packb({"format": "tfrecord-example", "data": b"x"}, use_bin_type=True)
    with pytest.raises(RecordError, match="not a geoalign-record record") as error:
        records.decode_record(foreign, where=where)
    assert where in str(error.value)
    data = records.encode_record(_example())
    for broken in (data[: len(data) // 2], b"\xc1garbage", msgpack.packb([1, 2, 3]), b""):
        with pytest.raises(RecordError, match="broken record") as error:
            records.decode_record(broken, where=where)
        assert str(error.value).startswith(where)
    tampered = msgpack.packb({**good, "captions": [""]}, use_bin_type=True)
    with pytest.raises(RecordError, match=r"invalid record.*captions\[0\]"):
        records.decode_record(tampered, where=where)


# ---------------------------------------------------------------------------------------------------------
# Sources


def _write_dataset(directory, splits: dict[str, list[list[bytes]]]) -> None:
    manifest = {"format": "geoalign-record", "version": 1, "name": "unit", "splits": {}, "skipped": {},
                "class_names": [], "created_by": "test"}
    for split, shards in splits.items():
        names = []
        for index, payloads in enumerate(shards):
            name = f"unit-{split}-{index:05d}-of-{len(shards):05d}.array_record"
            _write_shard(directory / name, payloads)
            names.append(name)
        manifest["splits"][split] = {"count": sum(len(s) for s in shards), "shards": names}
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _encoded(i: int, split: str = "train") -> bytes:
    return records.encode_record(_example(id=f"img-{i}", split=split, captions=[f"caption {i}"]))


def test_record_source_reads_all_shards_in_order_and_pickles(tmp_path):
    _write_dataset(tmp_path, {"train": [[_encoded(0), _encoded(1)], [_encoded(2)]], "val": [[_encoded(9, "val")]]})
    source = sources.RecordSource.from_dir(tmp_path, "train")
    assert len(source) == 3
    assert [source[i]["id"] for i in range(3)] == ["img-0", "img-1", "img-2"]
    assert [r["captions"] for r in source.__getitems__([2, 0])] == [["caption 2"], ["caption 0"]]
    raw = sources.RecordSource.from_dir(tmp_path, "train", raw=True)
    assert raw[1] == _encoded(1)
    restored = pickle.loads(pickle.dumps(source))
    assert restored[2]["id"] == "img-2"
    with pytest.raises(IndexError):
        source[3]
    assert sources.RecordSource.from_dir(tmp_path, "val")[0]["split"] == "val"


def test_record_source_error_names_shard_and_local_index(tmp_path):
    good = records.decode_record(_encoded(0))
    other_version = msgpack.packb({**good, "version": 2}, use_bin_type=True)
    _write_dataset(tmp_path, {"train": [[_encoded(0), _encoded(1)], [_encoded(2), other_version, b"\x93\x01"]]})
    source = sources.RecordSource.from_dir(tmp_path, "train")
    assert source[2]["id"] == "img-2"
    shard = str(tmp_path / "unit-train-00001-of-00002.array_record")
    with pytest.raises(RecordError) as error:
        source[3]
    assert f"{shard} record 1" in str(error.value) and "version 2" in str(error.value)
    with pytest.raises(RecordError) as error:
        source.__getitems__([0, 4])
    assert f"{shard} record 2" in str(error.value) and "broken record" in str(error.value)


def test_shard_paths_errors_are_clear(tmp_path):
    with pytest.raises(sources.SourceError, match="no manifest.json"):
        sources.shard_paths(tmp_path, "train")
    _write_dataset(tmp_path, {"train": [[_encoded(0)], [_encoded(1)]]})
    assert sources.shard_paths(tmp_path, "train") == [
        str(tmp_path / "unit-train-00000-of-00002.array_record"),
        str(tmp_path / "unit-train-00001-of-00002.array_record"),
    ]
    with pytest.raises(sources.SourceError, match=r"split 'test' not in .*splits: \['train'\]"):
        sources.shard_paths(tmp_path, "test")
    assert sources.shard_paths(str(tmp_path / "*.array_record"), "train") == sources.shard_paths(tmp_path, "train")
    with pytest.raises(sources.SourceError, match="no shards of split 'val'"):
        sources.shard_paths(str(tmp_path / "*.array_record"), "val")
    (tmp_path / "unit-train-00001-of-00002.array_record").unlink()
    with pytest.raises(sources.SourceError, match="missing.*unit-train-00001-of-00002"):
        sources.shard_paths(tmp_path, "train")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))
    with pytest.raises(sources.SourceError, match="version 2"):
        sources.read_manifest(tmp_path)


def test_shard_glob_finds_the_split_when_the_dataset_name_has_dashes(tmp_path):
    for split, count in (("train", 2), ("val", 1)):
        for index in range(count):
            _write_shard(tmp_path / f"my-data-{split}-{index:05d}-of-{count:05d}.array_record", [_encoded(index)])
    assert sources.parse_shard_name(tmp_path / "my-data-train-00001-of-00002.array_record") == ("my-data", "train")
    assert sources.parse_shard_name("/x/my-data-train.array_record") is None
    pattern = str(tmp_path / "*.array_record")
    assert sources.shard_paths(pattern, "train") == [
        str(tmp_path / "my-data-train-00000-of-00002.array_record"),
        str(tmp_path / "my-data-train-00001-of-00002.array_record")]
    assert sources.shard_paths(pattern, "val") == [str(tmp_path / "my-data-val-00000-of-00001.array_record")]
    with pytest.raises(sources.SourceError, match="no shards of split 'data-train'"):
        sources.shard_paths(pattern, "data-train")  # what the old pattern took the split to be


@pytest.mark.parametrize("entry_kind", ["absolute", "parent", "nested parent"])
def test_manifest_shard_entries_outside_the_folder_are_refused(tmp_path, entry_kind):
    dataset, elsewhere = tmp_path / "dataset", tmp_path / "elsewhere"
    dataset.mkdir()
    elsewhere.mkdir()
    _write_dataset(dataset, {"train": [[_encoded(0)]]})
    _write_shard(elsewhere / "secret.array_record", [_encoded(1)])  # exists: only the check can refuse it
    entry = {"absolute": str(elsewhere / "secret.array_record"), "parent": "../elsewhere/secret.array_record",
             "nested parent": "sub/../../elsewhere/secret.array_record"}[entry_kind]
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"].append(entry)
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(sources.SourceError) as error:
        sources.shard_paths(dataset, "train")
    message = str(error.value)
    assert str(dataset / "manifest.json") in message and repr(entry) in message and "outside" in message


def test_locate_counts_each_shard_once_and_closes_its_readers(tmp_path, monkeypatch):
    import grain
    from array_record.python import array_record_module

    _write_dataset(tmp_path, {"train": [[_encoded(0), _encoded(1)], [_encoded(2)], [_encoded(3), _encoded(4)]]})
    source = sources.RecordSource.from_dir(tmp_path, "train")
    opened, closed = [], []
    real_reader = array_record_module.ArrayRecordReader

    class CountingReader:
        def __init__(self, path, *args, **kwargs):
            opened.append(path)
            self._reader = real_reader(path, *args, **kwargs)

        def num_records(self):
            return self._reader.num_records()

        def close(self):
            closed.append(True)
            self._reader.close()

    def no_new_data_source(*args, **kwargs):
        raise AssertionError("locate() must not open another data source per shard")

    monkeypatch.setattr(array_record_module, "ArrayRecordReader", CountingReader)
    monkeypatch.setattr(grain.sources, "ArrayRecordDataSource", no_new_data_source)
    shards = [str(tmp_path / f"unit-train-{i:05d}-of-00003.array_record") for i in range(3)]
    expected = [(shards[0], 0), (shards[0], 1), (shards[1], 0), (shards[2], 0), (shards[2], 1)]
    assert [source.locate(i) for i in range(5)] == expected
    assert [source.locate(i) for i in range(5)] == expected  # counted once, not per call
    assert opened == shards and len(closed) == len(opened)
