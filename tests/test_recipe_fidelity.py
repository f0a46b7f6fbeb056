"""The recipes' values and behaviours against the authors' code, transcribed here with file and line:
open_clip's weight-decay rule (FarSLIP open_clip_train/main.py:353 @ d32ef2c), FarSLIP's MGRS loader
(open_clip_train/data.py:93-131), Long-CLIP's primary-component matching and label-smoothed loss
(beichenzbc/Long-CLIP model/model_longclip.py:389-403, 442-485) and its fixed text positions
(model/longclip.py:250-251, model_longclip.py:306-309, 359), run through the DGTRS recipe."""
from __future__ import annotations

import importlib
import io
import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import train_fixtures
from geoalign_jax.data import image_ops, pipeline, prepare_corpora, sources, transforms
from geoalign_jax.losses import objective
from geoalign_jax.losses.contrastive import l2_normalize, principal_component_reconstruction
from geoalign_jax.losses.smoothed import label_smoothed_clip_loss
from geoalign_jax.models import clip
from geoalign_jax.params_checkpoint import abstract_params, flatten_params, load_params, save_params
from geoalign_jax.train import config as trainer_config
from geoalign_jax.train import experiment, loop, optim

QUIET = {"progress": False, "workers": 1}


# ---------------------------------------------------------------------------------------------------------
# Weight decay: open_clip's rule on the ViT-B/16 parameter tree


def _open_clip_excludes(name: str, param) -> bool:
    # FarSLIP open_clip_train/main.py:353 (open_clip's main.py of that era; legacy_main.py:332 today):
    # exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or 'logit_scale' in n
    return param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name


def test_default_decay_mask_is_open_clips_rule_on_vit_b_16():
    """Our mask, carried to open_clip's names by the real converter (each open_clip tensor is built from
    parameters with one mask value), equals the rule on open_clip's own named_parameters(), name by name."""
    import open_clip
    from geoalign_jax.convert.open_clip import to_open_clip_layout

    model = open_clip.create_model("ViT-B-16-quickgelu", pretrained=None)
    config = clip.get_model_config("ViT-B-16-quickgelu")
    shapes = abstract_params(config)
    mask = optim.decay_mask(shapes, trainer_config.default_optim_config().no_decay)
    as_arrays = jax.tree.map(lambda decays, leaf: np.broadcast_to(np.float32(decays), leaf.shape), mask, shapes)
    ours = to_open_clip_layout(config, as_arrays)
    theirs = dict(model.named_parameters())
    assert set(ours) == set(theirs)
    for name, param in theirs.items():
        values = np.asarray(ours[name])
        assert values.min() == values.max(), f"{name} mixes decayed and exempt parameters"
        assert bool(values.flat[0]) == (not _open_clip_excludes(name, param)), name
    decays = flatten_params(mask)
    assert decays["text/positional_embedding"] and decays["text/token_embedding/embedding"]  # decayed, as there
    assert not decays["visual/class_embedding"] and not decays["logit_scale"]


# ---------------------------------------------------------------------------------------------------------
# Long-CLIP: primary-component matching and label smoothing, against a PyTorch transcription


