"""Every shipped experiment config validates, and broken ones are refused naming the field."""
from __future__ import annotations

import importlib

import pytest

from geoalign_jax.train import experiment
from geoalign_jax.losses import objective

# Each shipped config: (model name, the loss terms it turns on). A method config that loses or gains a term
# (e.g. an override that no longer reaches the loss section) fails here.
SHIPPED = {
    ("clip_baseline", None): ("ViT-B-32-quickgelu", {"scene"}),
    ("farslip", "s1"): ("ViT-B-16-quickgelu", {"scene", "patch_distill"}),
    ("farslip", "s2"): ("ViT-B-16-quickgelu", {"scene", "region_cls"}),
    ("dgtrs", None): ("ViT-B-16-quickgelu", {"scene", "long_text"}),
    ("geoalignclip", None): ("ViT-B-16-quickgelu", {"scene", "hard_negative", "region_text",
                                                    "global_region_consistency", "short_long_consistency"}),
    ("demo", None): ("tiny", set(objective.TERM_NAMES)),
}


@pytest.mark.parametrize("name,arg", list(SHIPPED))
def test_shipped_configs_validate_and_turn_on_their_method_terms(name, arg):
    config = importlib.import_module(f"configs.{name}").get_config(arg)
    loss = experiment.check_config(config)
    model_name, terms = SHIPPED[(name, arg)]
    assert config.model.name == model_name
    assert set(objective.enabled_terms(loss)) == terms


def test_method_configs_turn_on_their_terms():
    farslip_s1 = experiment.check_config(importlib.import_module("configs.farslip").get_config("s1"))
    assert farslip_s1["weights"]["patch_distill"] == 0.1 and farslip_s1["dense_features"] == "segearth"
    farslip_s2 = experiment.check_config(importlib.import_module("configs.farslip").get_config("s2"))
    assert farslip_s2["weights"]["region_cls"] == 1.0
    with pytest.raises(ValueError, match="stage must be 's1' or 's2'"):
        importlib.import_module("configs.farslip").get_config("s3")


def test_bad_configs_are_refused_with_the_field_named():
    config = experiment.get_config()
    config.loss.weights.region_text = 1.0  # needs regions the data config does not produce
    with pytest.raises(ValueError, match=r"loss.weights.region_text > 0 needs batch\['region_boxes'\].*data.max_regions > 0"):
        experiment.check_config(config)

    config = experiment.get_config()
    config.data.image_size = 200  # not a multiple of 16
    with pytest.raises(ValueError, match="data.image_size 200 is not a multiple of the model's patch size 16"):
        experiment.check_config(config)

    config = experiment.get_config()
    config.data.max_regions = 4
    config.data.region_crop_size = 100  # region crops go through the image tower too
    with pytest.raises(ValueError, match="data.region_crop_size 100 is not a multiple of the model's patch size 16"):
        experiment.check_config(config)

    config = experiment.get_config()  # long text of 248 tokens with a 77-position text tower
    config.data.long_context_length = 248
    config.loss.weights.long_text = 1.0
    with pytest.raises(ValueError, match="data.long_context_length 248 exceeds the text tower's context length 77"):
        experiment.check_config(config)

    config = experiment.get_config()
    with config.unlocked():
        config.data.imgae_size = 224
    with pytest.raises(ValueError, match="unknown config field data.imgae_size"):
        experiment.check_config(config)

    config = experiment.get_config()
    config.model.overrides.vision_widht = 10
    with pytest.raises(ValueError, match="widht"):
        experiment.check_config(config)

    config = experiment.get_config()
    config.loss.scene_kind = "siglip"
    with pytest.raises(ValueError, match="init_logit_bias"):
        experiment.check_config(config)


def test_every_model_field_has_a_typed_unset_override():
    """Every CLIPConfig field can be set as --config.model.overrides.FIELD, whether or not the recipe set it
    (the command line itself: tests/test_workdir_faults.py)."""
    from geoalign_jax.models import clip

    config = experiment.get_config()
    assert set(config.model.overrides) == set(clip.override_types()) >= {
        "embed_dim", "init_logit_bias", "quick_gelu", "vision_width", "vision_patch_size", "text_layers"}
    assert experiment.model_config(config) == clip.get_model_config(config.model.name)  # unset: the named model's
    config.model.overrides.vision_width, config.model.overrides.init_logit_bias = 128, -10.0
    model = experiment.model_config(config)
    assert (model.vision.width, model.init_logit_bias, model.text.width) == (128, -10.0, 512)
    with pytest.raises(TypeError):
        config.model.overrides.vision_layers = "six"
