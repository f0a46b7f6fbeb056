"""Long-text retrieval (DGTRS-CLIP / Long-CLIP style): which text a retrieval task scores, and truncation.

``text=short`` (default) retrieves with each record's ``captions``; ``text=long`` with its ``long_caption``
(``datasets.load_retrieval``). Texts are tokenized to the model's own context length (77 for CLIP, 248 for a
Long-CLIP text tower), and a text longer than that is cut the way the tokenizer cuts it (first tokens kept,
EOT last, as open_clip / Long-CLIP ``truncate=True``). How many were cut is counted per task
(``truncated_texts``, ``truncated_fraction``, ``context_length``, ``max_text_tokens``), because a long-text
number from a 77-token model is a number on truncated text.
"""
from __future__ import annotations

from typing import Any, Sequence

TEXT_KINDS = ("short", "long")


def context_length_of(embedder: Any) -> int | None:
    """The text context length an embedding backend tokenizes to (JAX config, or the torch model's)."""
    config = getattr(embedder, "config", None)
    if config is not None and hasattr(config, "text"):
        return int(config.text.context_length)
    model = getattr(embedder, "model", None)
    length = getattr(model, "context_length", None)
    return int(length) if length is not None else None


def truncation_metrics(texts: Sequence[str], context_length: int | None) -> dict[str, float]:
    """Counts of texts longer than ``context_length`` tokens (SOT and EOT included); {} when unknown."""
    from geoalign_jax.tokenizer import count_tokens

    if context_length is None or not texts:
        return {}
    counts = [count_tokens(text) for text in texts]
    truncated = sum(count > context_length for count in counts)
    return {"context_length": float(context_length), "truncated_texts": float(truncated),
            "truncated_fraction": 100.0 * truncated / len(counts), "max_text_tokens": float(max(counts))}


def truncation_notes(task_metrics: dict[str, float]) -> list[str]:
    """A table note per retrieval protocol whose texts were cut to the model's context length."""
    notes = []
    for key, count in task_metrics.items():
        protocol, _, name = key.rpartition("/")
        if name == "truncated_texts" and count > 0:
            length = task_metrics.get(f"{protocol}/context_length", float("nan"))
            fraction = task_metrics.get(f"{protocol}/truncated_fraction", float("nan"))
            notes.append(f"{protocol}: {int(count)} texts ({fraction:.1f}%) longer than the model's context of "
                         f"{int(length)} tokens were truncated")
    return notes