def _torch_long_clip_short_loss(image_raw, text_raw, logit_scale, components: int, world: int):
    """Long-CLIP's short-text loss on `world` GPUs, as its forward computes it (model_longclip.py:442-485):
    normalise, PCA on each rank's rows (PCA: model_longclip.py:389-403), gather WITH gradient
    (torch.distributed.nn.all_gather), label_smoothing=0.1; DDP averages the ranks' gradients."""
    import torch
    import torch.nn.functional as F

    def pca(input_tensor, pca_dim):  # model_longclip.py:389-403
        mean = torch.mean(input_tensor, dim=0)
        x_centered = input_tensor - mean.unsqueeze(0)
        _, _, vt = torch.linalg.svd(x_centered, full_matrices=False)
        principal_components = vt.T[:, :pca_dim]
        x_transformed = torch.mm(x_centered, principal_components)
        x_reversed = torch.mm(x_transformed, principal_components.T)
        return x_reversed + mean

    image = image_raw / image_raw.norm(dim=1, keepdim=True)
    text = text_raw / text_raw.norm(dim=1, keepdim=True)
    bs = image.shape[0] // world
    image_short = [pca(image[r * bs:(r + 1) * bs], components) for r in range(world)]
    image_all, text_all = torch.cat(image_short), text
    losses = []
    for rank in range(world):
        sim_i2ts = logit_scale.exp() * torch.matmul(image_short[rank], text_all.T)
        sim_ts2i = logit_scale.exp() * torch.matmul(image_all, text[rank * bs:(rank + 1) * bs].T).T
        targets = torch.linspace(rank * bs, rank * bs + bs - 1, bs, dtype=torch.long)
        losses.append((F.cross_entropy(sim_i2ts, targets, label_smoothing=0.1)
                       + F.cross_entropy(sim_ts2i, targets, label_smoothing=0.1)) / 2)
    return sum(losses) / world


@pytest.mark.parametrize("scope,world", [("device", 2), ("global", 1)])
def test_primary_component_matching_and_smoothing_equal_long_clips(scope, world):
    import torch

    rng = np.random.default_rng(3)
    image, text = rng.normal(size=(8, 6)), rng.normal(size=(8, 6))
    scale = np.float64(np.log(1 / 0.07))
    tensors = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (image, text, scale)]
    expected = _torch_long_clip_short_loss(*tensors, components=3, world=world)
    expected.backward()

    config = objective.default_loss_config()
    config.weights.long_text = 1.0
    config.long_text_pca_components = 3
    config.long_text_pca_scope = scope
    config.label_smoothing = 0.1
    config = objective.validate_loss_config(config)
    # The plain losses read only `batch_shards` of the mesh (the PCA groups); a stand-in gives two shards.
    context = types.SimpleNamespace(batch_shards=2)

    def loss(image, text, scale):
        outputs = {"image_emb": image, "text_emb": text}
        return objective.scene_term(outputs, {}, {"logit_scale": scale}, axis_context=context, config=config)[0]

    f32 = [jnp.asarray(v, jnp.float32) for v in (image, text, scale)]
    value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(*f32)
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
    for grad, tensor in zip(grads, tensors):
        np.testing.assert_allclose(np.asarray(grad), tensor.grad.numpy(), rtol=2e-3, atol=2e-5)


def test_label_smoothing_is_torchs_on_the_valid_pairs_and_chunking_keeps_it():
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(4)
    image, text = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
    mask = np.array([True, True, False, True, True, True])
    i, t = (torch.nn.functional.normalize(torch.tensor(v[mask], dtype=torch.float64), dim=1) for v in (image, text))
    logits = 10.0 * i @ t.T
    targets = torch.arange(int(mask.sum()))
    expected = 0.5 * (F.cross_entropy(logits, targets, label_smoothing=0.2)
                      + F.cross_entropy(logits.T, targets, label_smoothing=0.2)).item()
    for chunk_size in (0, 2):
        value, _ = label_smoothed_clip_loss(image, text, jnp.log(10.0), label_smoothing=0.2, mask=mask,
                                            chunk_size=chunk_size)
        np.testing.assert_allclose(float(value), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="loss.label_smoothing"):
        config = objective.default_loss_config()
        config.label_smoothing = 1.0
        objective.validate_loss_config(config)


