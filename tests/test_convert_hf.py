"""Hugging Face transformers CLIPModel <-> geoalign-jax conversion, checked against real transformers.

Exported folders load with `from_pretrained` with no missing/unexpected keys and give the same
embeddings (fp32, atol 1e-4); imported HF models give ours the same embeddings; round trips are
bit-exact; the processor loads offline and tokenises like open_clip.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

import torch
import transformers
import open_clip

from param_fixtures import (  # noqa: E402
    ATOL,
    CAPTIONS,
    assert_trees_equal,
    embed_images,
    embed_texts,
    random_params,
)

from geoalign_jax.convert import hf as hf_convert  # noqa: E402
from geoalign_jax.convert.__main__ import main as convert_main  # noqa: E402
from geoalign_jax.batch_contract import OPENAI_MEAN, OPENAI_STD  # noqa: E402
from geoalign_jax.models.clip import (  # noqa: E402
    CLIPConfig,
    get_model_config,
)
from geoalign_jax.params_checkpoint import load_params, save_params  # noqa: E402

# transformers config of our "tiny" architecture, written out by hand (not by the exporter under test).
TINY_HF_CONFIG = {
    "projection_dim": 32,
    "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2,
                    "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "projection_dim": 32},
    "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 2, "num_hidden_layers": 2,
                      "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu", "projection_dim": 32},
}


def random_hf_model(hf_config: dict, seed: int):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(**hf_config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name == "logit_scale":
                continue
            noise = torch.randn(tensor.shape, generator=generator) * 0.02
            tensor.copy_(noise + 1.0 if name.endswith(".weight") and tensor.ndim == 1 else noise)
    return model


def hf_embeddings(model, images: np.ndarray, tokens) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        image_out = model.get_image_features(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        text_out = model.get_text_features(input_ids=torch.as_tensor(tokens))
    # transformers 5.x returns an output object whose pooler_output is the projected embedding.
    return image_out.pooler_output.numpy(), text_out.pooler_output.numpy()


def assert_parity(config: CLIPConfig, params, model, *, context_length: int = 77) -> None:
    size = config.vision.image_size
    images = np.random.default_rng(0).standard_normal((2, size, size, 3), dtype=np.float32)
    tokens = open_clip.tokenize(CAPTIONS, context_length=context_length).numpy().astype(np.int32)
    hf_images, hf_texts = hf_embeddings(model, images, tokens)
    ours_texts = np.asarray(embed_texts(config, params, tokens))
    np.testing.assert_allclose(np.asarray(embed_images(config, params, images)), hf_images, atol=ATOL, rtol=0)
    np.testing.assert_allclose(ours_texts, hf_texts, atol=ATOL, rtol=0)
    assert np.abs(ours_texts[0] - ours_texts[1]).max() > 100 * ATOL


def load_exported(folder: pathlib.Path):
    model, info = transformers.CLIPModel.from_pretrained(folder, output_loading_info=True, local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


# ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A GELU tiny model with random weights, exported to a HF folder once for this module."""
    config = get_model_config("tiny")
    params = random_params(config, seed=1)
    folder = tmp_path_factory.mktemp("hf_tiny")
    hf_convert.export_hf(config, params, folder)
    return config, params, folder


def test_export_loads_with_no_missing_keys_and_matches(tiny_export):
    config, params, folder = tiny_export
    model = load_exported(folder)
    assert model.config.text_config.hidden_act == "gelu" and model.config.text_config.eos_token_id == 49407
    assert_parity(config, params, model)


