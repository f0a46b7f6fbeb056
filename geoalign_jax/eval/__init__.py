"""Evaluation: zero-shot scene classification, image-text retrieval, region classification.

The library entry point is ``evaluate`` (parameters in, flat metrics dict out; with ``results_path`` it
also writes results.json with the provenance of every number); ``run_tasks`` adds per-task details,
provenance and notes for tables and plots; ``check_overlap`` finds evaluation images that also occur in
the training data (``overlap.TrainImages``); ``evaluate_segmentation`` scores a segmentation folder with
SegEarth-OV's protocol (also the task kind ``segmentation:NAME=PATH``). The CLI is ``python -m geoalign_jax.evaluate``.
"""
from __future__ import annotations

from geoalign_jax.eval.runner import (EvalReport, TaskError, TaskSpec, check_overlap, evaluate, is_training_split,
                                       parse_task, run_tasks)
from geoalign_jax.eval.overlap import OverlapError, OverlapResult, TrainImages
from geoalign_jax.eval.seg_task import evaluate_segmentation

__all__ = ["EvalReport", "OverlapError", "OverlapResult", "TaskError", "TaskSpec", "TrainImages", "check_overlap",
           "evaluate", "evaluate_segmentation", "is_training_split", "parse_task", "run_tasks"]
