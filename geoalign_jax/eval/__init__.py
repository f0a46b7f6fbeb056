"""Evaluation: zero-shot scene classification, image-text retrieval, region classification.

The library entry point is ``evaluate`` (parameters in, flat metrics dict out); ``run_tasks`` adds
per-task details for tables and plots. The CLI is ``python -m geoalign_jax.evaluate``.
"""
from __future__ import annotations

from geoalign_jax.eval.library import EvalReport, TaskError, TaskSpec, evaluate, parse_task, run_tasks

__all__ = ["EvalReport", "TaskError", "TaskSpec", "evaluate", "parse_task", "run_tasks"]
