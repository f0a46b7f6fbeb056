"""Prompt templates for zero-shot classification and prompt ensembling rules.

Template sets are named so that results say which prompts produced them:

- ``"farslip"`` (default): the two templates FarSLIP's zero-shot evaluation uses, exactly
  ('a satellite photo of {}.', 'a satellite image of {}').
- ``"rs"``: a larger remote-sensing set in the style of RemoteCLIP / GeoRSCLIP prompts.
- ``"single"``: just 'a satellite photo of {}.' (quick checks, region classification).

Ensembling follows open_clip and FarSLIP: each template's text embedding is L2-normalised, the
normalised embeddings are averaged over templates, and the mean is normalised again (see
``zeroshot.build_classifier``).
"""
from __future__ import annotations

from typing import Sequence

from geoalign_jax.eval.openai_templates import OPENAI_IMAGENET_TEMPLATES

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "farslip": (
        "a satellite photo of {}.",
        "a satellite image of {}",
    ),
    "rs": (
        "a satellite photo of {}.",
        "a satellite image of {}",
        "a satellite image of {}.",
        "an aerial photo of {}.",
        "an aerial image of {}.",
        "an aerial view of {}.",
        "a remote sensing image of {}.",
        "a remote sensing photo of {}.",
        "a remote sensing image of a {}.",
        "a satellite view of {}.",
        "a top-down view of {}.",
        "an overhead image of {}.",
        "a high resolution satellite image of {}.",
        "a low resolution satellite image of {}.",
        "a photo of {} taken from above.",
        "{} seen from space.",
    ),
    "single": (
        "a satellite photo of {}.",
    ),
    # OpenAI's 80 ImageNet templates: SegEarth-OV's segmentation queries (eval/segmentation.py).
    "openai_imagenet": OPENAI_IMAGENET_TEMPLATES,
}

DEFAULT_TEMPLATE_SET = "farslip"


def get_templates(name_or_templates: str | Sequence[str] = DEFAULT_TEMPLATE_SET) -> tuple[str, ...]:
    """Resolve a template-set name (or pass through an explicit list, checked for a '{}' slot)."""
    if isinstance(name_or_templates, str):
        if name_or_templates not in TEMPLATE_SETS:
            raise ValueError(
                f"unknown template set {name_or_templates!r}; known: {sorted(TEMPLATE_SETS)}")
        return TEMPLATE_SETS[name_or_templates]
    templates = tuple(name_or_templates)
    if not templates:
        raise ValueError("template list is empty")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"template {template!r} must contain exactly one '{{}}' slot")
    return templates


def fill_templates(class_name: str, templates: Sequence[str]) -> list[str]:
    """All prompts for one class, in template order."""
    return [template.format(class_name) for template in templates]
