"""Model configuration, numerics options (remat, bf16), SegEarth dense features, parameter checkpoints.

Numerical parity with open_clip / transformers lives in test_towers.py and test_convert_*.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from geoalign_jax.models import clip, layers
from geoalign_jax.models import text as text_lib
from geoalign_jax import params_checkpoint as checkpoint

TINY = clip.get_model_config("tiny")


@pytest.fixture(scope="module")
def tiny_params():
    return clip.init_params(TINY, jax.random.key(0))


def _tokens(batch: int, length: int = 77) -> jnp.ndarray:
    rng = np.random.default_rng(0)
    tokens = np.zeros((batch, length), np.int32)
    for i in range(batch):
        n = 3 + i
        tokens[i, 0] = 49406
        tokens[i, 1 : n - 1] = rng.integers(1, 49000, n - 2)
        tokens[i, n - 1] = 49407
    return jnp.asarray(tokens)


def test_named_configs_have_open_clip_parameter_counts():
    # open_clip 3.3.0 create_model(name) parameter counts (same architecture, fused qkv).
    expected = {"ViT-B-32": 151_277_313, "ViT-B-16": 149_620_737, "ViT-L-14": 427_616_513}
    for name, count in expected.items():
        shapes = checkpoint.abstract_params(clip.get_model_config(name))
        assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == count, name


def test_config_overrides_and_unknown_fields_rejected():
    config = clip.get_model_config("ViT-B-16-quickgelu", vision_image_size=288, text_context_length=248)
    assert config.quick_gelu and config.vision.image_size == 288 and config.text.context_length == 248
    assert clip.CLIPConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown model 'ViT-X'"):
        clip.get_model_config("ViT-X")
    with pytest.raises(ValueError, match="vision.'image_szie'"):
        clip.get_model_config("tiny", vision_image_szie=64)
    with pytest.raises(ValueError, match="'dtpye'"):
        clip.get_model_config("tiny", dtpye="bfloat16")


def test_every_parameter_has_logical_axis_names(tiny_params):
    axes = clip.param_logical_axes(TINY)
    flat_axes = jax.tree_util.tree_flatten_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    flat_params = jax.tree_util.tree_flatten_with_path(tiny_params)[0]
    assert len(flat_axes) == len(flat_params)
    for (path, spec), (_, leaf) in zip(flat_axes, flat_params):
        assert len(spec) == leaf.ndim, path
        assert all(isinstance(name, str) for name in spec), path


def test_text_pooling_at_eot_ignores_tokens_after_it(tiny_params):
    tokens = _tokens(3)
    embedding, states = clip.encode_text(TINY, tiny_params, tokens)
    assert states.shape == (3, 77, TINY.text.width)
    # Causal mask + EOT pooling: changing padding after EOT must not change the embedding.
    noisy = tokens.at[:, 60:].set(7)
    embedding_noisy, _ = clip.encode_text(TINY, tiny_params, noisy)
    np.testing.assert_allclose(embedding, embedding_noisy, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds the text tower's context length 77"):
        clip.encode_text(TINY, tiny_params, jnp.zeros((1, 78), jnp.int32))


def test_last_block_rows_equal_the_full_block_at_those_rows():
    """`ResidualAttentionBlock.rows` (the pooled path of the embeddings) is the full block read at one row,
    in value and in parameter gradients, with a causal mask and per-row positions or one fixed position."""
    block = layers.ResidualAttentionBlock(width=64, heads=2, mlp_ratio=4.0, quick_gelu=False)
    x = jax.random.normal(jax.random.key(5), (3, 7, 64))
    variables = block.init(jax.random.key(6), x)
    causal = jnp.tril(jnp.ones((7, 7), bool))
    for rows, mask in ((jnp.array([6, 0, 3]), causal), (0, None)):
        index = jnp.broadcast_to(jnp.asarray(rows), (3,))

        def full(v):
            return block.apply(v, x, mask)[jnp.arange(3), index]

        def pooled(v):
            return block.apply(v, x, rows, mask, method=layers.ResidualAttentionBlock.rows)

        np.testing.assert_allclose(jax.jit(pooled)(variables), jax.jit(full)(variables), atol=1e-5)
        grad_full = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(full(v)))))(variables)
        grad_pooled = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(pooled(v)))))(variables)
        for a, b in zip(jax.tree.leaves(grad_pooled), jax.tree.leaves(grad_full)):
            np.testing.assert_allclose(a, b, atol=1e-5)


def test_pooled_image_embedding_skips_most_of_the_last_block():
    """Without patch tokens, the class embedding's gradient costs less than with them (XLA drops the full
    last block): at least half of one block's share of the image tower's FLOPs."""
    config = clip.get_model_config("tiny", vision_image_size=64)
    params = clip.init_params(config, jax.random.key(0))
    images = jnp.zeros((4, 64, 64, 3))

    def flops(loss) -> float:
        cost = jax.jit(jax.grad(loss)).lower(params).compile().cost_analysis()
        return float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

    embedding_only = flops(lambda p: jnp.sum(clip.encode_image(config, p, images)[0] ** 2))
    with_patches = flops(lambda p: jnp.sum(clip.encode_image(config, p, images)[0] ** 2)
                         + jnp.sum(clip.encode_image(config, p, images)[1] ** 2))
    per_block = with_patches / config.vision.layers
    assert with_patches - embedding_only > 0.5 * per_block


def test_text_tower_runs_the_shortest_length_bucket_with_the_same_result():
    """The embedding from the shortest bucket holding every EOT equals the full-length one (values and
    gradients), whichever bucket a batch lands in."""
    assert text_lib.length_buckets(77) == (32, 77)
    assert text_lib.length_buckets(248) == (32, 128, 248)
    assert text_lib.length_buckets(20) == (20,)
    config = clip.get_model_config("tiny", text_width=text_lib.MIN_BUCKETED_WIDTH, text_heads=4)
    params = clip.init_params(config, jax.random.key(0))

    def full_length(params, tokens):
        def embed(module, tokens):
            _, pooled = module.text._encode(tokens, jnp.argmax(tokens, -1))
            return module.text.ln_final(pooled) @ module.text.text_projection

        return clip.CLIP(config).apply({"params": params}, tokens, method=embed)

    embed = jax.jit(lambda p, t: clip.encode_text(config, p, t)[0])
    grad = jax.jit(jax.grad(lambda p, t: jnp.sum(clip.encode_text(config, p, t)[0] ** 3)))
    embed_full = jax.jit(full_length)
    grad_full = jax.jit(jax.grad(lambda p, t: jnp.sum(full_length(p, t) ** 3)))
    assert "stablehlo.case" in embed.lower(params, _tokens(2)).as_text()  # the bucketed path is the one tested
    for last in (5, 76):  # EOT positions of the longest caption: buckets 32 and 77
        long_caption = jnp.zeros(77, jnp.int32).at[0].set(49406).at[1:last].set(jnp.arange(1, last) + 100)
        tokens = _tokens(2).at[1].set(long_caption.at[last].set(49407))
        np.testing.assert_allclose(embed(params, tokens), embed_full(params, tokens), atol=1e-5)
        grads, expected = grad(params, tokens)["text"], grad_full(params, tokens)["text"]
        scale = max(float(np.abs(b).max()) for b in jax.tree.leaves(expected))
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, atol=1e-5 * scale)  # float32 reassociation


def test_remat_gives_the_same_gradients_and_bf16_is_close(tiny_params):
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    tokens = _tokens(2)

    def loss(config, params):
        image_embedding, patches = clip.encode_image(config, params, images)
        text_embedding, _ = clip.encode_text(config, params, tokens)
        return jnp.sum(image_embedding * text_embedding) + jnp.mean(patches**2)

    plain = jax.jit(jax.grad(functools.partial(loss, TINY)))(tiny_params)
    remat = jax.jit(jax.grad(functools.partial(loss, clip.get_model_config("tiny", remat=True))))(tiny_params)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)  # jit fuses the recompute differently

    bf16 = clip.get_model_config("tiny", dtype="bfloat16")
    emb32, _ = clip.encode_image(TINY, tiny_params, images)
    emb16, _ = clip.encode_image(bf16, tiny_params, images)
    assert emb16.dtype == jnp.float32  # outputs go back to float32 for the loss
    cos = jnp.sum(emb32 * emb16, -1) / (jnp.linalg.norm(emb32, axis=-1) * jnp.linalg.norm(emb16, axis=-1))
    assert float(cos.min()) > 0.99
    assert float(jnp.abs(emb32 - emb16).max()) > 0  # bf16 really ran in bf16


def _np_layer_norm(x, p, eps=1e-5):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def test_segearth_patch_tokens_follow_farslip_formula(tiny_params):
    """SegEarth last layer: softmax(qq^T)+softmax(kk^T)+softmax(vv^T) times v, out_proj, no residual/MLP."""
    images = jax.random.normal(jax.random.key(2), (1, 32, 32, 3))
    embedding_last, patches_last = clip.encode_image(TINY, tiny_params, images, dense="last")
    embedding_seg, patches_seg = clip.encode_image(TINY, tiny_params, images, dense="segearth")
    np.testing.assert_allclose(embedding_last, embedding_seg, atol=1e-6)  # CLS path unchanged

    # Input of the last block, from a one-layer-shorter model sharing the first block's weights.
    visual = jax.tree.map(np.asarray, tiny_params["visual"])
    one_layer = clip.get_model_config("tiny", vision_layers=1)
    short_params = {**tiny_params, "visual": {**tiny_params["visual"], "transformer": {
        "resblocks_0": tiny_params["visual"]["transformer"]["resblocks_0"]}}}
    x = np.asarray(
        clip.CLIP(one_layer).apply({"params": short_params}, images, method=_visual_tokens)
    )[0]
    block = visual["transformer"]["resblocks_1"]
    h = _np_layer_norm(x, block["ln_1"])
    q, k, v = (np.einsum("nd,dhk->nhk", h, block["attn"][n]["kernel"]) + block["attn"][n]["bias"]
               for n in ("query", "key", "value"))
    scale = q.shape[-1] ** -0.5
    weights = sum(_np_softmax(np.einsum("qhd,khd->hqk", t, t) * scale) for t in (q, k, v))
    attended = np.einsum("hqk,khd->qhd", weights, v)
    out = np.einsum("qhd,hde->qe", attended, block["attn"]["out"]["kernel"]) + block["attn"]["out"]["bias"]
    expected = _np_layer_norm(out, visual["ln_post"]) @ visual["proj"]
    np.testing.assert_allclose(np.asarray(patches_seg)[0].reshape(16, -1), expected[1:], atol=2e-5)
    assert not np.allclose(patches_seg, patches_last, atol=1e-3)


def _visual_tokens(module: clip.CLIP, images: jnp.ndarray) -> jnp.ndarray:
    """Tokens after the whole (shortened) transformer, before ln_post."""
    visual = module.visual
    x = visual.conv1(images)
    b, gh, gw, d = x.shape
    x = x.reshape(b, gh * gw, d)
    x = jnp.concatenate([jnp.broadcast_to(visual.class_embedding, (b, 1, d)), x], 1)
    x = visual.ln_pre(x + visual.positional_embedding)
    return visual.transformer(x)[0]


def test_other_image_size_interpolates_position_embedding(tiny_params):
    images = jax.random.normal(jax.random.key(3), (2, 48, 48, 3))
    embedding, patches = clip.encode_image(TINY, tiny_params, images)
    assert embedding.shape == (2, 32) and patches.shape == (2, 6, 6, 32)
    crops = jax.random.normal(jax.random.key(4), (2, 3, 32, 32, 3))
    crop_embedding, _ = clip.encode_image(TINY, tiny_params, crops)
    flat_embedding, _ = clip.encode_image(TINY, tiny_params, crops.reshape(6, 32, 32, 3))
    np.testing.assert_allclose(crop_embedding.reshape(6, -1), flat_embedding, atol=1e-6)
    with pytest.raises(ValueError, match="not a multiple of patch size 8"):
        clip.encode_image(TINY, tiny_params, jnp.zeros((1, 30, 30, 3)))


def test_params_checkpoint_round_trip_and_wrong_architecture(tmp_path, tiny_params):
    path = checkpoint.save_params(tmp_path / "ckpt", TINY, tiny_params)
    config, restored = checkpoint.load_params(path)
    assert config == TINY
    for a, b in zip(jax.tree.leaves(tiny_params), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(a, b)
    # Numerics are not architecture: a bf16/remat run loads the same checkpoint.
    numerics = clip.get_model_config("tiny", dtype="bfloat16", remat=True)
    config, _ = checkpoint.load_params(path, expected_config=numerics)
    assert config == numerics
    with pytest.raises(FileExistsError, match="never overwritten"):
        checkpoint.save_params(path, TINY, tiny_params)
    other = clip.get_model_config("tiny", vision_width=32)
    with pytest.raises(ValueError, match=r"'visual/class_embedding' has shape \(64,\), the model config expects \(32,\)"):
        checkpoint.load_params(path, expected_config=other)
    with pytest.raises(FileNotFoundError, match="not a geoalign-jax parameters checkpoint"):
        checkpoint.load_params(tmp_path)
