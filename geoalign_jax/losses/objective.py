"""One training objective from `config.loss`: which terms, their weights and schedules, and the forward
pass that encodes exactly what the enabled terms need.

A term is enabled when its weight in `loss.weights` is > 0 (a static, Python-level decision): a term
with weight zero is never traced, and inputs only it needs are never encoded. An enabled term whose
batch inputs are missing is an error (naming the term and the key), never a silent skip. The batch keys
each term reads are declared once, in `geoalign_jax.batch_contract` (shared with the data pipeline); a term
is handed only those keys.

Terms (`term(outputs, batch, params, *, axis_context, config) -> (loss, metrics)`):
  scene                      image vs `text`: InfoNCE (or SigLIP, `scene_kind`), global-batch negatives
  hard_negative              image vs `text` with the image's own `hard_negatives` added to its row
  region_text                RoI-Align(patch tokens, `region_boxes`) mean-pooled vs `region_text`
  region_cls                 CLS of `region_crops` vs `region_text` (category prompts), FarSLIP's MPCL
  long_text                  image vs `long_text` (DGTRS); shares the scene weight via the curriculum
  patch_distill              FarSLIP patch-to-patch distillation with `local_crops` / `local_crop_boxes`
  global_region_consistency  RoI feature of each region in the global view vs the CLS of `region_view_crops`
  short_long_consistency     `text` vs `long_text` InfoNCE

Short/long curriculum (DGTRS-CLIP): with a(t) = `long_text_schedule` at step t, when long_text is enabled
the scene term is weighted `weights.scene * (1 - a(t))` and the long term `weights.long_text * a(t)`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from geoalign_jax.batch_contract import term_batch_keys
from geoalign_jax.losses.consistency import (
    global_region_consistency_loss,
    patch_distillation_loss,
    short_long_consistency_loss,
)
from geoalign_jax.losses.loss_config import (  # noqa: F401  (default_loss_config: documented as objective's)
    TERM_NAMES,
    default_loss_config,
    validate_loss_config,
)
from geoalign_jax.losses.contrastive import (
    clip_loss,
    hard_negative_loss,
    l2_normalize,
    logit_scale_value,
    principal_component_reconstruction,
    siglip_loss,
)
from geoalign_jax.losses.region import multi_positive_loss, region_text_loss
from geoalign_jax.losses.smoothed import label_smoothed_clip_loss
from geoalign_jax.models.roi_align import region_features
from geoalign_jax.parallel.mesh import AxisContext

Array = jax.Array
Metrics = dict[str, Array]
Batch = Mapping[str, Array]
Outputs = dict[str, Array]
EncodeImage = Callable[..., tuple[Array, Array]]
EncodeText = Callable[..., tuple[Array, Array]]

# ----------------------------------------------------------------------------------------------------
# Schedules and weights


def schedule_value(schedule: Mapping[str, Any], step: Array | int) -> Array:
    """The scheduled value at `step` (a traced int is fine) for a validated schedule mapping."""
    step = jnp.asarray(step, jnp.float32)
    start_weight = jnp.float32(schedule["start_weight"])
    end_weight = jnp.float32(schedule["end_weight"])
    kind = schedule["kind"]
    if kind == "constant":
        return start_weight
    if kind == "step":
        return jnp.where(step >= schedule["start_step"], end_weight, start_weight)
    progress = jnp.clip((step - schedule["start_step"]) / (schedule["end_step"] - schedule["start_step"]), 0.0, 1.0)
    if kind == "cosine":
        progress = 0.5 * (1.0 - jnp.cos(jnp.pi * progress))
    return start_weight + (end_weight - start_weight) * progress


def enabled_terms(config: Mapping[str, Any]) -> tuple[str, ...]:
    """Terms with weight > 0, in TERM_NAMES order (validated config)."""
    return tuple(name for name in TERM_NAMES if config["weights"][name] > 0)


def term_weights(config: Mapping[str, Any], step: Array | int) -> dict[str, Array]:
    """The weight of every enabled term at `step`, curriculum applied."""
    weights = {name: jnp.float32(config["weights"][name]) for name in enabled_terms(config)}
    if "long_text" in weights:
        long_share = schedule_value(config["long_text_schedule"], step)
        weights["long_text"] = weights["long_text"] * long_share
        if "scene" in weights:
            weights["scene"] = weights["scene"] * (1.0 - long_share)
    return weights


# ----------------------------------------------------------------------------------------------------
# Forward: encode what the enabled terms need.

# Model outputs each term reads.
TERM_OUTPUTS: dict[str, tuple[str, ...]] = {
    "scene": ("image_emb", "text_emb"),
    "hard_negative": ("image_emb", "text_emb", "hard_negative_emb"),
    "region_text": ("patch_tokens", "region_text_emb"),
    "region_cls": ("region_crop_emb", "region_text_emb"),
    "long_text": ("image_emb", "long_text_emb"),
    "patch_distill": ("patch_tokens", "local_crop_patch_tokens"),
    "global_region_consistency": ("patch_tokens", "region_view_crop_emb"),
    "short_long_consistency": ("text_emb", "long_text_emb"),
}


def required_batch_keys(config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Batch keys each enabled term reads (validated config), from `geoalign_jax.batch_contract`."""
    return {name: term_batch_keys(name, config) for name in enabled_terms(config)}


