"""The objective: config validation, schedules, weighted sum of terms, untraced zero-weight terms, inert
padding end to end, crop-branch teacher, and (with the real tiny CLIP) chunked == plain."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from array_fixtures import ElementwiseTowers, assert_close as _close, dot_general_precisions
from geoalign_jax.losses import objective as objective_module
from geoalign_jax.losses.consistency import (
    global_region_consistency_loss,
    patch_distillation_loss,
    short_long_consistency_loss,
)
from geoalign_jax.losses.contrastive import clip_loss, hard_negative_loss, siglip_loss
from geoalign_jax.losses.objective import (
    TERM_NAMES,
    default_loss_config,
    make_objective,
    schedule_value,
    term_weights,
    validate_loss_config,
)
from geoalign_jax.losses.region import multi_positive_loss, region_text_loss
from geoalign_jax.models.roi_align import region_features

BATCH, NEGATIVES, REGIONS, CROPS, TOKENS, DIM, VOCAB, PIXELS = 4, 2, 3, 2, 5, 6, 20, 8


# ---------------------------------------------------------------------------------------------------
# A small differentiable stand-in for the towers (records its calls), and a full batch.


class FakeTowers:
    """encode_image: 2x2-pooled pixels -> patch tokens, mean pixel -> embedding; encode_text: token table."""

    def __init__(self):
        self.calls: list[tuple[str, tuple[int, ...], str]] = []

    def encode_image(self, config, params, image, *, dense="last"):
        self.calls.append(("image", tuple(image.shape), dense))
        n, h, w, _ = image.shape
        pooled = image.reshape(n, h // 2, 2, w // 2, 2, 3).mean(axis=(2, 4))
        patches = jnp.tanh(pooled @ params["patch_proj"])
        if dense == "segearth":
            patches = 2.0 * patches + 0.1
        return jnp.tanh(image.mean(axis=(1, 2)) @ params["image_proj"]), patches

    def encode_text(self, config, params, tokens):
        self.calls.append(("text", tuple(tokens.shape), ""))
        states = params["token_table"][tokens]
        return states.mean(axis=1), states


def _params(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return {
        "patch_proj": jax.random.normal(keys[0], (3, DIM)),
        "image_proj": jax.random.normal(keys[1], (3, DIM)),
        "token_table": jax.random.normal(keys[2], (VOCAB, DIM)),
        "logit_scale": jnp.float32(math.log(1 / 0.07)),
    }


def _batch(seed=1):
    rng = np.random.default_rng(seed)
    images = lambda *lead: rng.normal(size=lead + (PIXELS, PIXELS, 3)).astype(np.float32)  # noqa: E731
    tokens = lambda *lead: rng.integers(0, VOCAB, size=lead + (TOKENS,)).astype(np.int32)  # noqa: E731
    corners = rng.uniform(0, 1, size=(BATCH, REGIONS, 2, 2)).astype(np.float32)
    return {
        "image": images(BATCH),
        "text": tokens(BATCH),
        "long_text": tokens(BATCH),
        "long_text_mask": np.array([1, 1, 1, 0], bool),
        "hard_negatives": tokens(BATCH, NEGATIVES),
        "hard_negative_mask": np.array([[1, 0], [1, 1], [0, 0], [1, 0]], bool),
        "region_boxes": np.concatenate([corners.min(axis=2), corners.max(axis=2)], axis=-1),
        "region_mask": np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0]], bool),
        "region_text": tokens(BATCH, REGIONS),
        "region_category": np.array([[0, 1, 1], [1, -1, 0], [2, 0, 1], [1, 1, 1]], np.int32),
        "region_crops": images(BATCH, REGIONS),
        "local_crops": images(BATCH, CROPS),
        "local_crop_boxes": np.tile(np.array([0.1, 0.2, 0.6, 0.9], np.float32), (BATCH, CROPS, 1)),
        "region_view_crops": images(BATCH, REGIONS),
    }


def _config(**weights):
    config = default_loss_config()
    for name in TERM_NAMES:
        config.weights[name] = weights.get(name, 0.0)
    return config


ALL_WEIGHTS = dict(
    scene=1.0, hard_negative=0.5, region_text=0.7, region_cls=0.3, long_text=0.9,
    patch_distill=0.1, global_region_consistency=0.2, short_long_consistency=0.4,
)


# ---------------------------------------------------------------------------------------------------
# Config


def test_default_config_validates_and_documents_every_field():
    config = default_loss_config()
    validated = validate_loss_config(config)
    assert set(validated) == set(config.to_dict())
    for field in validated:
        assert field in default_loss_config.__doc__, field


def _mutate(path, value):
    """A plain-dict copy of the default config with one field set (ConfigDict would refuse bad types)."""
    data = default_loss_config().to_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return data


@pytest.mark.parametrize(
    "path, value, field",
    [
        (("weights", "scne"), 1.0, "loss.weights.scne"),
        (("chunks",), 4, "loss.chunks"),
        (("weights", "region_text"), -1.0, "loss.weights.region_text"),
        (("weights", "region_text"), float("nan"), "loss.weights.region_text"),
        (("scene_kind",), "sigmoid", "loss.scene_kind"),
        (("chunk_size",), -2, "loss.chunk_size"),
        (("chunk_size",), 1.5, "loss.chunk_size"),
        (("roi_output_size",), 0, "loss.roi_output_size"),
        (("roi_sampling_ratio",), 0, "loss.roi_sampling_ratio"),
        (("dense_features",), "first", "loss.dense_features"),
        (("distill_teacher",), "student", "loss.distill_teacher"),
        (("distill_ema_momentum",), 1.0, "loss.distill_ema_momentum"),
        (("region_text_positives",), "all", "loss.region_text_positives"),
        (("long_text_schedule", "kind"), "exponential", "loss.long_text_schedule.kind"),
        (("long_text_schedule", "start_weight"), 1.5, "loss.long_text_schedule.start_weight"),
        (("long_text_schedule", "warmup"), 3, "loss.long_text_schedule.warmup"),
        (("long_text_pca_components",), 32, "loss.long_text_pca_components"),  # long_text weight is 0
    ],
)
def test_validation_names_the_bad_field(path, value, field):
    config = _mutate(path, value)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate_loss_config(config)


def test_validation_rejects_missing_fields_and_all_zero_weights():
    data = default_loss_config().to_dict()
    del data["chunk_size"]
    with pytest.raises(ValueError, match=r"loss\.chunk_size: missing"):
        validate_loss_config(data)
    with pytest.raises(ValueError, match=r"loss\.weights.*every weight is zero"):
        validate_loss_config(_config())
    linear = default_loss_config()
    linear.long_text_schedule.update(kind="linear", start_step=10, end_step=10)
    with pytest.raises(ValueError, match=r"loss\.long_text_schedule\.end_step"):
        validate_loss_config(linear)


# ---------------------------------------------------------------------------------------------------
# Schedules and weights


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("constant", [0.2, 0.2, 0.2, 0.2, 0.2]),
        ("linear", [0.2, 0.2, 0.5, 0.8, 0.8]),
        ("cosine", [0.2, 0.2, 0.5, 0.8, 0.8]),
        ("step", [0.2, 0.8, 0.8, 0.8, 0.8]),
    ],
)
def test_schedule_values(kind, expected):
    schedule = {"kind": kind, "start_step": 100, "end_step": 300, "start_weight": 0.2, "end_weight": 0.8}
    values = [float(schedule_value(schedule, step)) for step in (0, 100, 200, 300, 1000)]
    _close(values, expected)
    if kind == "cosine":  # a quarter of the way: (1 - cos(pi / 4)) / 2 of the span
        _close(schedule_value(schedule, 150), 0.2 + 0.6 * (1 - math.cos(math.pi / 4)) / 2)


def test_curriculum_moves_weight_from_short_to_long():
    config = _config(scene=2.0, long_text=1.0)
    config.long_text_schedule.update(kind="linear", start_step=0, end_step=100, start_weight=0.0, end_weight=1.0)
    config = validate_loss_config(config)
    weights = term_weights(config, 25)
    _close(weights["scene"], 2.0 * 0.75)
    _close(weights["long_text"], 0.25)
    assert set(term_weights(validate_loss_config(_config(scene=1.0)), 25)) == {"scene"}


# ---------------------------------------------------------------------------------------------------
# The objective with the stand-in towers


def _objective(config, towers):
    return make_objective(config, encode_image=towers.encode_image, encode_text=towers.encode_text)


def test_zero_weight_terms_are_not_traced(monkeypatch):
    """Only scene on: the other inputs may be NaN garbage and are never encoded; other terms never run."""
    for name in TERM_NAMES:
        if name != "scene":
            monkeypatch.setitem(objective_module.TERMS, name, lambda *a, **k: pytest.fail("traced a zero-weight term"))
    towers = FakeTowers()
    batch = {key: (np.full(value.shape, np.nan, np.float32) if value.dtype == np.float32 and key != "image" else value)
             for key, value in _batch().items()}
    params = _params()
    loss, metrics = _objective(_config(scene=1.0), towers)(params, batch, 0, model_config=None)
    assert [call[0] for call in towers.calls] == ["image", "text"]
    image_emb, _ = towers.encode_image(None, params, batch["image"])
    text_emb, _ = towers.encode_text(None, params, batch["text"])
    expected, _ = clip_loss(image_emb, text_emb, params["logit_scale"])
    _close(loss, expected)
    assert {key.split("/")[0] for key in metrics} == {"scene", "weight", "loss", "logit_scale"}


def test_objective_is_the_weighted_sum_of_the_terms():
    config = _config(**ALL_WEIGHTS)
    config.region_text_positives = "category"
    config.long_text_schedule.update(kind="linear", start_step=0, end_step=100, start_weight=0.0, end_weight=1.0)
    towers = FakeTowers()
    params, batch, step = _params(), _batch(), 40
    loss, metrics = _objective(config, towers)(params, batch, step, model_config=None)

    image_emb, patches = towers.encode_image(None, params, batch["image"])
    text = lambda tokens: towers.encode_text(None, params, tokens.reshape(-1, TOKENS))[0].reshape(tokens.shape[:-1] + (DIM,))  # noqa: E731
    crops = lambda images: towers.encode_image(None, params, images.reshape(-1, PIXELS, PIXELS, 3))  # noqa: E731
    region_crop_emb = crops(batch["region_crops"])[0].reshape(BATCH, REGIONS, DIM)
    region_view_crop_emb = crops(batch["region_view_crops"])[0].reshape(BATCH, REGIONS, DIM)
    local_patches = crops(batch["local_crops"])[1].reshape(BATCH, CROPS, 4, 4, DIM)
    scale = params["logit_scale"]
    short, long_ = text(batch["text"]), text(batch["long_text"])
    region_text = text(batch["region_text"])
    expected_terms = {
        "scene": clip_loss(image_emb, short, scale)[0],
        "hard_negative": hard_negative_loss(image_emb, short, text(batch["hard_negatives"]), batch["hard_negative_mask"], scale)[0],
        "region_text": region_text_loss(
            region_features(patches, batch["region_boxes"], 7), region_text, batch["region_mask"], scale,
            region_category=batch["region_category"], positives="category",
        )[0],
        "region_cls": multi_positive_loss(region_crop_emb, region_text, batch["region_category"], batch["region_mask"], scale)[0],
        "long_text": clip_loss(image_emb, long_, scale, mask=batch["long_text_mask"])[0],
        "patch_distill": patch_distillation_loss(patches, local_patches, batch["local_crop_boxes"])[0],
        "global_region_consistency": global_region_consistency_loss(patches, batch["region_boxes"], region_view_crop_emb, batch["region_mask"])[0],
        "short_long_consistency": short_long_consistency_loss(short, long_, scale, mask=batch["long_text_mask"])[0],
    }
    weights = dict(ALL_WEIGHTS)
    weights["scene"] *= 1 - 0.4
    weights["long_text"] *= 0.4
    for name, value in expected_terms.items():
        _close(metrics[f"{name}/loss"], value)
        _close(metrics[f"weight/{name}"], weights[name])
    _close(loss, sum(weights[name] * value for name, value in expected_terms.items()))


def test_padded_inputs_are_inert_in_the_objective():
    """Padded negatives and regions, and stand-in long texts, change neither the loss nor the parameter gradients."""
    config = _config(**ALL_WEIGHTS)
    config.chunk_size = 3
    objective = _objective(config, FakeTowers())
    params, batch = _params(), _batch()
    value_and_grad = jax.jit(jax.value_and_grad(lambda p, b: objective(p, b, 7, model_config=None)[0]))
    value, grads = value_and_grad(params, batch)

    rng = np.random.default_rng(5)
    perturbed = dict(batch)
    negative_pad = ~batch["hard_negative_mask"]
    perturbed["hard_negatives"] = np.where(negative_pad[..., None], rng.integers(0, VOCAB, batch["hard_negatives"].shape), batch["hard_negatives"]).astype(np.int32)
    region_pad = ~batch["region_mask"]
    perturbed["region_boxes"] = np.where(region_pad[..., None], np.float32([0.0, 0.0, 1.0, 1.0]), batch["region_boxes"])
    perturbed["region_text"] = np.where(region_pad[..., None], 0, batch["region_text"]).astype(np.int32)
    perturbed["region_category"] = np.where(region_pad, 7, batch["region_category"]).astype(np.int32)
    perturbed["region_crops"] = np.where(region_pad[..., None, None, None], 5.0, batch["region_crops"]).astype(np.float32)
    perturbed["region_view_crops"] = np.where(region_pad[..., None, None, None], 4.0, batch["region_view_crops"]).astype(np.float32)
    stand_in = ~batch["long_text_mask"]  # the pipeline puts the short caption there; any tokens must do
    perturbed["long_text"] = np.where(stand_in[:, None], 1, batch["long_text"]).astype(np.int32)

    value_p, grads_p = value_and_grad(params, perturbed)
    _close(value_p, value, 1e-6)
    for key in grads:
        _close(grads_p[key], grads[key], 1e-6)


def test_missing_batch_key_is_named():
    batch = _batch()
    del batch["region_crops"]
    objective = _objective(_config(scene=1.0, region_cls=1.0), FakeTowers())
    with pytest.raises(ValueError, match=r"loss\.weights\.region_cls = 1\.0 needs batch\['region_crops'\]"):
        objective(_params(), batch, 0, model_config=None)


def test_dense_features_choice_reaches_image_and_local_crops_only():
    config = _config(scene=1.0, patch_distill=1.0, region_cls=1.0)
    config.dense_features = "segearth"
    towers = FakeTowers()
    _objective(config, towers)(_params(), _batch(), 0, model_config=None)
    dense_by_shape = {shape[0]: dense for kind, shape, dense in towers.calls if kind == "image"}
    assert dense_by_shape == {BATCH: "segearth", BATCH * REGIONS: "last", BATCH * CROPS: "segearth"}


def test_frozen_teacher_has_no_gradient_path_through_the_crops():
    active = _config(patch_distill=1.0)
    frozen = _config(patch_distill=1.0)
    frozen.distill_teacher = "frozen"
    params, batch = _params(), _batch()
    with pytest.raises(ValueError, match="teacher_params"):
        _objective(frozen, FakeTowers())(params, batch, 0, model_config=None)

    def loss(config, p, teacher):
        return _objective(config, FakeTowers())(p, batch, 0, model_config=None, teacher_params=teacher)[0]

    active_value, active_grad = jax.value_and_grad(lambda p: loss(active, p, None))(params)
    frozen_value, frozen_grad = jax.value_and_grad(lambda p: loss(frozen, p, p))(params)
    _close(frozen_value, active_value)  # same forward when the frozen copy equals the weights
    teacher_grad = jax.grad(lambda t: loss(frozen, params, t))(params)
    assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves(teacher_grad))
    # The active branch also trains the crop path, so its gradient differs.
    assert not np.allclose(np.asarray(active_grad["patch_proj"]), np.asarray(frozen_grad["patch_proj"]))


def test_siglip_scene_uses_logit_bias_and_requires_it():
    config = _config(scene=1.0)
    config.scene_kind = "siglip"
    towers = FakeTowers()
    params, batch = _params(), _batch()
    with pytest.raises(ValueError, match=r"params\['logit_bias'\]"):
        _objective(config, towers)(params, batch, 0, model_config=None)
    params["logit_bias"] = jnp.float32(-3.0)
    loss, _ = _objective(config, towers)(params, batch, 0, model_config=None)
    image_emb, _ = towers.encode_image(None, params, batch["image"])
    text_emb, _ = towers.encode_text(None, params, batch["text"])
    _close(loss, siglip_loss(image_emb, text_emb, params["logit_scale"], -3.0)[0])


# ---------------------------------------------------------------------------------------------------
# The real tiny CLIP: every term on, chunked == plain (values and parameter gradients).


def test_real_tiny_clip_all_terms_chunked_equals_plain():
    from geoalign_jax.models.clip import get_model_config, init_params

    model_config = get_model_config("tiny", text_context_length=16)
    params = init_params(model_config, jax.random.key(0))
    size = model_config.vision.image_size
    rng = np.random.default_rng(3)
    tokens = lambda *lead: rng.integers(1, 1000, size=lead + (16,)).astype(np.int32)  # noqa: E731
    images = lambda *lead: rng.normal(size=lead + (size, size, 3)).astype(np.float32)  # noqa: E731
    batch = _batch()
    batch.update(
        image=images(BATCH), text=tokens(BATCH), long_text=tokens(BATCH), hard_negatives=tokens(BATCH, NEGATIVES),
        region_text=tokens(BATCH, REGIONS), region_crops=images(BATCH, REGIONS), local_crops=images(BATCH, CROPS),
        region_view_crops=images(BATCH, REGIONS),
    )
    plain = default_loss_config()
    plain.weights.update(ALL_WEIGHTS)
    plain.dense_features = "segearth"
    plain.long_text_pca_components = 3
    chunked = plain.copy_and_resolve_references()
    chunked.chunk_size = 3
    objectives = [make_objective(plain), make_objective(chunked)]

    @jax.jit
    def both(p):
        return [jax.value_and_grad(lambda q: f(q, batch, 5, model_config=model_config)[0])(p) for f in objectives]

    (plain_value, plain_grad), (chunked_value, chunked_grad) = both(params)
    assert np.isfinite(float(plain_value))
    _close(chunked_value, plain_value)
    for g_chunked, g_plain in zip(jax.tree.leaves(chunked_grad), jax.tree.leaves(plain_grad)):
        np.testing.assert_allclose(np.asarray(g_chunked), np.asarray(g_plain), rtol=1e-4, atol=2e-5)


# ---------------------------------------------------------------------------------------------------
# Precision: every similarity the objective forms is float32-exact on GPU/TPU too.


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_every_loss_matmul_runs_at_highest_precision(chunk_size):
    """All terms on, value and gradient: each dot_general (logits, their backward, hard negatives, PCA
    projection, RoI-Align weighting) asks for HIGHEST; the stand-in towers have none of their own."""
    config = _config(**ALL_WEIGHTS)
    config.region_text_positives = "category"
    config.long_text_pca_components = 2
    config.chunk_size = chunk_size
    towers = ElementwiseTowers(DIM)
    objective = make_objective(config, encode_image=towers.encode_image, encode_text=towers.encode_text)
    params = towers.params(VOCAB)
    precisions = dot_general_precisions(jax.value_and_grad(lambda p: objective(p, _batch(), 7, model_config=None)[0]), params)
    assert len(precisions) >= 20, precisions
    assert set(precisions) == {"HIGHEST, HIGHEST"}, precisions
