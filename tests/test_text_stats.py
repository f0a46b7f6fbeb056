"""Truncation statistics: the converters' summary and manifest, and the pipeline's metric, equal a direct
count with the project's tokenizer on real RSITMD captions (short captions, and long texts made by joining
an image's captions, which cross both the 77- and the 248-token context)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from geoalign_jax import tokenizer
from geoalign_jax.data import prepare_formats, pipeline, text_stats

NUM_RECORDS = 60


def _joined(entries) -> str:
    return " ".join(s["raw"].strip() for entry in entries for s in entry["sentences"] if s["raw"].strip())


@pytest.fixture(scope="module")
def corpus(shared_data, tmp_path_factory):
    """JSONL records whose texts are RSITMD captions: captions = an image's five captions plus all five
    joined; long caption = the captions of four images joined; a hard negative and a region caption = the
    next images' captions joined. Every sixth record has no captions: the pipeline reads its long caption as
    the caption (cut at 77), so it counts as a caption too. Returns (converter summary, folder, the texts the
    pipeline reads, by kind)."""
    root = tmp_path_factory.mktemp("text_stats")
    raw = json.loads((shared_data / "captions" / "dataset_rsitmd.json").read_text())["images"]
    Image.new("RGB", (16, 16), (90, 120, 60)).save(root / "scene.png")
    lines, texts = [], {kind: [] for kind in text_stats.TEXT_KINDS}
    for index in range(NUM_RECORDS):
        entries = raw[index:index + 4]
        record = {"image": "scene.png", "id": f"r{index}",
                  "captions": [s["raw"] for s in entries[0]["sentences"]] + [_joined(entries[:1])],
                  "long_caption": _joined(entries), "hard_negatives": [_joined(entries[1:2])],
                  "regions": [{"box": [0, 0, 8, 8], "caption": _joined(entries[2:3])}]}
        if index % 6 == 5:
            record["captions"] = []
        lines.append(json.dumps(record))
        texts["captions"] += [c.strip() for c in record["captions"] if c.strip()] or [record["long_caption"]]
        texts["long_caption"].append(record["long_caption"])
        texts["hard_negatives"] += record["hard_negatives"]
        texts["region_captions"].append(record["regions"][0]["caption"])
    (root / "corpus.jsonl").write_text("\n".join(lines))
    summary = prepare_formats.prepare_jsonl(root / "corpus.jsonl", root / "records", name="corpus", num_shards=2,
                                       progress=False)
    return summary, root / "records", texts


def _direct(texts: list[str], context_length: int) -> tuple[int, int]:
    """(texts, texts cut at context_length): a text is cut when its EOT would land past the context."""
    tokens = tokenizer.tokenize(texts, 1024)
    lengths = np.argmax(tokens == tokenizer.EOT_TOKEN_ID, axis=1) + 1
    return len(texts), int(np.sum(lengths > context_length))


def test_converter_summary_and_manifest_count_what_a_context_would_cut(corpus):
    summary, folder, texts = corpus
    contexts = text_stats.DEFAULT_CONTEXT_LENGTHS
    truncation = summary.truncation()
    for kind in text_stats.TEXT_KINDS:
        assert (truncation[kind]["texts"], truncation[kind]["truncated"]) == _direct(texts[kind], contexts[kind])
    # the joined texts cross both contexts, so these fractions are neither 0 nor 1
    assert 0 < truncation["captions"]["fraction"] < 1 and 0 < truncation["long_caption"]["fraction"] < 1
    assert truncation["long_caption"]["context_length"] == 248
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["truncation"]["train"] == truncation
    line = [row for row in summary.format().splitlines() if "texts longer than the context" in row][0]
    total, cut = _direct(texts["captions"], 77)
    assert f"captions {cut} of {total} ({cut / total:.1%}) > 77 tokens" in line


@pytest.mark.parametrize("context_length, long_context_length", [(77, 248), (30, 100)])
def test_pipeline_metric_equals_a_direct_count_from_manifest_or_records(corpus, tmp_path, context_length,
                                                                        long_context_length):
    _, folder, texts = corpus
    config = pipeline.default_data_config()
    config.train_shards = str(folder)
    config.context_length = context_length
    config.long_context_length = long_context_length
    config.num_hard_negatives, config.max_regions = 1, 1  # the pipeline reads hard negatives and region texts
    expected = {}
    for kind in text_stats.TEXT_KINDS:
        total, cut = _direct(texts[kind], long_context_length if kind == "long_caption" else context_length)
        expected[f"data/truncated/{kind}"] = cut / total
    assert text_stats.pipeline_truncation_metrics(config) == pytest.approx(expected)
    # shards without their manifest: the records are read and counted instead
    for shard in folder.glob("*.array_record"):
        shutil.copy(shard, tmp_path)
    config.train_shards = str(tmp_path / "*.array_record")
    assert text_stats.pipeline_truncation_metrics(config) == pytest.approx(expected)
    config.long_context_length = 0  # no long-text tower: long captions are not read, not reported
    config.num_hard_negatives, config.max_regions = 0, 0  # nor are hard negatives and region texts
    assert list(text_stats.pipeline_truncation_metrics(config)) == ["data/truncated/captions"]


def test_token_histograms_merge_and_round_trip_through_json():
    first, second = text_stats.TokenHistogram(), text_stats.TokenHistogram()
    first.add({"captions": [10, 80, 80], "long_caption": [300]})
    second.add({"captions": [77, 78]})
    first.update(second)
    restored = text_stats.TokenHistogram.from_json(json.loads(json.dumps(first.to_json())))
    assert restored.truncation() == first.truncation()
    assert first.truncation()["captions"] == {"texts": 5, "truncated": 3, "fraction": 0.6, "context_length": 77,
                                              "max_tokens": 80}
    assert first.truncation()["long_caption"]["truncated"] == 1
