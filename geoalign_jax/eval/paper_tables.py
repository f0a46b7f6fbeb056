"""The seed papers' result tables: their layout and the numbers they publish for their own models.

Only numbers read in a public source are here, each table naming its source; a number that was not in the
sources read is None and prints as "n/a (not in the sources read)". The sources:

- FarSLIP (arXiv 2511.14901): README figures ``assets/classification.png``, ``assets/retrieval.png`` and
  ``assets/ovss.png`` of github.com/NJU-LHRS/FarSLIP @ d32ef2c (transcribed, then checked against the images).
  The retrieval figure's numbers are per-direction means of R@1/5/10 (``tests/test_retrieval.py``'s
  ``img2text_mean`` / ``text2img_mean``), our ``skyscript`` protocol's ``i2t_mean`` / ``t2i_mean``.
- GeoAlignCLIP (arXiv 2603.09566): no code or table was readable; the numbers are those listed for the paper
  on wizwand.com (benchmark listing of the paper, read 2026-12-06), which do not name the backbone.
- DGTRS-CLIP (arXiv 2503.19311): its tables were not readable (abstract only), and its repository's README
  (github.com/MitsuiChen14/DGTRS @ 7d68e82) has usage and claims but no numbers. FarSLIP's figures measure
  its v1 release LRSCLIP ViT-B/16 under FarSLIP's protocol; those are shown as a reference row, labelled so.
"""
from __future__ import annotations

import dataclasses

FARSLIP_README = ("FarSLIP README (github.com/NJU-LHRS/FarSLIP @ d32ef2c), figure assets/{figure}.png; "
                  "arXiv 2511.14901")
WIZWAND_GEOALIGNCLIP = ("wizwand.com benchmark listing of GeoAlignCLIP (arXiv 2603.09566), read 2026-12-06; "
                        "the paper's own tables were not readable, backbone not stated")
NOT_READ = "n/a (not in the sources read)"


@dataclasses.dataclass(frozen=True)
class Column:
    """A column of a paper table and the metric of ours it compares with (``task/metric`` key)."""

    label: str
    metric: str

    @property
    def task(self) -> str:
        """The task prefix (``kind/name``) the metric comes from."""
        return "/".join(self.metric.split("/")[:2])


@dataclasses.dataclass(frozen=True)
class PublishedRow:
    label: str
    values: tuple[float | None, ...]  # one per column, then the mean when the table has one


@dataclasses.dataclass(frozen=True)
class PaperTable:
    title: str
    columns: tuple[Column, ...]
    published: tuple[PublishedRow, ...]
    source: str
    mean: bool = False  # the paper's table has a Mean column (the mean of all its columns)
    note: str = ""

    def __post_init__(self) -> None:
        width = len(self.columns) + int(self.mean)
        for row in self.published:
            if len(row.values) != width:
                raise ValueError(f"{self.title}: row {row.label!r} has {len(row.values)} values, expected {width}")


def _row(label: str, values: str) -> PublishedRow:
    return PublishedRow(label, tuple(None if v == "-" else float(v) for v in values.split()))


_ZS_DATASETS = (("SkyScript", "SkyScript_cls"), ("AID", "aid"), ("EuroSAT", "eurosat"), ("FMoW", "fmow"),
                ("MillionAID", "millionaid"), ("PatternNet", "patternnet"), ("NWPU", "nwpu"), ("RSICB", "rsicb"))
ZS_COLUMNS = tuple(Column(label, f"zeroshot/{key}/top1") for label, key in _ZS_DATASETS)

FARSLIP_ZEROSHOT = PaperTable(
    "Zero-shot scene classification, top-1 accuracy (%)", ZS_COLUMNS,
    (_row("FarSLIP-s1 ViT-B/32", "51.51 73.80 49.26 34.49 69.42 74.69 69.93 46.00 58.64"),
     _row("FarSLIP-s2 ViT-B/32", "53.79 73.30 49.30 30.12 72.05 80.45 67.77 54.17 60.12"),
     _row("FarSLIP-s1 ViT-B/16", "56.19 73.30 59.81 34.60 66.82 78.85 72.72 52.80 61.89"),
     _row("FarSLIP-s2 ViT-B/16", "57.98 73.95 55.52 35.86 68.04 80.82 71.49 54.24 62.24")),
    FARSLIP_README.format(figure="classification"), mean=True,
    note="FarSLIP's split per dataset (benchmark_dataset_info.py): SkyScript_cls and fMoW val, AID and "
         "EuroSAT test, MillionAID, PatternNet, NWPU and RSICB train.")

_RET_SETS = (("RSICD", "rsicd"), ("RSITMD", "rsitmd"), ("UCM", "ucm"))
FARSLIP_RETRIEVAL = PaperTable(
    "Zero-shot image-text retrieval, mean of R@1/5/10 per direction (%)",
    tuple(Column(f"{label} {direction.upper()}", f"retrieval/{key}/skyscript/{direction}_mean")
          for label, key in _RET_SETS for direction in ("i2t", "t2i")),
    (_row("FarSLIP-s1 ViT-B/32", "25.9 21.7 31.3 32.8 67.5 59.7"),
     _row("FarSLIP-s2 ViT-B/32", "26.8 25.0 31.9 35.3 67.8 67.0"),
     _row("FarSLIP-s1 ViT-B/16", "27.4 21.9 33.6 32.9 69.4 61.7"),
     _row("FarSLIP-s2 ViT-B/16", "27.4 23.7 33.5 34.5 70.6 62.2")),
    FARSLIP_README.format(figure="retrieval"),
    note="FarSLIP protocol (tests/test_retrieval.py): captions prefixed 'a satellite image. ', images and "
         "texts de-duplicated. SkyScript retrieval is run when present but FarSLIP's README publishes no number.")

