"""open_clip <-> geoalign-jax conversion, checked against the real open_clip package.

Parity: the same random weights give the same embeddings (fp32, atol 1e-4) in open_clip and in our
towers, whichever side the weights were made on. Round trips are bit-exact. Every published variant of a
state dict imports to the same parameters, and anything that does not fit is refused by name.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import torch
import open_clip

from param_fixtures import (  # noqa: E402
    ATOL,
    CAPTIONS,
    assert_trees_equal,
    embed_images,
    embed_texts,
    random_params,
)

from geoalign_jax.convert import infer_config, weight_files  # noqa: E402
from geoalign_jax.convert import open_clip as oc_convert  # noqa: E402
from geoalign_jax.convert.__main__ import main as convert_main  # noqa: E402
from geoalign_jax.batch_contract import OPENAI_MEAN, OPENAI_STD  # noqa: E402
from geoalign_jax.models.clip import (  # noqa: E402
    CLIPConfig,
    get_model_config,
)
from geoalign_jax.models.posemb import stretch_text_posemb  # noqa: E402
from geoalign_jax.params_checkpoint import load_params, save_params  # noqa: E402

# open_clip model_cfg of our "tiny" config, written out by hand (not by the exporter under test).
TINY_OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def randomize_torch_(model, seed: int) -> None:
    """Random weights in a torch CLIP (open_clip initialises biases to zero and LayerNorms to one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name == "logit_scale":
                continue
            noise = torch.randn(tensor.shape, generator=generator) * 0.02
            is_norm_scale = name.endswith(".weight") and tensor.ndim == 1
            tensor.copy_(noise + 1.0 if is_norm_scale else noise)


def tiny_torch_model(quick_gelu: bool, seed: int, **text_overrides):
    cfg = json.loads(json.dumps(TINY_OPEN_CLIP_CFG))
    cfg["text_cfg"].update(text_overrides)
    model = open_clip.CLIP(**cfg, quick_gelu=quick_gelu).eval()
    randomize_torch_(model, seed)
    return model


def state_dict_numpy(model) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in model.state_dict().items()}


def images_for(config: CLIPConfig, count: int = 2, seed: int = 0) -> np.ndarray:
    size = config.vision.image_size
    return np.random.default_rng(seed).standard_normal((count, size, size, 3), dtype=np.float32)


def assert_parity(config: CLIPConfig, params, torch_model, *, context_length: int = 77) -> None:
    images = images_for(config)
    tokens = open_clip.tokenize(CAPTIONS, context_length=context_length)
    with torch.no_grad():
        torch_images = torch_model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
        torch_texts = torch_model.encode_text(tokens).numpy()
    ours_images = np.asarray(embed_images(config, params, images))
    ours_texts = np.asarray(embed_texts(config, params, tokens.numpy().astype(np.int32)))
    np.testing.assert_allclose(ours_images, torch_images, atol=ATOL, rtol=0)
    np.testing.assert_allclose(ours_texts, torch_texts, atol=ATOL, rtol=0)
    # The captions must give distinct embeddings, or a pooling bug could pass unnoticed.
    assert np.abs(ours_texts[0] - ours_texts[1]).max() > 100 * ATOL


# ----------------------------------------------------------------------------------------------------
# Import: open_clip -> ours


def test_import_from_pt_matches_open_clip_embeddings(tmp_path):
    model = tiny_torch_model(quick_gelu=False, seed=1)
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    config, params = oc_convert.load_open_clip(path, quick_gelu=False, model="tiny")
    assert config == get_model_config("tiny")
    assert_parity(config, params, model)