def test_processor_loads_offline_and_agrees_with_open_clip_on_real_rs_data(tiny_export, shared_data, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config, params, folder = tiny_export
    processor = transformers.CLIPProcessor.from_pretrained(folder, local_files_only=True)
    image_processor = processor.image_processor
    assert image_processor.crop_size == {"height": 32, "width": 32}
    assert tuple(image_processor.image_mean) == OPENAI_MEAN and tuple(image_processor.image_std) == OPENAI_STD

    rsicd = shared_data / "rsicd_sample"
    records = json.loads((rsicd / "dataset_rsicd.json").read_text())["images"][:2]
    captions = [sentence["raw"] for record in records for sentence in record["sentences"][:2]] + CAPTIONS[1:3]
    images = [Image.open(rsicd / "images" / record["filename"]).convert("RGB") for record in records]
    inputs = processor(text=captions, images=images, padding="max_length", truncation=True, max_length=77, return_tensors="np")
    ours_tokens = open_clip.tokenize(captions).numpy().astype(np.int32)
    for hf_ids, ids in zip(inputs["input_ids"], ours_tokens):
        length = int(np.argmax(ids)) + 1  # up to and including EOT; HF pads with EOT, open_clip with 0
        assert hf_ids[:length].tolist() == ids[:length].tolist()

    # The same real images and captions through HF and through our towers.
    model = load_exported(folder)
    pixel_values = inputs["pixel_values"].astype(np.float32)  # NCHW
    hf_images, hf_texts = hf_embeddings(model, pixel_values.transpose(0, 2, 3, 1), inputs["input_ids"])
    np.testing.assert_allclose(np.asarray(embed_images(config, params, pixel_values.transpose(0, 2, 3, 1))), hf_images, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(embed_texts(config, params, ours_tokens)), hf_texts, atol=ATOL, rtol=0)


def test_import_matches_hf_embeddings(tmp_path):
    model = random_hf_model(TINY_HF_CONFIG, seed=2)
    model.save_pretrained(tmp_path)
    config, params = hf_convert.load_hf(tmp_path)  # activation and heads from config.json
    assert config == get_model_config("tiny-quickgelu")
    assert_parity(config, params, model)


def test_round_trip_through_cli_is_bit_exact(tmp_path):
    config = get_model_config("tiny-quickgelu")
    params = random_params(config, seed=3)
    save_params(tmp_path / "ckpt", config, params)
    assert convert_main(["export", "--params", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert convert_main(["import", "--src", str(tmp_path / "hf"), "--format", "hf", "--out", str(tmp_path / "back")]) == 0
    back_config, back_params = load_params(tmp_path / "back")
    assert back_config == config
    assert_trees_equal(params, back_params)


def test_248_position_text_tower_exports_and_matches(tmp_path):
    config = get_model_config("tiny", text_context_length=248)
    params = random_params(config, seed=4)
    hf_convert.export_hf(config, params, tmp_path)
    model = load_exported(tmp_path)
    assert model.config.text_config.max_position_embeddings == 248
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert tokenizer.model_max_length == 248
    tokens = open_clip.tokenize(CAPTIONS, context_length=248).numpy().astype(np.int32)
    assert int((tokens[2] > 0).sum()) > 77
    _, hf_texts = hf_embeddings(model, np.zeros((1, 32, 32, 3), np.float32), tokens)
    np.testing.assert_allclose(np.asarray(embed_texts(config, params, tokens)), hf_texts, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Refusals


def test_unsupported_activation_is_refused_by_field(tmp_path, tiny_export):
    _, _, folder = tiny_export
    meta = json.loads((folder / "config.json").read_text())
    meta["vision_config"]["hidden_act"] = "relu"
    with pytest.raises(ValueError, match=r"vision_config\.hidden_act = 'relu' is not supported"):
        hf_convert.hints_from_hf_config(meta, source="config.json")
    meta["vision_config"]["hidden_act"] = "quick_gelu"
    with pytest.raises(ValueError, match=r"vision_config\.hidden_act 'quick_gelu' differs from text_config\.hidden_act 'gelu'"):
        hf_convert.hints_from_hf_config(meta, source="config.json")


def test_wrong_architecture_is_refused_with_hf_key_and_both_shapes(tiny_export):
    _, _, folder = tiny_export
    with pytest.raises(ValueError, match=r"'vision_model\.embeddings\.patch_embedding\.weight' has shape \(64, 3, 8, 8\), the architecture expects \(768, 3, 32, 32\) \(model 'ViT-B-32'\)"):
        hf_convert.load_hf(folder, model="ViT-B-32")
    state_dict, _ = hf_convert.read_hf_weights(folder)
    state_dict["text_model.encoder.layers.1.self_attn.k_proj.weight"] = np.zeros((64, 32), np.float32)
    with pytest.raises(ValueError, match=r"'text_model\.encoder\.layers\.1\.self_attn\.k_proj\.weight' has shape \(64, 32\), the architecture expects \(64, 64\)"):
        hf_convert.hf_to_params(state_dict, quick_gelu=False, model="tiny")


def test_siglip_bias_cannot_be_exported_to_clip_model(tmp_path):
    config = get_model_config("tiny", init_logit_bias=-10.0)
    with pytest.raises(ValueError, match=r"'logit_bias'"):
        hf_convert.export_hf(config, random_params(config, seed=5), tmp_path)


# ----------------------------------------------------------------------------------------------------
# ViT-B/32 with random weights, both directions


@pytest.mark.slow
def test_b32_import_matches_hf(tmp_path):
    hf_config = {"projection_dim": 512, "text_config": {"projection_dim": 512}, "vision_config": {"projection_dim": 512}}
    model = random_hf_model(hf_config, seed=6)  # transformers' defaults are ViT-B/32, QuickGELU
    model.save_pretrained(tmp_path)
    config, params = hf_convert.load_hf(tmp_path)
    assert config == get_model_config("ViT-B-32-quickgelu")
    assert_parity(config, params, model)


@pytest.mark.slow
def test_b32_export_matches_hf(tmp_path):
    config = get_model_config("ViT-B-32")
    params = random_params(config, seed=7)
    hf_convert.export_hf(config, params, tmp_path)
    assert_parity(config, params, load_exported(tmp_path))