_OVSS_SETS = (("OEM", "openearthmap"), ("LoveDA", "loveda"), ("Potsdam", "potsdam"), ("Vaihingen", "vaihingen"),
              ("UDD5", "udd5"), ("VDD", "vdd"), ("UAVid", "uavid"), ("iSAID", "isaid"))
OVSS_COLUMNS = tuple(Column(label, f"segmentation/{key}/mIoU") for label, key in _OVSS_SETS)
FARSLIP_OVSS = PaperTable(
    "Open-vocabulary semantic segmentation, mIoU (%)", OVSS_COLUMNS,
    (_row("FarSLIP1 ViT-B/32", "28.29 30.04 36.28 22.83 36.80 37.23 31.42 16.09 29.87"),
     _row("FarSLIP2 ViT-B/32", "26.66 30.79 40.38 24.33 36.77 38.54 32.82 13.66 30.49"),
     _row("FarSLIP1 ViT-B/16", "35.89 33.59 46.50 22.34 44.60 40.63 40.23 19.76 35.44"),
     _row("FarSLIP2 ViT-B/16", "34.39 34.23 47.48 22.81 44.83 40.82 40.03 18.67 35.41")),
    FARSLIP_README.format(figure="ovss"), mean=True,
    note="Evaluated by FarSLIP with SegEarth-OV (FarSLIP-OVSS repository), input 224.")

GEOALIGNCLIP_RETRIEVAL = PaperTable(
    "Image-text retrieval (standard protocol), R@1 (%)",
    (Column("RSITMD I2T R@1", "retrieval/rsitmd/standard/i2t_R@1"),
     Column("RSITMD T2I R@1", "retrieval/rsitmd/standard/t2i_R@1"),
     Column("RSICD I2T R@1", "retrieval/rsicd/standard/i2t_R@1"),
     Column("RSICD T2I R@1", "retrieval/rsicd/standard/t2i_R@1")),
    (_row("GeoAlignCLIP (listed)", "21.02 17.39 14.82 11.4"),),
    WIZWAND_GEOALIGNCLIP)

GEOALIGNCLIP_REGIONS = PaperTable(
    "Region classification, top-1 accuracy (%)",
    (Column("NWPU VHR-10", "regions/nwpu_vhr10/roi/top1"), Column("RRSIS-D", "regions/rrsis_d/roi/top1")),
    (_row("GeoAlignCLIP (listed)", "93.75 -"),),
    WIZWAND_GEOALIGNCLIP,
    note="Ours: RoI features (regions task, method roi). The listing's protocol is not stated.")

DGTRS_LONG = PaperTable(
    "Long-text image-text retrieval (standard protocol, long captions), %",
    (Column("I2T R@1", "retrieval/dgtrsd_long/standard/i2t_R@1"),
     Column("T2I R@1", "retrieval/dgtrsd_long/standard/t2i_R@1"),
     Column("mR", "retrieval/dgtrsd_long/standard/mean_recall")),
    (_row("DGTRS-CLIP", "- - -"),),
    "DGTRS-CLIP arXiv 2503.19311 (tables not readable; abstract only; no numbers in its README @ 7d68e82)",
    note="Ours: records with long_caption at BENCHMARK_ROOT/dgtrsd, text=long, tokenized to the model's context.")

DGTRS_SHORT = PaperTable(
    "Short-text image-text retrieval (standard protocol), %",
    (Column("RSITMD I2T R@1", "retrieval/rsitmd/standard/i2t_R@1"),
     Column("RSITMD T2I R@1", "retrieval/rsitmd/standard/t2i_R@1"),
     Column("RSITMD mR", "retrieval/rsitmd/standard/mean_recall"),
     Column("RSICD I2T R@1", "retrieval/rsicd/standard/i2t_R@1"),
     Column("RSICD T2I R@1", "retrieval/rsicd/standard/t2i_R@1"),
     Column("RSICD mR", "retrieval/rsicd/standard/mean_recall")),
    (_row("DGTRS-CLIP", "- - - - - -"),),
    "DGTRS-CLIP arXiv 2503.19311 (tables not readable; abstract only; no numbers in its README @ 7d68e82)")

DGTRS_ZEROSHOT = PaperTable(
    "Zero-shot scene classification, top-1 accuracy (%), FarSLIP's protocol and datasets", ZS_COLUMNS,
    (_row("LRSCLIP ViT-B/16 (DGTRS-CLIP v1) as measured by FarSLIP",
          "55.73 69.75 44.52 22.66 67.76 77.89 74.28 54.75 58.42"),),
    FARSLIP_README.format(figure="classification"), mean=True,
    note="The DGTRS-CLIP paper's own zero-shot table was not readable: its datasets and numbers are n/a here.")
