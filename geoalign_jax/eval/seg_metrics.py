"""Semantic segmentation metrics accumulated over a whole split, as mmseg's ``IoUMetric`` computes them.

One confusion matrix (rows: true class, columns: predicted class) is summed over every pixel of every
image whose label is not the ignore index; the scores are read from the sum, never averaged per image:

- IoU_c = TP_c / (TP_c + FP_c + FN_c), Acc_c = TP_c / (TP_c + FN_c) (per-class recall);
- mIoU / mAcc: the mean over classes whose score is defined (a class absent from both labels and
  predictions has no IoU; one absent from the labels has no Acc), mmseg's ``nanmean``;
- aAcc: correctly labelled pixels / labelled pixels.
All scores are percentages.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int, ignore_index: int
                     ) -> np.ndarray:
    """[C, C] int64 counts of (label, prediction) over pixels whose label is not ``ignore_index``.
    A label outside 0..C-1 (other than the ignore index) or a prediction outside it is a ValueError."""
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions ({predictions.size} pixels) and labels ({labels.size}) differ in size")
    keep = labels != ignore_index
    labels, predictions = labels[keep].astype(np.int64), predictions[keep].astype(np.int64)
    for name, values in (("label", labels), ("prediction", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} values must be in 0..{num_classes - 1} or the ignore index {ignore_index}, "
                             f"got {values.min()}..{values.max()}")
    return np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes
                       ).reshape(num_classes, num_classes)


def segmentation_metrics(confusion: np.ndarray, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """``mIoU``, ``mAcc``, ``aAcc``, ``num_pixels`` and ``IoU/<class>``, ``Acc/<class>`` (NaN when undefined)
    from a summed confusion matrix."""
    confusion = np.asarray(confusion, dtype=np.float64)
    num_classes = confusion.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    true_positive = np.diag(confusion)
    label_area = confusion.sum(axis=1)
    predicted_area = confusion.sum(axis=0)
    union = label_area + predicted_area - true_positive
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, true_positive / union, np.nan)
        accuracy = np.where(label_area > 0, true_positive / label_area, np.nan)
    total = label_area.sum()
    result = {
        "mIoU": _nanmean(iou) * 100.0,
        "mAcc": _nanmean(accuracy) * 100.0,
        "aAcc": (true_positive.sum() / total * 100.0) if total else float("nan"),
        "num_pixels": float(total),
    }
    for name, class_iou, class_accuracy in zip(names, iou, accuracy):
        result[f"IoU/{name}"] = float(class_iou * 100.0)
        result[f"Acc/{name}"] = float(class_accuracy * 100.0)
    return result


def _nanmean(values: np.ndarray) -> float:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else float("nan")