def check_batch(config: Mapping[str, Any], batch: Batch) -> None:
    """Raises ValueError naming the term and key when an enabled term's input is absent."""
    for name, keys in required_batch_keys(config).items():
        for key in keys:
            if key not in batch:
                raise ValueError(
                    f"loss.weights.{name} = {config['weights'][name]} needs batch[{key!r}], which is absent "
                    f"(batch keys: {sorted(batch)})"
                )


def _encode_texts(encode_text: EncodeText, model_config: Any, params: Any, tokens: Array) -> Array:
    """Token arrays of any leading shape [..., L] -> embeddings [..., E]."""
    lead = tokens.shape[:-1]
    embedding, _ = encode_text(model_config, params, tokens.reshape((-1, tokens.shape[-1])))
    return embedding.reshape(lead + embedding.shape[1:])


def _encode_images(encode_image: EncodeImage, model_config: Any, params: Any, images: Array, dense: str) -> tuple[Array, Array]:
    """Images [..., H, W, 3] -> (embeddings [..., E], patch tokens [..., gh, gw, E])."""
    lead = images.shape[:-3]
    embedding, patches = encode_image(model_config, params, images.reshape((-1,) + images.shape[-3:]), dense=dense)
    return embedding.reshape(lead + embedding.shape[1:]), patches.reshape(lead + patches.shape[1:])


def _default_encoders() -> tuple[EncodeImage, EncodeText]:
    from geoalign_jax.models import clip  # the models package is upstream of losses

    return clip.encode_image, clip.encode_text


def compute_outputs(
    model_config: Any,
    params: Any,
    batch: Batch,
    loss_config: Any,
    *,
    encode_image: EncodeImage | None = None,
    encode_text: EncodeText | None = None,
    teacher_params: Any = None,
) -> Outputs:
    """Encodes only what the enabled terms read; see TERM_OUTPUTS for the keys.

    image -> image_emb [B, E], patch_tokens [B, gh, gw, E] (dense per `dense_features`); text, long_text ->
    [B, E]; hard_negatives [B, K, L] -> [B, K, E]; region_text [B, R, L] -> [B, R, E]; region_crops,
    region_view_crops -> CLS embeddings [B, R, E]; local_crops [B, C, H, W, 3] -> patch tokens
    [B, C, gh, gw, E] from the crop branch (`distill_teacher`: params, or stop_gradient(teacher_params) for
    "frozen"/"ema").
    """
    config = validate_loss_config(loss_config)
    if encode_image is None or encode_text is None:
        default_image, default_text = _default_encoders()
        encode_image = encode_image or default_image
        encode_text = encode_text or default_text
    check_batch(config, batch)
    batch = _declared_keys(batch, {key for keys in required_batch_keys(config).values() for key in keys})
    needed = {key for name in enabled_terms(config) for key in TERM_OUTPUTS[name]}
    dense = config["dense_features"]
    outputs: Outputs = {}
    if needed & {"image_emb", "patch_tokens"}:
        outputs["image_emb"], outputs["patch_tokens"] = _encode_images(encode_image, model_config, params, batch["image"], dense)
    text_sources = {"text_emb": "text", "long_text_emb": "long_text", "hard_negative_emb": "hard_negatives", "region_text_emb": "region_text"}
    for output_key, batch_key in text_sources.items():
        if output_key in needed:
            outputs[output_key] = _encode_texts(encode_text, model_config, params, batch[batch_key])
    if "region_crop_emb" in needed:
        outputs["region_crop_emb"], _ = _encode_images(encode_image, model_config, params, batch["region_crops"], "last")
    if "region_view_crop_emb" in needed:
        outputs["region_view_crop_emb"], _ = _encode_images(encode_image, model_config, params, batch["region_view_crops"], "last")
    if "local_crop_patch_tokens" in needed:
        teacher = config["distill_teacher"]
        if teacher == "active":
            crop_params = params
        elif teacher_params is None:
            raise ValueError(f"loss.distill_teacher = {teacher!r} needs teacher_params (the {teacher} copy of the weights)")
        else:
            crop_params = jax.lax.stop_gradient(teacher_params)
        _, outputs["local_crop_patch_tokens"] = _encode_images(encode_image, model_config, crop_params, batch["local_crops"], dense)
    return outputs


