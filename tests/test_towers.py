"""The towers against open_clip: embeddings, patch tokens and token states, position-embedding
interpolation for other image sizes, Long-CLIP stretching, and logical axis names of every parameter."""
from __future__ import annotations

import functools
import types

import jax
import numpy as np
import pytest

import torch
import open_clip
from open_clip.model import resize_pos_embed  # noqa: E402  (open_clip 3.3.0 keeps it in model.py)

from geoalign_jax.convert import infer_config, layout  # noqa: E402
from geoalign_jax.convert.open_clip import open_clip_model_cfg, params_to_open_clip  # noqa: E402
from geoalign_jax.models.clip import (  # noqa: E402
    CLIPConfig,
    encode_image,
    encode_text,
    get_model_config,
    param_logical_axes,
)
from geoalign_jax.models.posemb import resize_image_posemb, stretch_text_posemb  # noqa: E402
from param_fixtures import random_params  # noqa: E402
from geoalign_jax.params_checkpoint import abstract_params  # noqa: E402

ATOL = 1e-4
CAPTIONS = [
    "two bridges cross a river between farmland",
    "!! an airport with three planes parked near the terminal",
    "Sparse residential buildings line a curved road beside a pond. " * 10,  # > 77 tokens
]


@functools.partial(jax.jit, static_argnums=0)
def image_tower(config: CLIPConfig, params, images):
    return encode_image(config, params, images)


@functools.partial(jax.jit, static_argnums=0)
def text_tower(config: CLIPConfig, params, tokens):
    return encode_text(config, params, tokens)




def open_clip_model(config: CLIPConfig, params, image_size: int | None = None):
    """open_clip's CLIP holding our weights; at another image size its own `resize_pos_embed` adapts them."""
    model_cfg = open_clip_model_cfg(config)
    if image_size is not None:
        model_cfg["vision_cfg"]["image_size"] = image_size
    model = open_clip.CLIP(**model_cfg).eval()
    state_dict = {key: torch.from_numpy(value) for key, value in params_to_open_clip(config, params).items()}
    resize_pos_embed(state_dict, model)
    model.load_state_dict(state_dict, strict=True)
    return model


def random_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, size, size, 3), dtype=np.float32)


def to_nchw(images: np.ndarray):
    return torch.from_numpy(images.transpose(0, 3, 1, 2).copy())