def test_pca_groups_are_consecutive_row_blocks():
    x = np.random.default_rng(5).normal(size=(8, 5)).astype(np.float32)
    grouped = principal_component_reconstruction(x, 2, groups=2)
    np.testing.assert_allclose(grouped[:4], principal_component_reconstruction(x[:4], 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grouped[4:], principal_component_reconstruction(x[4:], 2), rtol=1e-5, atol=1e-6)
    assert not np.allclose(grouped, principal_component_reconstruction(x, 2), atol=1e-3)
    with pytest.raises(ValueError, match="3 equal PCA groups"):
        principal_component_reconstruction(x, 2, groups=3)


# ---------------------------------------------------------------------------------------------------------
# Long-CLIP's fixed positions through the DGTRS recipe: model, optimizer, checkpoint, export


def _dgtrs_tiny(train_shards: str, init_path: pathlib.Path):
    config = importlib.import_module("configs.dgtrs").get_config()
    config.model.name = "tiny"
    config.data.train_shards = train_shards
    config.data.batch_size = 4
    config.data.image_size = 32
    config.data.read_threads = 2
    config.data.read_buffer_size = 8
    config.init.path = str(init_path)  # a 77-position checkpoint: Long-CLIP-stretched when loaded
    config.optim.learning_rate = 1e-3  # large enough that every trainable row visibly moves in 3 steps
    config.optim.warmup_steps = 1
    config.train.num_steps = 3
    config.train.log_every = 1
    config.checkpoint.every_steps = 3
    config.checkpoint.async_save = False
    return config


def test_dgtrs_recipe_keeps_text_positions_0_to_19_bitwise_and_trains_the_rest(tmp_path):
    from geoalign_jax.convert.open_clip import params_to_open_clip
    from geoalign_jax.models.posemb import stretch_text_posemb

    scenes = train_fixtures.make_data(tmp_path / "data", num_train=8, image_size=32)
    short_config = clip.get_model_config("tiny")
    imported = jax.device_get(clip.init_params(short_config, jax.random.key(7)))
    save_params(tmp_path / "openai-tiny", short_config, imported)
    config = _dgtrs_tiny(scenes, tmp_path / "openai-tiny")
    assert config.optim.fixed_rows == (("^text/positional_embedding$", 20),)
    result = loop.run(config, tmp_path / "run", progress=False)
    assert (result.status, result.step) == ("finished", 3)

    _, trained = load_params(tmp_path / "run")
    table = np.asarray(trained["text"]["positional_embedding"])
    stretched = stretch_text_posemb(np.asarray(imported["text"]["positional_embedding"]))
    assert table.shape == (248, short_config.text.width)
    assert table[:20].tobytes() == np.asarray(imported["text"]["positional_embedding"])[:20].tobytes()
    moved = np.any(table[20:] != stretched[20:], axis=1)
    assert moved.all(), f"rows >= 20 that did not train: {np.flatnonzero(~moved) + 20}"
    # The export holds the one table: rows < 20 OpenAI's, rows >= 20 the trained residual (what open_clip's
    # and transformers' loaders read as `positional_embedding`, checked in tests/test_convert_*.py).
    exported = params_to_open_clip(experiment.model_config(config), trained)["positional_embedding"]
    np.testing.assert_array_equal(np.asarray(exported), table)


def test_fixed_rows_equal_long_clips_frozen_table_plus_trained_residual_under_adamw():
    """Long-CLIP's two tables (model/longclip.py:248-251: a frozen stretched table and a trainable copy;
    model_longclip.py:306-309, 359: rows < 20 read from the first, >= 20 from the second) trained by
    train/train.py:58 `optim.AdamW(model.parameters(), lr, weight_decay)` (every parameter decayed, Adam moments
    per element) give the same effective table, step by step, as one table with `optim.fixed_rows` rows 0-19."""
    import optax
    import torch

    rng = np.random.default_rng(8)
    table, weights, other = (rng.normal(size=shape).astype(np.float32) for shape in ((248, 6), (248, 6), (3, 6)))
    lr, wd, steps = 1e-2, 0.1, 5

    def objective_of(sin, total, e, o, w):  # smooth, couples the rows, and reads held rows 0-2
        return total(total(sin(0.3 * e * w), 0) ** 2) + total(o * e[:3]) ** 2

    frozen = torch.nn.Parameter(torch.tensor(table), requires_grad=False)
    residual = torch.nn.Parameter(torch.tensor(table).clone())
    other_t = torch.nn.Parameter(torch.tensor(other))
    mask1 = torch.zeros(248, 1)
    mask1[:20] = 1
    mask2 = 1 - mask1
    adamw = torch.optim.AdamW([frozen, residual, other_t], lr=lr, weight_decay=wd)  # torch defaults b2, eps
    for _ in range(steps):
        adamw.zero_grad()
        objective_of(torch.sin, torch.sum, frozen * mask1 + residual * mask2, other_t, torch.tensor(weights)).backward()
        adamw.step()
    theirs = (frozen * mask1 + residual * mask2).detach().numpy()

    config = trainer_config.default_optim_config()
    config.learning_rate, config.weight_decay, config.b2, config.eps, config.clip_norm = lr, wd, 0.999, 1e-8, 0.0
    config.no_decay, config.warmup_steps, config.end_learning_rate_factor = (), 0, 1.0  # constant lr, as torch's
    config.fixed_rows = (("^text/positional_embedding$", 20),)
    params = {"text": {"positional_embedding": jnp.asarray(table)}, "other": jnp.asarray(other)}
    optimizer = optim.make_optimizer(config, params, 100)
    state = optimizer.init(params)
    grad = jax.grad(lambda p: objective_of(jnp.sin, jnp.sum, p["text"]["positional_embedding"], p["other"], weights))
    for _ in range(steps):
        updates, state = optimizer.update(grad(params), state, params)
        params = optax.apply_updates(params, updates)
    ours = np.asarray(params["text"]["positional_embedding"])
    assert ours[:20].tobytes() == table[:20].tobytes()
    assert np.abs(ours[20:] - table[20:]).max(axis=1).min() > 1e-4  # every trainable row moved
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(params["other"]), other_t.detach().numpy(), rtol=0, atol=1e-5)


