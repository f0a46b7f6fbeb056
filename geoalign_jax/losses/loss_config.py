"""`config.loss`: every field documented once with its default (`default_loss_config`) and checked by
`validate_loss_config` (errors name the field). `objective.py` builds the objective from the validated dict.
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from geoalign_jax.losses.region import REGION_TEXT_POSITIVES
from geoalign_jax.config_checks import is_int, is_number, require


TERM_NAMES = (
    "scene",
    "hard_negative",
    "region_text",
    "region_cls",
    "long_text",
    "patch_distill",
    "global_region_consistency",
    "short_long_consistency",
)
SCENE_KINDS = ("infonce", "siglip")
DENSE_FEATURES = ("last", "segearth")
DISTILL_TEACHERS = ("active", "frozen", "ema")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "step")
PCA_SCOPES = ("device", "global")


def default_loss_config() -> ml_collections.ConfigDict:
    """Every `config.loss` field with its default. The one place the fields are documented.

    weights.<term>          float >= 0 per term (see TERM_NAMES); 0 = off and not traced. Default: scene only.
    scene_kind              "infonce" (CLIP, open_clip ClipLoss) | "siglip" (sigmoid loss; needs the
                            model's `logit_bias` parameter, `init_logit_bias` in the model config).
                            Applies to scene and long_text.
    chunk_size              0 = plain contrastive losses (full [B_local x B_global] logits per device);
                            n > 0 = chunked: at most [B_local x n] logits per device, same values/gradients.
                            Applies to every global-batch contrastive term.
    roi_output_size         RoI-Align output bins per side for region_text and global_region_consistency.
    roi_sampling_ratio      bilinear samples per bin side; -1 = adaptive (torchvision/FarSLIP default).
    region_text_positives   "diagonal" (each region's own text is its positive) | "category" (regions
                            of the same category id are all positives; free-text ones only their own).
    dense_features          patch tokens for dense terms: "last" (plain last block) | "segearth"
                            (FarSLIP's q-q + k-k + v-v last layer, no residual/MLP).
    distill_teacher         crop branch of patch_distill: "active" (same params, with gradient; FarSLIP
                            default) | "frozen" (initial weights) | "ema" (EMA weights); the last two
                            read `teacher_params` passed to the objective (kept by the train state).
    distill_ema_momentum    EMA momentum for distill_teacher="ema" (FarSLIP 0.99); used by the train step.
    distill_output_size     RoI-Align output per side for patch_distill; 0 = the patch grid (FarSLIP).
    long_text_schedule      a(t), the long-text share of the short/long curriculum:
                            kind "constant" (start_weight) | "linear" | "cosine" (start_weight ->
                            end_weight between start_step and end_step, held outside) | "step"
                            (start_weight before start_step, end_weight from it on); weights in [0, 1].
    long_text_pca_components  0 = off; k > 0 = Long-CLIP primary-component matching: the short caption
                            is contrasted with the image embeddings rebuilt from their top-k principal
                            components, as Long-CLIP computes them (gradient through the SVD, not
                            re-normalised; needs weights.long_text > 0). Long-CLIP: 32.
    long_text_pca_scope     rows one PCA sees: "device" (each batch shard's rows, as Long-CLIP runs it on
                            each GPU's batch before the all-gather) | "global" (the whole global batch).
    label_smoothing         eps in [0, 1) of the InfoNCE cross-entropies of scene and long_text (torch's
                            `label_smoothing`: eps spread over the batch's columns). Long-CLIP 0.1; 0 = off.
    """
    config = ml_collections.ConfigDict()
    config.weights = ml_collections.ConfigDict({name: 0.0 for name in TERM_NAMES})
    config.weights.scene = 1.0
    config.scene_kind = "infonce"
    config.chunk_size = 0
    config.roi_output_size = 7
    config.roi_sampling_ratio = -1
    config.region_text_positives = "diagonal"
    config.dense_features = "last"
    config.distill_teacher = "active"
    config.distill_ema_momentum = 0.99
    config.distill_output_size = 0
    config.long_text_schedule = ml_collections.ConfigDict(
        {"kind": "constant", "start_step": 0, "end_step": 0, "start_weight": 0.5, "end_weight": 0.5}
    )
    config.long_text_pca_components = 0
    config.long_text_pca_scope = "device"
    config.label_smoothing = 0.0
    return config


# ----------------------------------------------------------------------------------------------------
# Validation


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    if isinstance(config, Mapping):
        return {key: _as_dict(value) if isinstance(value, (Mapping, ml_collections.ConfigDict)) else value for key, value in config.items()}
    raise TypeError(f"loss config must be a ConfigDict or a mapping, got {type(config).__name__}")


def _check_keys(given: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    unknown = sorted(set(given) - set(expected))
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown field (known: {sorted(expected)})")
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ValueError(f"{where}.{missing[0]}: missing field (start from default_loss_config())")


def validate_loss_config(config: Any) -> dict[str, Any]:
    """Checks every field of `config.loss`; returns it as a plain nested dict.

    Unknown or missing fields and bad values raise ValueError naming the field (e.g. "loss.chunk_size").
    """
    data = _as_dict(config)
    defaults = default_loss_config().to_dict()
    _check_keys(data, defaults, "loss")
    weights = data["weights"]
    if not isinstance(weights, Mapping):
        raise ValueError(f"loss.weights = {weights!r}: must be a mapping of term -> weight")
    _check_keys(weights, defaults["weights"], "loss.weights")
    for name, weight in weights.items():
        require(is_number(weight) and weight >= 0, f"loss.weights.{name}", weight, "must be a finite number >= 0")
    require(any(weight > 0 for weight in weights.values()), "loss.weights", weights, "every weight is zero; enable a term")
    require(data["scene_kind"] in SCENE_KINDS, "loss.scene_kind", data["scene_kind"], f"must be one of {SCENE_KINDS}")
    require(is_int(data["chunk_size"]) and data["chunk_size"] >= 0, "loss.chunk_size", data["chunk_size"], "must be an int >= 0 (0 = plain)")
    require(is_int(data["roi_output_size"]) and data["roi_output_size"] >= 1, "loss.roi_output_size", data["roi_output_size"], "must be an int >= 1")
    require(
        is_int(data["roi_sampling_ratio"]) and (data["roi_sampling_ratio"] >= 1 or data["roi_sampling_ratio"] == -1),
        "loss.roi_sampling_ratio", data["roi_sampling_ratio"], "must be -1 (adaptive) or an int >= 1",
    )
    require(
        data["region_text_positives"] in REGION_TEXT_POSITIVES,
        "loss.region_text_positives", data["region_text_positives"], f"must be one of {REGION_TEXT_POSITIVES}",
    )
    require(data["dense_features"] in DENSE_FEATURES, "loss.dense_features", data["dense_features"], f"must be one of {DENSE_FEATURES}")
    require(data["distill_teacher"] in DISTILL_TEACHERS, "loss.distill_teacher", data["distill_teacher"], f"must be one of {DISTILL_TEACHERS}")
    momentum = data["distill_ema_momentum"]
    require(is_number(momentum) and 0.0 <= momentum < 1.0, "loss.distill_ema_momentum", momentum, "must be in [0, 1)")
    require(
        is_int(data["distill_output_size"]) and data["distill_output_size"] >= 0,
        "loss.distill_output_size", data["distill_output_size"], "must be an int >= 0 (0 = the patch grid)",
    )
    require(
        data["long_text_pca_scope"] in PCA_SCOPES, "loss.long_text_pca_scope", data["long_text_pca_scope"],
        f"must be one of {PCA_SCOPES}",
    )
    smoothing = data["label_smoothing"]
    require(is_number(smoothing) and 0.0 <= smoothing < 1.0, "loss.label_smoothing", smoothing, "must be in [0, 1)")
    require(
        smoothing == 0 or data["scene_kind"] == "infonce", "loss.label_smoothing", smoothing,
        "applies to the InfoNCE cross-entropy only (loss.scene_kind 'infonce')",
    )
    _validate_schedule(data["long_text_schedule"], defaults["long_text_schedule"], "loss.long_text_schedule")
    pca = data["long_text_pca_components"]
    require(is_int(pca) and pca >= 0, "loss.long_text_pca_components", pca, "must be an int >= 0 (0 = off)")
    require(
        pca == 0 or weights["long_text"] > 0,
        "loss.long_text_pca_components", pca, "primary-component matching needs loss.weights.long_text > 0",
    )
    return data


def _validate_schedule(schedule: Any, defaults: Mapping[str, Any], where: str) -> None:
    if not isinstance(schedule, Mapping):
        raise ValueError(f"{where} = {schedule!r}: must be a mapping")
    _check_keys(schedule, defaults, where)
    kind = schedule["kind"]
    require(kind in SCHEDULE_KINDS, f"{where}.kind", kind, f"must be one of {SCHEDULE_KINDS}")
    for key in ("start_step", "end_step"):
        require(is_int(schedule[key]) and schedule[key] >= 0, f"{where}.{key}", schedule[key], "must be an int >= 0")
    for key in ("start_weight", "end_weight"):
        value = schedule[key]
        require(is_number(value) and 0.0 <= value <= 1.0, f"{where}.{key}", value, "must be in [0, 1]")
    if kind in ("linear", "cosine"):
        require(
            schedule["end_step"] > schedule["start_step"], f"{where}.end_step", schedule["end_step"],
            f"must be > start_step ({schedule['start_step']}) for a {kind} schedule",
        )