# ----------------------------------------------------------------------------------------------------
# Tower parity (tiny, both activations)


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_towers_match_open_clip_including_patch_tokens_and_token_states(quick_gelu):
    config = get_model_config("tiny", quick_gelu=quick_gelu)
    params = random_params(config, seed=1)
    model = open_clip_model(config, params)
    images = random_images(2, 32)
    tokens = open_clip.tokenize(CAPTIONS)

    model.visual.output_tokens = True  # open_clip then also returns ln_post(patch tokens), unprojected
    captured = {}
    hook = model.ln_final.register_forward_hook(lambda module, inputs, output: captured.update(states=output))
    with torch.no_grad():
        pooled, tokens_out = model.visual(to_nchw(images))
        patch_expected = (tokens_out @ model.visual.proj).numpy()
        text_expected = model.encode_text(tokens).numpy()
    hook.remove()

    embedding, patch_tokens = image_tower(config, params, images)
    text_embedding, token_states = text_tower(config, params, tokens.numpy().astype(np.int32))
    np.testing.assert_allclose(np.asarray(embedding), pooled.numpy(), atol=ATOL, rtol=0)
    assert patch_tokens.shape == (2, 4, 4, 32)
    np.testing.assert_allclose(np.asarray(patch_tokens).reshape(2, 16, 32), patch_expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(text_embedding), text_expected, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(token_states), captured["states"].numpy(), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Position-embedding interpolation: open_clip's resize_pos_embed


@pytest.mark.parametrize("old_grid, new_grid", [(4, (8, 8)), (7, (5, 5)), (7, (9, 12)), (7, (3, 6))])
def test_resize_image_posemb_matches_open_clip(old_grid, new_grid):
    posemb = np.random.default_rng(0).standard_normal((1 + old_grid * old_grid, 16), dtype=np.float32)
    state_dict = {"visual.positional_embedding": torch.from_numpy(posemb.copy())}
    fake_model = types.SimpleNamespace(visual=types.SimpleNamespace(grid_size=new_grid))
    resize_pos_embed(state_dict, fake_model)
    expected = state_dict["visual.positional_embedding"].numpy()
    ours = np.asarray(resize_image_posemb(posemb, new_grid))
    assert ours.shape == expected.shape == (1 + new_grid[0] * new_grid[1], 16)
    assert np.array_equal(ours[0], posemb[0])  # the class token is not interpolated
    np.testing.assert_allclose(ours, expected, atol=1e-5, rtol=0)


def test_tiny_model_at_64px_matches_open_clip_resized():
    config = get_model_config("tiny")  # trained size 32 px
    params = random_params(config, seed=2)
    model = open_clip_model(config, params, image_size=64)
    images = random_images(2, 64)
    with torch.no_grad():
        expected = model.encode_image(to_nchw(images)).numpy()
    embedding, patch_tokens = image_tower(config, params, images)
    assert patch_tokens.shape == (2, 8, 8, 32)
    np.testing.assert_allclose(np.asarray(embedding), expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_b32_at_288_and_160_px_matches_open_clip_resized():
    config = get_model_config("ViT-B-32-quickgelu")
    params = random_params(config, seed=3)
    for size in (288, 160):
        model = open_clip_model(config, params, image_size=size)
        images = random_images(2, size, seed=size)
        with torch.no_grad():
            expected = model.encode_image(to_nchw(images)).numpy()
        embedding, _ = image_tower(config, params, images)
        np.testing.assert_allclose(np.asarray(embedding), expected, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Long-CLIP stretch (Long-CLIP is not installable: check the documented formula on hand-computed rows)


def test_stretch_text_posemb_follows_long_clip_formula():
    old = (np.arange(77, dtype=np.float32) ** 2)[:, None] * np.ones((1, 3), np.float32)  # row i = i^2
    new = stretch_text_posemb(old)
    assert new.shape == (248, 3)
    expected_rows = {
        0: 0.0, 19: 361.0,              # first 20 rows kept
        20: 400.0,                      # old[20]
        21: 410.25,                     # (3 * 20^2 + 21^2) / 4
        22: 420.5,                      # (2 * 400 + 2 * 441) / 4
        23: 430.75,                     # (400 + 3 * 441) / 4
        24: 441.0,                      # old[21]
        240: 5625.0,                    # old[75]
        243: 5738.25,                   # (5625 + 3 * 5776) / 4
        244: 5776.0,                    # old[76]
        245: 5813.75,                   # 5776 + 1 * (5776 - 5625) / 4: linear extrapolation
        247: 5889.25,                   # 5776 + 3 * 151 / 4
    }
    for row, value in expected_rows.items():
        np.testing.assert_allclose(new[row], value, rtol=1e-6, err_msg=f"row {row}")


def test_text_tower_accepts_248_tokens_only_when_stretched():
    config = get_model_config("tiny")
    params = random_params(config, seed=4)
    long_tokens = open_clip.tokenize(CAPTIONS, context_length=248).numpy().astype(np.int32)
    with pytest.raises(ValueError, match=r"token length 248 exceeds the text tower's context length 77"):
        encode_text(config, params, long_tokens)
    long_config, long_params = infer_config.stretch_text_context(config, params)
    assert long_config.text.context_length == 248
    embedding, states = encode_text(long_config, long_params, long_tokens)
    assert embedding.shape == (3, 32) and states.shape == (3, 248, 64)
    # Captions within the first 20 tokens see unchanged positions: same embedding as the 77-token model.
    short = open_clip.tokenize(["a river"], context_length=77).numpy().astype(np.int32)
    np.testing.assert_allclose(
        np.asarray(encode_text(long_config, long_params, short)[0]), np.asarray(encode_text(config, params, short)[0]), atol=1e-6
    )


# ----------------------------------------------------------------------------------------------------
# Logical axes


@pytest.mark.parametrize("name", ["tiny", "ViT-B-32"])
def test_every_parameter_has_one_logical_name_per_axis(name):
    config = get_model_config(name)
    axes = layout.flatten_params(param_logical_axes(config))
    shapes = layout.flatten_params(abstract_params(config))
    assert axes.keys() == shapes.keys()
    known = {"embed", "mlp", "heads", "kv", "vocab", "position", "joint_embed", "patch_h", "patch_w", "channels"}
    for key, spec in axes.items():
        names = tuple(spec)
        assert len(names) == len(shapes[key].shape), f"{key}: {names} for shape {shapes[key].shape}"
        assert set(names) <= known, f"{key}: unknown logical names {set(names) - known}"
    assert tuple(axes["visual/transformer/resblocks_0/attn/query/kernel"]) == ("embed", "heads", "kv")
    assert tuple(axes["text/token_embedding/embedding"]) == ("vocab", "embed")