def test_fixed_rows_are_refused_when_they_match_nothing_or_exceed_the_rows():
    params = abstract_params(clip.get_model_config("tiny"))
    with pytest.raises(ValueError, match="matches no parameter"):
        optim.fixed_row_counts(params, (("^text/position_embedding$", 20),))
    with pytest.raises(ValueError, match="fewer than 100 rows"):
        optim.fixed_row_counts(params, (("^text/positional_embedding$", 100),))


# ---------------------------------------------------------------------------------------------------------
# FarSLIP's MGRS loader: box filter in source pixels, scene caption, region text and category


def _farslip_keeps(boxes, width, height, min_size=64, max_size=1024):
    """FarSLIP open_clip_train/data.py:98-120: expand_bbox(bbox, 1) clips to the image, then
    `if area < self.min_size ** 2 or (self.max_size and area > self.max_size ** 2): continue`."""
    keep = []
    for x1, y1, x2, y2 in boxes:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        w, h = x2 - x1, y2 - y1
        x1n, y1n = max(cx - w / 2, 0), max(cy - h / 2, 0)
        x2n, y2n = min(cx + w / 2, width), min(cy + h / 2, height)
        area = (x2n - x1n) * (y2n - y1n)
        keep.append(not (area < min_size**2 or (max_size and area > max_size**2)))
    return keep


def test_source_pixel_box_filter_is_farslips():
    rng = np.random.default_rng(6)
    corners = rng.uniform(-100, 2200, size=(400, 2, 2))  # two (x, y) points per box
    boxes = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)  # x1, y1, x2, y2
    boxes = np.concatenate([boxes, [[0, 0, 64, 64], [0, 0, 63, 64], [0, 0, 1024, 1024], [0, 0, 1024, 1025]]])
    got = image_ops.source_size_keep(boxes, 2000, 1800, 64, 1024)
    assert got.tolist() == _farslip_keeps(boxes, 2000, 1800)
    assert got[-4:].tolist() == [True, False, True, False] and 0 < got.sum() < len(boxes)