# ----------------------------------------------------------------------------------------------------
# Terms: thin wrappers from (outputs, batch) to the array-level losses.


def _declared_keys(batch: Batch, keys: Any) -> dict[str, Array]:
    """The part of `batch` the contract lets a reader see: reading an undeclared key fails when traced."""
    return {key: batch[key] for key in keys}


def _logit_bias(params: Mapping[str, Any]) -> Array:
    if "logit_bias" not in params:
        raise ValueError(
            "loss.scene_kind = 'siglip' needs params['logit_bias'] (build the model with init_logit_bias, e.g. -10)"
        )
    return params["logit_bias"]


def _image_text_loss(image_emb, text_emb, mask, params, axis_context, config, normalize_images=True) -> tuple[Array, Metrics]:
    common = dict(mask=mask, chunk_size=config["chunk_size"], axis_context=axis_context)
    if config["scene_kind"] == "siglip":
        return siglip_loss(image_emb, text_emb, params["logit_scale"], _logit_bias(params), **common)
    if config["label_smoothing"] > 0 or not normalize_images:
        return label_smoothed_clip_loss(
            image_emb, text_emb, params["logit_scale"], label_smoothing=config["label_smoothing"],
            normalize_images=normalize_images, **common,
        )
    return clip_loss(image_emb, text_emb, params["logit_scale"], **common)


def _pca_groups(config: Mapping[str, Any], axis_context: AxisContext | None) -> int:
    """How many PCA groups `long_text_pca_scope` asks for: the batch shards ("device") or one ("global")."""
    if config["long_text_pca_scope"] == "global" or axis_context is None:
        return 1
    return axis_context.batch_shards