@pytest.mark.parametrize("variant", ["safetensors", "wrapped_module_prefix", "openai_extras", "fp16", "bf16_safetensors"])
def test_published_state_dict_variants_import_to_the_same_params(tmp_path, variant):
    model = tiny_torch_model(quick_gelu=True, seed=2)
    reference_sd = {key: value.clone() for key, value in model.state_dict().items()}
    if variant == "fp16":
        reference_sd = {key: value.half() for key, value in reference_sd.items()}
    if variant == "bf16_safetensors":
        reference_sd = {key: value.bfloat16() for key, value in reference_sd.items()}
    expected_sd = {key: value.float().numpy() for key, value in reference_sd.items()}
    _, expected = oc_convert.open_clip_to_params(expected_sd, quick_gelu=True, model="tiny")

    if variant in ("safetensors", "bf16_safetensors"):
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file({key: value.contiguous() for key, value in reference_sd.items()}, str(path))
    else:
        path = tmp_path / "weights.bin"
        payload = dict(reference_sd)
        if variant == "wrapped_module_prefix":
            payload = {"epoch": 3, "state_dict": {f"module.{key}": value for key, value in payload.items()}}
        if variant == "openai_extras":
            payload.update(input_resolution=torch.tensor(32), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
        torch.save(payload, path)
    config, params = oc_convert.load_open_clip(path, quick_gelu=True, model="tiny")
    assert config == get_model_config("tiny-quickgelu")
    assert_trees_equal(expected, params)


# ----------------------------------------------------------------------------------------------------
# Export: ours -> open_clip


def test_export_loads_strictly_in_open_clip_and_matches(tmp_path):
    config = get_model_config("tiny-quickgelu")
    params = random_params(config, seed=3)
    oc_convert.export_open_clip(config, params, tmp_path / "oc")
    meta = json.loads((tmp_path / "oc" / "open_clip_config.json").read_text())
    assert meta["model_cfg"]["quick_gelu"] is True
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    model.eval()
    assert isinstance(model.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    normalize = preprocess.transforms[-1]
    assert tuple(normalize.mean) == OPENAI_MEAN and tuple(normalize.std) == OPENAI_STD
    assert_parity(config, params, model)


def test_round_trip_through_cli_is_bit_exact(tmp_path, capsys):
    config = get_model_config("tiny")
    params = random_params(config, seed=4)
    save_params(tmp_path / "ckpt", config, params)
    assert convert_main(["export", "--params", str(tmp_path / "ckpt"), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    # The folder's config carries the activation; no --quick-gelu needed.
    assert convert_main(["import", "--src", str(tmp_path / "oc"), "--format", "open_clip", "--out", str(tmp_path / "back")]) == 0
    output = capsys.readouterr().out
    assert "3,384,897 parameters" in output and "wrote parameters checkpoint" in output
    back_config, back_params = load_params(tmp_path / "back")
    assert back_config == config
    assert_trees_equal(params, back_params)


# ----------------------------------------------------------------------------------------------------
# Long-CLIP: 248 text positions


def test_long_clip_state_dict_merges_position_embeddings_and_exports_at_248(tmp_path):
    model = tiny_torch_model(quick_gelu=True, seed=5, context_length=248)
    sd = state_dict_numpy(model)
    rng = np.random.default_rng(5)
    posemb = rng.standard_normal((248, 64), dtype=np.float32)
    residual = rng.standard_normal((248, 64), dtype=np.float32)
    merged = np.concatenate([posemb[:20], residual[20:]])
    mask1 = (np.arange(248) < 20).astype(np.float32)[:, None]
    long_sd = {**sd, "positional_embedding": posemb, "positional_embedding_res": residual, "mask1": mask1, "mask2": 1 - mask1}
    tiny_heads = oc_convert.SourceHints(vision_heads=2, text_heads=2)  # width 64 is not 64 per head
    config, params = oc_convert.open_clip_to_params(long_sd, quick_gelu=True, hints=tiny_heads)
    assert config.text.context_length == 248
    assert np.array_equal(params["text"]["positional_embedding"], merged)
    no_masks = {key: value for key, value in long_sd.items() if not key.startswith("mask")}
    _, params_no_masks = oc_convert.open_clip_to_params(no_masks, quick_gelu=True, hints=tiny_heads)
    assert np.array_equal(params_no_masks["text"]["positional_embedding"], merged)

    # The merged model exported at 248 positions is what open_clip computes for those weights.
    oc_convert.export_open_clip(config, params, tmp_path / "long")
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'long'}")
    exported.eval()
    assert np.array_equal(exported.positional_embedding.detach().numpy(), merged)  # no silent resize
    tokens = open_clip.tokenize(CAPTIONS, context_length=248)
    assert int((tokens[2] > 0).sum()) > 77  # the long caption really uses more than 77 positions
    with torch.no_grad():
        expected = exported.encode_text(tokens).numpy()
    np.testing.assert_allclose(np.asarray(embed_texts(config, params, tokens.numpy().astype(np.int32))), expected, atol=ATOL, rtol=0)


def test_stretch_text_on_import_gives_a_248_position_model_open_clip_loads(tmp_path):
    model = tiny_torch_model(quick_gelu=True, seed=6)
    path = tmp_path / "tiny.safetensors"
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(path))
    assert convert_main([
        "import", "--src", str(path), "--format", "open_clip", "--out", str(tmp_path / "ckpt"),
        "--quick-gelu", "--model", "tiny", "--stretch-text",
    ]) == 0
    config, params = load_params(tmp_path / "ckpt")
    assert config.text.context_length == 248
    original = model.positional_embedding.detach().numpy()
    assert np.array_equal(params["text"]["positional_embedding"], stretch_text_posemb(original))
    assert convert_main(["export", "--params", str(tmp_path / "ckpt"), "--format", "open_clip", "--out", str(tmp_path / "oc")]) == 0
    exported, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    assert exported.context_length == 248
    assert np.array_equal(exported.positional_embedding.detach().numpy(), params["text"]["positional_embedding"])


def test_stretching_an_already_stretched_text_context_is_refused():
    long_config = get_model_config("tiny", text_context_length=248)
    long_params = random_params(long_config, seed=12)
    # A second stretch would give 4 * 248 - 3 * 20 = 932 positions; it is refused, naming the length.
    with pytest.raises(ValueError, match=r"it has 248 positions .*77-position models only"):
        infer_config.stretch_text_context(long_config, long_params)
    config = get_model_config("tiny")
    stretched_config, stretched = infer_config.stretch_text_context(config, random_params(config, seed=12))
    assert stretched_config.text.context_length == 248 and stretched["text"]["positional_embedding"].shape == (248, 64)


def test_cli_refuses_stretch_text_on_a_long_clip_checkpoint_with_exit_status_2(tmp_path, capsys):
    config = get_model_config("tiny-quickgelu", text_context_length=248)
    oc_convert.export_open_clip(config, random_params(config, seed=13), tmp_path / "long")
    status = convert_main([
        "import", "--src", str(tmp_path / "long"), "--format", "open_clip", "--out", str(tmp_path / "ckpt"), "--stretch-text",
    ])
    assert status == 2
    assert "cannot stretch the text context: it has 248 positions" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()


# ----------------------------------------------------------------------------------------------------
# Refusals: each names what is wrong


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, np.ndarray]:
    return state_dict_numpy(tiny_torch_model(quick_gelu=True, seed=7))


def test_wrong_named_architecture_is_refused_with_key_and_both_shapes(tiny_sd):
    with pytest.raises(ValueError, match=r"'visual\.conv1\.weight' has shape \(64, 3, 8, 8\), the architecture expects \(768, 3, 32, 32\) \(model 'ViT-B-32'\)"):
        oc_convert.open_clip_to_params(tiny_sd, quick_gelu=True, model="ViT-B-32")


def test_one_corrupted_shape_is_refused_with_key_and_both_shapes(tiny_sd):
    corrupted = dict(tiny_sd)
    corrupted["transformer.resblocks.1.mlp.c_proj.weight"] = np.zeros((64, 128), np.float32)
    with pytest.raises(ValueError, match=r"'transformer\.resblocks\.1\.mlp\.c_proj\.weight' has shape \(64, 128\), the architecture expects \(64, 256\)"):
        oc_convert.open_clip_to_params(corrupted, quick_gelu=True, model="tiny")


def test_missing_and_unexpected_keys_are_refused_by_name(tiny_sd):
    missing = {key: value for key, value in tiny_sd.items() if key != "visual.transformer.resblocks.0.ln_2.bias"}
    with pytest.raises(ValueError, match=r"'visual\.transformer\.resblocks\.0\.ln_2\.bias' is missing \(the architecture expects shape \(64,\)\)"):
        oc_convert.open_clip_to_params(missing, quick_gelu=True, model="tiny")
    extra = {**tiny_sd, "visual.transformer.resblocks.0.ls_1.gamma": np.ones(64, np.float32)}
    with pytest.raises(ValueError, match=r"unexpected key 'visual\.transformer\.resblocks\.0\.ls_1\.gamma' with shape \(64,\)"):
        oc_convert.open_clip_to_params(extra, quick_gelu=True, model="tiny")


def test_inconsistent_openai_entry_is_refused(tiny_sd):
    with pytest.raises(ValueError, match=r"'input_resolution' says 224, the weights' shapes say 32"):
        oc_convert.open_clip_to_params({**tiny_sd, "input_resolution": np.array(224)}, quick_gelu=True, model="tiny")


def test_activation_must_be_chosen_for_a_bare_state_dict(tiny_sd):
    with pytest.raises(ValueError, match=r"--quick-gelu.*--no-quick-gelu"):
        oc_convert.open_clip_to_params(tiny_sd, model="tiny")


def test_hf_state_dict_given_as_open_clip_is_refused_with_a_hint():
    with pytest.raises(ValueError, match=r"'visual\.conv1\.weight' is missing.*use --format hf"):
        oc_convert.open_clip_to_params(
            {"vision_model.embeddings.patch_embedding.weight": np.zeros((64, 3, 8, 8), np.float32)}, quick_gelu=True
        )


class _NotATensor:
    pass


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_pickled_objects_and_torchscript_archives_are_not_loaded(tmp_path):
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {"logit_scale": torch.zeros(())}, "args": _NotATensor()}, pickled)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        weight_files.read_state_dict(pickled)
    scripted = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    with pytest.raises(ValueError, match=r"TorchScript archive"):
        weight_files.read_state_dict(scripted)


