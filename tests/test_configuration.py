"""`SARViTConfig`: defaults, validation, and the save -> `from_pretrained` round trip."""

import json
import math

import pytest
from tiny import TINY
from transformers import AutoConfig, ViTConfig

import sar_hf
from sar_hf import SARViTConfig, SARViTForImageClassification


def test_defaults_are_the_papers_and_the_rest_is_vit():
    config = SARViTConfig()
    assert config.model_type == "sar-vit"
    assert isinstance(config, ViTConfig)
    assert config.sar_weight == 0.01  # λ of the paper
    assert config.sar_layer == -1  # the last layer
    assert config.sar_no_skip_no_norm is False  # a plain ViT unless asked
    assert config.sar_layer_index == config.num_hidden_layers - 1
    # Every ViT setting keeps ViT's default.
    plain = ViTConfig().to_dict()
    ours = config.to_dict()
    assert {k: v for k, v in ours.items() if not k.startswith("sar_") and k != "model_type"} == {
        k: v for k, v in plain.items() if k != "model_type"
    }


@pytest.mark.parametrize(("layer", "index"), [(0, 0), (1, 1), (-1, 1), (-2, 0)])
def test_sar_layer_index_counts_negative_layers_from_the_end(layer, index):
    assert SARViTConfig(**TINY, sar_layer=layer).sar_layer_index == index


@pytest.mark.parametrize("weight", [-0.01, -1, math.nan, math.inf, -math.inf])
def test_bad_sar_weight_is_a_value_error(weight):
    with pytest.raises(ValueError, match=r"`sar_weight` must be a finite number >= 0"):
        SARViTConfig(**TINY, sar_weight=weight)


@pytest.mark.parametrize("layer", [2, 7, -3])
def test_out_of_range_sar_layer_is_a_value_error(layer):
    with pytest.raises(ValueError, match=r"`sar_layer` must index one of the 2 layers .* got " + str(layer)):
        SARViTConfig(**TINY, sar_layer=layer)


def test_unknown_sar_setting_is_a_value_error_naming_it_and_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown SAR setting\(s\) \['sar_wieght'\].*`sar_weight`"):
        SARViTConfig(**TINY, sar_wieght=0.1)


def test_zero_weight_and_integer_weight_are_accepted():
    assert SARViTConfig(**TINY, sar_weight=0).sar_weight == 0
    assert SARViTConfig(**TINY, sar_weight=1).sar_weight == 1


@pytest.mark.parametrize(
    "settings",
    [{}, {"sar_weight": 0.05, "sar_layer": 0, "sar_no_skip_no_norm": True}, {"sar_weight": 0, "sar_layer": -2}],
    ids=["defaults", "all-set", "zero-weight"],
)
def test_save_from_pretrained_round_trip(tmp_path, settings):
    config = SARViTConfig(**TINY, **settings)
    config.save_pretrained(tmp_path)

    on_disk = json.loads((tmp_path / "config.json").read_text())
    assert on_disk["model_type"] == "sar-vit"
    for key in ("sar_weight", "sar_layer", "sar_no_skip_no_norm"):
        assert on_disk[key] == getattr(config, key)

    assert SARViTConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is SARViTConfig
    # AutoConfig records where it read the file from; everything else is equal.
    assert {k: v for k, v in loaded.to_dict().items() if k != "_name_or_path"} == {
        k: v for k, v in config.to_dict().items() if k != "_name_or_path"
    }


def test_import_registers_the_auto_classes():
    from transformers import AutoModelForImageClassification
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert CONFIG_MAPPING["sar-vit"] is SARViTConfig
    assert type(AutoConfig.for_model("sar-vit", **TINY)) is SARViTConfig
    model = AutoModelForImageClassification.from_config(SARViTConfig(**TINY))
    assert type(model) is sar_hf.SARViTForImageClassification


LOADERS = {"SARViTConfig": SARViTConfig.from_pretrained, "AutoConfig": AutoConfig.from_pretrained}


@pytest.mark.parametrize("load", LOADERS.values(), ids=LOADERS.keys())
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"sar_weight": -1, "sar_layer": 7}, "`sar_weight` must be a finite number >= 0, got -1"),
        ({"sar_weight": math.nan}, "`sar_weight` must be a finite number >= 0, got nan"),
        ({"sar_weight": math.inf}, "`sar_weight` must be a finite number >= 0, got inf"),
        ({"sar_layer": 7}, r"`sar_layer` must index one of the 2 layers .* got 7"),
        ({"sar_layer": -3}, r"`sar_layer` must index one of the 2 layers .* got -3"),
    ],
    ids=["weight-and-layer", "nan-weight", "inf-weight", "layer-7", "layer-minus-3"],
)
def test_from_pretrained_overrides_are_value_errors_like_the_models(tmp_path, load, override, message):
    """Overrides are set after `__post_init__`; the config still refuses them, with the model's error."""
    SARViTConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        load(tmp_path, **override)
    with pytest.raises(ValueError, match=message):
        SARViTForImageClassification.from_pretrained(tmp_path, **override)


@pytest.mark.parametrize("load", LOADERS.values(), ids=LOADERS.keys())
def test_from_pretrained_overrides_are_checked_together(tmp_path, load):
    """Valid overrides pass, and a layer index is checked against an overridden number of layers."""
    SARViTConfig(**TINY).save_pretrained(tmp_path)
    assert load(tmp_path, sar_weight=0.2).sar_weight == 0.2
    config = load(tmp_path, num_hidden_layers=8, sar_layer=7)
    assert (config.num_hidden_layers, config.sar_layer_index) == (8, 7)
    config, unused = load(tmp_path, sar_layer=1, return_unused_kwargs=True, not_a_setting=1)
    assert config.sar_layer == 1 and unused == {"not_a_setting": 1}


def test_plain_vit_config_loads_as_sar_config_with_the_settings(tmp_path):
    ViTConfig(**TINY).save_pretrained(tmp_path)
    config = SARViTConfig.from_pretrained(tmp_path, sar_weight=0.05, sar_layer=0)
    assert (config.sar_weight, config.sar_layer, config.sar_no_skip_no_norm) == (0.05, 0, False)
    assert config.hidden_size == TINY["hidden_size"] and config.model_type == "sar-vit"
    # Saved again, it is a SAR checkpoint.
    config.save_pretrained(tmp_path / "sar")
    assert json.loads((tmp_path / "sar" / "config.json").read_text())["model_type"] == "sar-vit"


def test_a_plain_vit_configs_settings_make_a_sar_config():
    """`SARViTConfig(**vit_config.to_dict())` (and `from_dict`): the plain config's `model_type` gives way to
    the class's, so the config saves, and loads back, as a SAR one."""
    plain = ViTConfig(**TINY).to_dict()
    assert plain["model_type"] == "vit"
    for config in (SARViTConfig(**plain, sar_layer=0), SARViTConfig.from_dict(plain, sar_layer=0)):
        assert config.model_type == "sar-vit" and config.to_dict()["model_type"] == "sar-vit"
        assert (config.hidden_size, config.sar_layer) == (TINY["hidden_size"], 0)
