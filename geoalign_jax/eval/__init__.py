"""Evaluation: zero-shot scene classification, image-text retrieval, region classification.

The library entry point is ``evaluate`` (parameters in, flat metrics dict out; with ``results_path`` it
also writes results.json with the provenance of every number); ``run_tasks`` adds per-task details,
provenance and notes for tables and plots; ``check_overlap`` finds evaluation images that also occur in
the training data (``overlap.TrainImages``). The CLI is ``python -m geoalign_jax.evaluate``.
"""
from __future__ import annotations

from geoalign_jax.eval.runner import (EvalReport, TaskError, TaskSpec, check_overlap, evaluate, is_training_split,
                                       parse_task, run_tasks)
from geoalign_jax.eval.overlap import OverlapError, OverlapResult, TrainImages

__all__ = ["EvalReport", "OverlapError", "OverlapResult", "TaskError", "TaskSpec", "TrainImages", "check_overlap",
           "evaluate", "is_training_split", "parse_task", "run_tasks"]