def test_folder_with_unsupported_open_clip_option_is_refused(tmp_path):
    config = get_model_config("tiny")
    oc_convert.export_open_clip(config, random_params(config, seed=8), tmp_path)
    meta = json.loads((tmp_path / "open_clip_config.json").read_text())
    meta["model_cfg"]["vision_cfg"]["ls_init_value"] = 1e-5
    (tmp_path / "open_clip_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"vision_cfg\.ls_init_value = 1e-05 is not supported"):
        oc_convert.load_open_clip(tmp_path)


def test_checkpoint_of_another_architecture_is_refused_on_load(tmp_path):
    config = get_model_config("tiny")
    save_params(tmp_path / "ckpt", config, random_params(config, seed=9))
    other = dataclasses.replace(config, vision=dataclasses.replace(config.vision, patch_size=16))
    with pytest.raises(ValueError, match=r"'visual/conv1/kernel' has shape \(8, 8, 3, 64\), the model config expects \(16, 16, 3, 64\)"):
        load_params(tmp_path / "ckpt", expected_config=other)


def test_cli_reports_bad_input_with_exit_status_2(tmp_path, tiny_sd, capsys):
    path = tmp_path / "tiny.safetensors"
    from safetensors.numpy import save_file

    save_file(tiny_sd, str(path))
    status = convert_main(["import", "--src", str(path), "--format", "open_clip", "--out", str(tmp_path / "x"), "--no-quick-gelu", "--model", "ViT-B-16"])
    assert status == 2
    assert "'visual.conv1.weight' has shape (64, 3, 8, 8), the architecture expects (768, 3, 16, 16)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------------------------------
# ViT-B/32 with random weights, both directions


@pytest.fixture(scope="module")
def b32_torch():
    model = open_clip.create_model("ViT-B-32-quickgelu").eval()  # random init, nothing downloaded
    randomize_torch_(model, seed=10)
    return model


@pytest.mark.slow
def test_b32_import_infers_the_architecture_and_matches(b32_torch):
    config, params = oc_convert.open_clip_to_params(state_dict_numpy(b32_torch), quick_gelu=True)
    assert config == get_model_config("ViT-B-32-quickgelu")  # heads 12 / 8 from width // 64
    assert_parity(config, params, b32_torch)


@pytest.mark.slow
def test_b32_export_matches_open_clip(tmp_path):
    config = get_model_config("ViT-B-32-quickgelu")
    params = random_params(config, seed=11)
    oc_convert.export_open_clip(config, params, tmp_path)
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    assert_parity(config, params, model.eval())
    _, back = oc_convert.load_open_clip(tmp_path)
    assert_trees_equal(params, back)
