"""Class files and protocol settings of the 8 open-vocabulary segmentation benchmarks FarSLIP reports.

Every value is read from SegEarth-OV's configuration (github.com/likyoo/SegEarth-OV, commit 3e22a96): the
class names from ``configs/cls_<name>.txt``, the background threshold (``prob_thd``) and background class
(``bg_idx``, default 0 in ``segearth_segmentor.py``) from ``configs/cfg_<name>.py``, the label reduction
(``reduce_zero_label``) from that config or, where it sets none, from the dataset class it names (mmseg's
``PotsdamDataset`` / ``ISPRSDataset`` default to True, SegEarth-OV's ``custom_datasets.py`` classes to False),
and the test-time resize (``Resize(scale=(448, 448), keep_ratio=True)`` in every config: the image is scaled,
aspect kept, to fit 448 x 448). ``layout`` is where the config reads images and masks (paths after
mmseg's / SegEarth-OV's ``dataset_prepare.md`` converters).

A class file has one class per line; a line may name the class several ways (``tree,forest``): the class
scores the best of its names. This module only holds data and parses class files (no model, no I/O
beyond reading a file), so both ``prepare`` and ``eval`` use it.
"""
from __future__ import annotations

import dataclasses
import pathlib

SOURCE = "likyoo/SegEarth-OV@3e22a96"
#: mmcv ``Resize(scale=(448, 448), keep_ratio=True)``: largest scale with long side <= 448 and short side <= 448.
SEGEARTH_RESIZE = (448, 448)


