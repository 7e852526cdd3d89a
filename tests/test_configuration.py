"""The typed sub-configs: one default per setting, presets as small overrides, and old dict-format configs."""

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch

from dualtoken_hf import (
    DualTokenConfig,
    DualTokenDepthHeadConfig,
    DualTokenForConditionalGeneration,
    DualTokenPixelDecoder,
    DualTokenPixelDecoderConfig,
    DualTokenQuantizerConfig,
    DualTokenVisionConfig,
    DualTokenVisionModel,
)


OLD_FORMAT = Path(__file__).parent / "data" / "old_format_configs"
# Written by `save_pretrained` next to the settings; not part of what a config describes.
SAVE_METADATA = ("architectures", "auto_map", "dtype", "transformers_version")


def settings(config) -> dict:
    return {key: value for key, value in config.to_dict().items() if key not in SAVE_METADATA}


def test_sub_configs_are_typed_and_take_their_defaults_from_their_class():
    config = DualTokenConfig()
    vision = config.vision_config
    assert isinstance(vision.pixel_quantizer_config, DualTokenQuantizerConfig)
    assert isinstance(vision.semantic_quantizer_config, DualTokenQuantizerConfig)
    assert isinstance(vision.decoder_config, DualTokenPixelDecoderConfig)
    assert isinstance(config.depth_head_config, DualTokenDepthHeadConfig)
    assert vision.pixel_quantizer_config.to_dict() == DualTokenQuantizerConfig().to_dict()
    assert (vision.pixel_quantizer_config.codebook_size, vision.pixel_quantizer_config.ema_sum_clamp) == (32768, 1000.0)
    assert config.depth_head_config.num_layers == 3


def test_the_standalone_decoder_defaults_are_the_decoder_config_defaults():
    parameters = inspect.signature(DualTokenPixelDecoder.__init__).parameters
    defaults = DualTokenPixelDecoderConfig()
    for name in ("decoder_in_channels", "block_out_channels", "layers_per_block", "norm_num_groups", "out_channels"):
        assert parameters[name].default == getattr(defaults, name), name


def test_preset_overrides_merge_into_the_preset_sub_configs_key_by_key():
    config = DualTokenVisionConfig.from_preset("tiny", semantic_quantizer_config={"depth": 2})
    semantic = config.semantic_quantizer_config
    assert (semantic.depth, semantic.codebook_size, semantic.ema_update_per_depth) == (2, 256, False)
    assert config.pixel_quantizer_config.depth == 4
    assert DualTokenConfig.from_preset("tiny", depth_head_config={"num_layers": 1}).depth_head_config.hidden_size == 64


def test_quantizer_settings_by_branch():
    config = DualTokenVisionConfig.from_preset("v2")
    assert config.quantizer_config("pixel") is config.pixel_quantizer_config
    assert config.quantizer_config("semantic").ema_update_per_depth is False
    with pytest.raises(ValueError, match=r"branch must be one of \('pixel', 'semantic'\), got 'texture'"):
        config.quantizer_config("texture")


@pytest.mark.parametrize(
    "config_class, values, message",
    [
        (DualTokenQuantizerConfig, {"codebook_size": 0}, r"DualTokenQuantizerConfig.codebook_size must be at least 1"),
        (DualTokenQuantizerConfig, {"ema_decay": 1.0}, r"ema_decay must be in \[0, 1\), got 1.0"),
        (DualTokenPixelDecoderConfig, {"block_out_channels": ()}, r"block_out_channels needs at least one"),
        (DualTokenDepthHeadConfig, {"hidden_size": 10, "num_attention_heads": 4}, r"hidden_size \(10\) must be a"),
        (DualTokenVisionConfig, {"pixel_quantizer_config": {"depth": 0}}, r"Config.depth must be at least 1, got 0"),
    ],
)
def test_impossible_sub_configs_are_rejected_with_a_value_error(config_class, values, message):
    with pytest.raises(ValueError, match=message):
        config_class(**values)


def test_saved_configs_nest_the_sub_configs_and_load_back_equal(tmp_path):
    config = DualTokenConfig.from_preset("tiny")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["depth_head_config"]["model_type"] == "dualtoken_depth_head"
    assert saved["vision_config"]["semantic_quantizer_config"]["ema_update_per_depth"] is False
    assert settings(DualTokenConfig.from_pretrained(tmp_path)) == settings(config)


# --- configs written by the dict-era code (see data/old_format_configs/README.md) --------------------------------


@pytest.mark.parametrize(
    "folder, config_class, expected",
    [
        ("vision_tiny", DualTokenVisionConfig, lambda: DualTokenVisionConfig.from_preset("tiny")),
        (
            "vision_v2",
            DualTokenVisionConfig,
            lambda: DualTokenVisionConfig.from_preset("v2", semantic_quantizer_config={"official_ema_quirk": True}),
        ),
        ("unified_tiny", DualTokenConfig, lambda: DualTokenConfig.from_preset("tiny")),
    ],
)
def test_old_dict_format_configs_load_to_the_same_settings(folder, config_class, expected):
    config = config_class.from_pretrained(OLD_FORMAT / folder)
    assert settings(config) == settings(expected())
    vision = getattr(config, "vision_config", config)
    assert isinstance(vision.semantic_quantizer_config, DualTokenQuantizerConfig)
    assert isinstance(vision.decoder_config, DualTokenPixelDecoderConfig)


def test_old_v2_config_keeps_its_explicit_none_clamp_and_quirk():
    config = DualTokenVisionConfig.from_pretrained(OLD_FORMAT / "vision_v2")
    with torch.device("meta"):
        model = DualTokenVisionModel(config)
    assert model.pixel_quantizer.ema_sum_clamp is None and model.semantic_quantizer.ema_sum_clamp is None
    assert model.semantic_quantizer.official_ema_quirk and not model.semantic_quantizer.ema_update_per_depth


def test_old_unified_config_builds_the_old_state_dict_layout():
    config = DualTokenConfig.from_pretrained(OLD_FORMAT / "unified_tiny")
    with torch.device("meta"):
        model = DualTokenForConditionalGeneration(config)
    expected = json.loads((OLD_FORMAT / "unified_tiny" / "state_dict_shapes.json").read_text())
    assert {key: list(value.shape) for key, value in model.state_dict().items()} == expected


@pytest.mark.parametrize(
    "folder, model_class, config",
    [
        ("vision_tiny", DualTokenVisionModel, lambda: DualTokenVisionConfig.from_preset("tiny")),
        ("unified_tiny", DualTokenForConditionalGeneration, lambda: DualTokenConfig.from_preset("tiny")),
    ],
)
def test_a_folder_with_an_old_format_config_loads_to_an_equal_model(tmp_path, folder, model_class, config):
    torch.manual_seed(0)
    model = model_class(config()).eval()
    model.save_pretrained(tmp_path)
    shutil.copy(OLD_FORMAT / folder / "config.json", tmp_path / "config.json")

    loaded = model_class.from_pretrained(tmp_path).eval()

    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    tokenizer, loaded_tokenizer = (getattr(m, "vision_tokenizer", m) for m in (model, loaded))
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        encoded, loaded_encoded = tokenizer.encode(images), loaded_tokenizer.encode(images)
        assert torch.equal(loaded_encoded.pixel_codes, encoded.pixel_codes)
        assert torch.equal(loaded_tokenizer.decode(encoded.pixel_codes), tokenizer.decode(encoded.pixel_codes))