def _png(size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (90, 120, 60)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_mgrs_scene_caption_region_text_and_category_as_farslips_loader(tmp_path):
    root = tmp_path / "global_imgs"
    root.mkdir()
    (root / "a.png").write_bytes(_png((300, 200)))
    (root / "b.png").write_bytes(_png((300, 200)))
    box = lambda x1, y1, x2, y2: {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "W": 300, "H": 200}  # noqa: E731
    items = [
        {"global_filepath": "a.png", "global_caption": "an airport", "brief_caption": "airport",
         "detailed_caption": "A long view of an airport.",
         "segment": [{"bbox": box(0, 0, 10, 10), "category": "car", "category_id": 4},  # 100 px^2: dropped
                     {"bbox": box(10, 10, 110, 110), "category": "airplane", "category_id": 7},
                     {"bbox": box(150, 20, 250, 120), "category": "airplane", "category_id": 7,
                      "cap": "a white plane at the gate"}]},  # both: the caption is the text, category -1
        {"global_filepath": "b.png", "brief_caption": "a harbour", "detailed_caption": "A harbour with boats.",
         "segment": []},
    ]
    (tmp_path / "text_info.json").write_text(json.dumps(items))
    captions = {}
    for rule in ("all", "farslip"):
        prepare_corpora.prepare_mgrs(tmp_path / "text_info.json", root, tmp_path / rule, captions=rule, **QUIET)
        source = sources.RecordSource.from_dir(tmp_path / rule, "train")
        captions[rule] = {r["id"]: r for r in (source[i] for i in range(len(source)))}
    # data.py:93: item.get("global_caption") or item.get("detailed_caption")
    assert captions["farslip"]["a.png"]["captions"] == ["an airport"]
    assert captions["farslip"]["b.png"]["captions"] == ["A harbour with boats."]
    assert captions["all"]["b.png"]["captions"] == ["a harbour"]
    regions = captions["farslip"]["a.png"]["regions"]
    assert [(r["category"], r["caption"]) for r in regions] == [
        ("car", None), ("airplane", None), ("airplane", "a white plane at the gate")]  # category and caption kept

    data = importlib.import_module("configs.farslip").get_config("s2").data
    data.image_size, data.region_crop_size = 32, 32
    transform = transforms.TrainTransform(pipeline.transform_config(data))
    example = transform.random_map(captions["farslip"]["a.png"], np.random.default_rng(0))
    assert example["region_mask"].tolist() == [True, True, False, False]  # the 10 x 10 box is filtered
    airplane = regions[1]["category_id"]
    assert sorted(example["region_category"][:2].tolist()) == sorted([airplane, -1])  # data.py:126-131
    tokenize = transform._tokenize
    expected = {tuple(tokenize(["a satellite image of airplane"])[0]), tuple(tokenize(["a white plane at the gate"])[0])}
    assert {tuple(row) for row in example["region_text"][:2]} == expected  # data.py:127, 130: no period


# ---------------------------------------------------------------------------------------------------------
# Learning-rate schedule: open_clip's cosine_lr


def _open_clip_cosine_lr(base_lr, warmup_length, steps, step):
    """FarSLIP open_clip_train/scheduler.py:9-11, 45-53 (Long-CLIP train/scheduler.py is the same)."""
    import math

    if step < warmup_length:
        return base_lr * (step + 1) / warmup_length
    e = step - warmup_length
    es = steps - warmup_length
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base_lr


@pytest.mark.parametrize("warmup,steps", [(200, 5860), (3, 10), (0, 7)])
def test_learning_rate_schedule_is_open_clips_cosine_lr(warmup, steps):
    config = trainer_config.default_optim_config()
    config.learning_rate, config.warmup_steps = 1e-6, warmup
    schedule = optim.learning_rate_schedule(config, steps)
    counts = np.arange(steps)
    expected = [_open_clip_cosine_lr(1e-6, warmup, steps, int(k)) for k in counts]
    np.testing.assert_allclose(np.asarray(jax.vmap(schedule)(counts)), expected, rtol=1e-5, atol=1e-13)  # float32


def test_bad_box_bounds_and_fixed_rows_are_refused_naming_the_field():
    data = pipeline.default_data_config()
    data.region_min_source_size, data.region_max_source_size = 64.0, 32.0
    with pytest.raises(ValueError, match="region_max_source_size 32.0 is below region_min_source_size"):
        pipeline.transform_config(data)
    config = experiment.get_config()
    config.optim.fixed_rows = (("^text/positional_embedding$", 0),)
    with pytest.raises(ValueError, match="optim.fixed_rows"):
        experiment.check_config(config)