class ClassFileError(ValueError):
    """A class list that cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class SegmentationPreset:
    """One benchmark as SegEarth-OV evaluates it. classes: per class index, its names."""

    name: str
    classes: tuple[tuple[str, ...], ...]
    threshold: float
    background_index: int
    reduce_zero_label: bool
    split: str
    layout: str
    image_suffix: str
    mask_suffix: str
    config_file: str
    class_file: str
    resize: tuple[int, int] = SEGEARTH_RESIZE
    ignore_index: int = 255

    @property
    def sources(self) -> list[str]:
        return [f"{SOURCE}:{self.config_file}", f"{SOURCE}:{self.class_file}"]


def _classes(*lines: str) -> tuple[tuple[str, ...], ...]:
    return tuple(tuple(lines_names.split(",")) for lines_names in lines)


PRESETS: dict[str, SegmentationPreset] = {
    preset.name: preset for preset in (
        SegmentationPreset(
            "openearthmap",
            _classes("background", "bareland,barren", "grass", "pavement", "road", "tree,forest", "water,river",
                     "cropland", "building,roof,house"),
            threshold=0.1, background_index=0, reduce_zero_label=False, split="val",
            layout="OpenEarthMap/img_dir/val + ann_dir/val (OpenEarthMap_wo_xBD, mmseg converter)",
            image_suffix=".tif", mask_suffix=".tif",
            config_file="configs/cfg_openearthmap.py", class_file="configs/cls_openearthmap.txt"),
        SegmentationPreset(
            "loveda",
            _classes("background", "building,roof,house", "road", "water", "barren", "forest", "agricultural"),
            threshold=0.3, background_index=0, reduce_zero_label=True, split="val",
            layout="LoveDA/img_dir/val + ann_dir/val (mmseg tools/dataset_converters/loveda.py; label 0 = "
                   "no data, ignored through reduce_zero_label)",
            image_suffix=".png", mask_suffix=".png",
            config_file="configs/cfg_loveda.py", class_file="configs/cls_loveda.txt"),
        SegmentationPreset(
            "isaid",
            _classes("background", "ship", "store tank", "baseball diamond", "tennis court", "basketball court",
                     "ground track field", "bridge", "large vehicle", "small vehicle", "helicopter",
                     "swimming pool", "roundabout", "soccer ball field", "plane", "harbor"),
            threshold=0.4, background_index=0, reduce_zero_label=False, split="val",
            layout="iSAID/img_dir/val + ann_dir/val (mmseg tools/dataset_converters/isaid.py patches; masks "
                   "<stem>_instance_color_RGB.png)",
            image_suffix=".png", mask_suffix="_instance_color_RGB.png",
            config_file="configs/cfg_iSAID.py", class_file="configs/cls_iSAID.txt"),
        SegmentationPreset(
            "potsdam",
            _classes("road,parking lot", "building", "low vegetation", "tree", "car", "clutter,background"),
            threshold=0.1, background_index=5, reduce_zero_label=True, split="val",
            layout="potsdam/img_dir/val + ann_dir/val (mmseg tools/dataset_converters/potsdam.py, 512 px "
                   "patches; label 0 = boundary, ignored through reduce_zero_label)",
            image_suffix=".png", mask_suffix=".png",
            config_file="configs/cfg_potsdam.py", class_file="configs/cls_potsdam.txt"),
        SegmentationPreset(
            "vaihingen",
            _classes("impervious surface", "building", "low vegetation", "tree", "car", "clutter"),
            threshold=0.1, background_index=5, reduce_zero_label=True, split="val",
            layout="vaihingen/img_dir/val + ann_dir/val (mmseg tools/dataset_converters/vaihingen.py; label 0 "
                   "= boundary, ignored through reduce_zero_label)",
            image_suffix=".png", mask_suffix=".png",
            config_file="configs/cfg_vaihingen.py", class_file="configs/cls_vaihingen.txt"),
        SegmentationPreset(
            "uavid",
            _classes("background", "building", "road", "car", "tree", "vegetation", "human"),
            threshold=0.3, background_index=0, reduce_zero_label=False, split="test",
            layout="UAVid/img_dir/test + ann_dir/test",
            image_suffix=".png", mask_suffix=".png",
            config_file="configs/cfg_uavid.py", class_file="configs/cls_uavid.txt"),
        SegmentationPreset(
            "udd5",
            _classes("vegetation", "building", "road", "vehicle", "background"),
            threshold=0.4, background_index=4, reduce_zero_label=False, split="val",
            layout="UDD/UDD/UDD5/val/src (.JPG) + val/gt (.png)",
            image_suffix=".JPG", mask_suffix=".png",
            config_file="configs/cfg_udd5.py", class_file="configs/cls_udd5.txt"),
        SegmentationPreset(
            "vdd",
            _classes("background", "facade", "road", "vegetation", "vehicle", "roof", "water"),
            threshold=0.3, background_index=0, reduce_zero_label=False, split="test",
            layout="VDD/test/src (.JPG) + test/gt (.png)",
            image_suffix=".JPG", mask_suffix=".png",
            config_file="configs/cfg_vdd.py", class_file="configs/cls_vdd.txt"),
    )
}


def get_preset(name: str) -> SegmentationPreset:
    key = name.lower()
    if key not in PRESETS:
        raise KeyError(f"unknown segmentation preset {name!r} (known: {', '.join(PRESETS)})")
    return PRESETS[key]


def parse_class_lines(text: str, where: str = "class list") -> tuple[tuple[str, ...], ...]:
    """SegEarth-OV's class file: line i names class i, several names separated by commas. Names are
    stripped; an empty line or an empty name is an error naming the line (it would shift every later
    class index)."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():  # a trailing newline is not a class
        lines.pop()
    if not lines:
        raise ClassFileError(f"{where}: no classes")
    classes = []
    for number, line in enumerate(lines, start=1):
        names = tuple(name.strip() for name in line.split(","))
        if not line.strip() or not all(names):
            raise ClassFileError(f"{where}: line {number} {line!r} has an empty class name")
        classes.append(names)
    return tuple(classes)


def read_class_file(path: str | pathlib.Path) -> tuple[tuple[str, ...], ...]:
    path = pathlib.Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ClassFileError(f"class file {path}: cannot read it ({error.__class__.__name__}: {error})") from None
    return parse_class_lines(text, where=f"class file {path}")