def scene_term(outputs: Outputs, batch: Batch, params: Mapping[str, Any], *, axis_context: AxisContext | None, config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """Image vs short caption; with Long-CLIP PCM on, the image side is the primary-component rebuild of the
    normalised image embeddings, contrasted as it is (Long-CLIP's forward does not re-normalise it)."""
    image_emb = outputs["image_emb"]
    components = config["long_text_pca_components"]
    if components > 0:
        groups = _pca_groups(config, axis_context)
        image_emb = principal_component_reconstruction(l2_normalize(image_emb), components, groups=groups)
        return _image_text_loss(image_emb, outputs["text_emb"], None, params, axis_context, config, normalize_images=False)
    return _image_text_loss(image_emb, outputs["text_emb"], None, params, axis_context, config)


def long_text_term(outputs: Outputs, batch: Batch, params: Mapping[str, Any], *, axis_context: AxisContext | None, config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """Image vs long description (DGTRS-CLIP / Long-CLIP); records without one are not rows (`long_text_mask`)."""
    return _image_text_loss(outputs["image_emb"], outputs["long_text_emb"], batch["long_text_mask"], params, axis_context, config)


def hard_negative_term(outputs: Outputs, batch: Batch, params: Mapping[str, Any], *, axis_context: AxisContext | None, config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """Image vs caption with its own hard negatives joining the row's negatives."""
    return hard_negative_loss(
        outputs["image_emb"], outputs["text_emb"], outputs["hard_negative_emb"], batch["hard_negative_mask"],
        params["logit_scale"], chunk_size=config["chunk_size"], axis_context=axis_context,
    )


def region_text_term(outputs: Outputs, batch: Batch, params: Mapping[str, Any], *, axis_context: AxisContext | None, config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """RoI-pooled patch tokens vs region captions / category prompts over the global batch."""
    regions = region_features(outputs["patch_tokens"], batch["region_boxes"], config["roi_output_size"], config["roi_sampling_ratio"])
    return region_text_loss(
        regions, outputs["region_text_emb"], batch["region_mask"], params["logit_scale"],
        region_category=batch.get("region_category"), positives=config["region_text_positives"],
        chunk_size=config["chunk_size"], axis_context=axis_context,
    )


def region_cls_term(outputs: Outputs, batch: Batch, params: Mapping[str, Any], *, axis_context: AxisContext | None, config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """FarSLIP stage 2: CLS embeddings of region crops vs category prompts, multi-positive."""
    return multi_positive_loss(
        outputs["region_crop_emb"], outputs["region_text_emb"], batch["region_category"], batch["region_mask"],
        params["logit_scale"], chunk_size=config["chunk_size"], axis_context=axis_context,
    )


def patch_distill_term(outputs: Outputs, batch: Batch, params: Mapping[str, Any], *, axis_context: AxisContext | None, config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """FarSLIP stage 1 patch-to-patch distillation (crop branch chosen in compute_outputs)."""
    del params, axis_context
    output_size = config["distill_output_size"] or None
    return patch_distillation_loss(
        outputs["patch_tokens"], outputs["local_crop_patch_tokens"], batch["local_crop_boxes"],
        output_size=output_size, sampling_ratio=config["roi_sampling_ratio"],
    )


def global_region_consistency_term(outputs: Outputs, batch: Batch, params: Mapping[str, Any], *, axis_context: AxisContext | None, config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """Region inside the global view (RoI) vs the CLS of its `region_view_crops` entry (the same pixels, alone)."""
    del params, axis_context
    return global_region_consistency_loss(
        outputs["patch_tokens"], batch["region_boxes"], outputs["region_view_crop_emb"], batch["region_mask"],
        output_size=config["roi_output_size"], sampling_ratio=config["roi_sampling_ratio"],
    )


def short_long_consistency_term(outputs: Outputs, batch: Batch, params: Mapping[str, Any], *, axis_context: AxisContext | None, config: Mapping[str, Any]) -> tuple[Array, Metrics]:
    """Short caption vs long description of the same image (text-text InfoNCE); records without a long
    description are not rows (their stand-in long text is the short caption itself)."""
    return short_long_consistency_loss(
        outputs["text_emb"], outputs["long_text_emb"], params["logit_scale"],
        mask=batch["long_text_mask"], chunk_size=config["chunk_size"], axis_context=axis_context,
    )


TERMS: dict[str, Callable[..., tuple[Array, Metrics]]] = {
    "scene": scene_term,
    "hard_negative": hard_negative_term,
    "region_text": region_text_term,
    "region_cls": region_cls_term,
    "long_text": long_text_term,
    "patch_distill": patch_distill_term,
    "global_region_consistency": global_region_consistency_term,
    "short_long_consistency": short_long_consistency_term,
}


# ----------------------------------------------------------------------------------------------------
# The objective


def make_terms_objective(loss_config: Any) -> Callable[..., tuple[Array, Metrics]]:
    """`terms_objective(outputs, batch, params, step, *, axis_context=None) -> (loss, metrics)`: the enabled
    terms on already computed tower outputs (compute_outputs), weighted and summed. `params` is read only for
    what the terms use directly (logit_scale, logit_bias). Gradient accumulation (train/grad_cache.py)
    differentiates this with respect to the outputs of the whole global batch."""
    config = validate_loss_config(loss_config)
    terms = enabled_terms(config)
    term_keys = required_batch_keys(config)

    def terms_objective(
        outputs: Outputs, batch: Batch, params: Any, step: Array | int, *, axis_context: AxisContext | None = None,
    ) -> tuple[Array, Metrics]:
        weights = term_weights(config, step)
        total = jnp.zeros((), jnp.float32)
        metrics: Metrics = {}
        for name in terms:
            term_batch = _declared_keys(batch, term_keys[name])
            value, term_metrics = TERMS[name](outputs, term_batch, params, axis_context=axis_context, config=config)
            total = total + weights[name] * value
            metrics.update({f"{name}/{key}": metric for key, metric in term_metrics.items()})
            metrics[f"weight/{name}"] = weights[name]
        metrics["loss"] = total
        metrics["logit_scale"] = jax.lax.stop_gradient(logit_scale_value(params["logit_scale"]))
        return total, metrics

    return terms_objective


def make_objective(
    loss_config: Any,
    *,
    encode_image: EncodeImage | None = None,
    encode_text: EncodeText | None = None,
) -> Callable[..., tuple[Array, Metrics]]:
    """`objective(params, batch, step, *, model_config, axis_context=None, teacher_params=None) -> (loss, metrics)`.

    The config is validated now (errors name the field). Metrics: "loss" (total), "<term>/<name>" per
    term (its loss and accuracies), "weight/<term>" (current weight), "logit_scale" (the scale exp(logit_scale)).
    `encode_image` / `encode_text` default to `geoalign_jax.models.clip`'s.
    """
    config = validate_loss_config(loss_config)
    terms_objective = make_terms_objective(config)

    def objective(
        params: Any,
        batch: Batch,
        step: Array | int,
        *,
        model_config: Any,
        axis_context: AxisContext | None = None,
        teacher_params: Any = None,
    ) -> tuple[Array, Metrics]:
        outputs = compute_outputs(
            model_config, params, batch, config, encode_image=encode_image, encode_text=encode_text,
            teacher_params=teacher_params,
        )
        return terms_objective(outputs, batch, params, step, axis_context=axis_context)

    return objective


__all__ = [
    "TERMS",
    "TERM_NAMES",
    "check_batch",
    "compute_outputs",
    "default_loss_config",
    "enabled_terms",
    "make_objective",
    "make_terms_objective",
    "required_batch_keys",
    "schedule_value",
    "term_weights",
    "validate_loss_config",
]
