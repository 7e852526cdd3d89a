import ast
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from skimage import data as skimage_data
from transformers.dynamic_module_utils import get_class_from_dynamic_module

import dualtoken_hf.configuration_dualtoken as configuration_module
import dualtoken_hf.image_processing_dualtoken as image_processing_module
from dualtoken_hf.configuration_dualtoken import DualTokenConfig, DualTokenVisionConfig
from dualtoken_hf.image_processing_dualtoken import DualTokenImageProcessor


TINY = 64
ONE_GREY_LEVEL = 1 / 127.5  # one 8-bit step after mapping [0, 255] to [-1, 1]
# PIL's 8-bit resize rounds after each of its two passes; float/16-bit inputs are resized without rounding.
PIL_ROUNDING = 1.5 * ONE_GREY_LEVEL


@pytest.fixture
def processor():
    return DualTokenImageProcessor.from_preset("tiny")


@pytest.fixture
def rgb_array():
    """Non-square uint8 HWC image (50 x 70), neither side equal to the tiny crop."""
    return np.random.default_rng(0).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)


@pytest.fixture
def target_size_image():
    """uint8 HWC image already at the tiny crop size."""
    return np.random.default_rng(5).integers(0, 256, size=(TINY, TINY, 3), dtype=np.uint8)


def _pixels(processor, images, **kwargs):
    return processor(images, return_tensors="np", **kwargs)["pixel_values"]


def _reference_pil_pipeline(image, image_size):
    """Hand computation of the SigLIP recipe: shortest side -> image_size (bicubic), center crop, (x/255 - .5)/.5."""
    width, height = image.size
    scale = image_size / min(width, height)
    new_width = image_size if width <= height else int(width * scale)
    new_height = image_size if height <= width else int(height * scale)
    resized = image.resize((new_width, new_height), PIL.Image.BICUBIC)
    left, top = (new_width - image_size) // 2, (new_height - image_size) // 2
    cropped = resized.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(cropped, dtype=np.float64).transpose(2, 0, 1) / 255.0
    return ((array - 0.5) / 0.5).astype(np.float32)


# --- output format and value mapping -------------------------------------------------------------------------


def test_default_processor_outputs_float32_384_square_batch():
    image = PIL.Image.new("RGB", (500, 300), (10, 20, 30))
    pixel_values = DualTokenImageProcessor()(image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 384, 384)
    assert pixel_values.dtype == torch.float32


def test_return_tensors_none_gives_list_of_channels_first_float32_arrays(processor, rgb_array):
    pixel_values = processor([rgb_array, rgb_array])["pixel_values"]
    assert isinstance(pixel_values, list) and len(pixel_values) == 2
    assert pixel_values[0].shape == (3, TINY, TINY) and pixel_values[0].dtype == np.float32


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (np.full((40, 90, 3), 255, dtype=np.uint8), 1.0),
        (np.full((40, 90, 3), 0, dtype=np.uint8), -1.0),
        (np.full((40, 90, 3), 0.5, dtype=np.float32), 0.0),  # 127.5 on the 0..255 scale
    ],
)
def test_constant_image_maps_to_expected_value(processor, image, expected):
    pixel_values = _pixels(processor, image)
    assert pixel_values.shape == (1, 3, TINY, TINY)
    np.testing.assert_allclose(pixel_values, expected, atol=1e-6)


def test_channels_are_normalized_independently(processor):
    image = PIL.Image.new("RGB", (80, 64), (255, 0, 51))
    pixel_values = _pixels(processor, image)[0]
    np.testing.assert_allclose(pixel_values[:, 0, 0], [1.0, -1.0, 51 / 127.5 - 1.0], atol=1e-6)


# --- resize + center crop against a hand computation ----------------------------------------------------------


def test_landscape_photo_matches_hand_computed_shortest_side_resize_and_center_crop():
    photo = PIL.Image.fromarray(skimage_data.chelsea())  # 451 x 300
    pixel_values = _pixels(DualTokenImageProcessor.from_preset("paper"), photo)[0]
    np.testing.assert_allclose(pixel_values, _reference_pil_pipeline(photo, 384), atol=1e-6)


def test_portrait_photo_matches_hand_computed_shortest_side_resize_and_center_crop(processor):
    photo = PIL.Image.fromarray(skimage_data.astronaut()[:, :400])  # 400 x 512
    pixel_values = _pixels(processor, photo)[0]
    np.testing.assert_allclose(pixel_values, _reference_pil_pipeline(photo, TINY), atol=1e-6)


def test_image_already_at_target_size_is_not_resampled(processor, target_size_image):
    pixel_values = _pixels(processor, target_size_image)[0]
    np.testing.assert_allclose(pixel_values, target_size_image.transpose(2, 0, 1) / 127.5 - 1.0, atol=1e-6)


# --- PIL modes --------------------------------------------------------------------------------------------------


def _pil_in_mode(mode):
    rgb = PIL.Image.fromarray(skimage_data.chelsea()[:60, :80])
    if mode == "P+transparency":
        image = rgb.convert("P")
        image.info["transparency"] = 0
        return image
    if mode == "I;16":
        return PIL.Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257))
    if mode == "I":
        return PIL.Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.int32) * 257)
    if mode == "F":
        return PIL.Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.float32) / 255.0)
    if mode == "La":
        return rgb.convert("LA").convert("La")
    return rgb.convert(mode)


ALL_PIL_MODES = [
    "1", "L", "LA", "La", "P", "P+transparency", "PA", "RGB", "RGBA", "RGBa", "CMYK", "YCbCr", "I;16", "I", "F"
]


@pytest.mark.parametrize("mode", ALL_PIL_MODES)
def test_every_pil_mode_converts_to_three_finite_channels_in_range(processor, mode):
    image = _pil_in_mode(mode)
    assert image.mode == mode.split("+")[0]
    pixel_values = _pixels(processor, image)
    assert pixel_values.shape == (1, 3, TINY, TINY)
    assert np.isfinite(pixel_values).all()
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_grayscale_matches_its_8_bit_version(processor, mode):
    expected = _pixels(processor, _pil_in_mode("L"))
    np.testing.assert_allclose(_pixels(processor, _pil_in_mode(mode)), expected, atol=PIL_ROUNDING)


def test_grayscale_pil_image_gives_three_equal_channels(processor):
    pixel_values = _pixels(processor, _pil_in_mode("L"))[0]
    np.testing.assert_array_equal(pixel_values[0], pixel_values[1])
    np.testing.assert_array_equal(pixel_values[0], pixel_values[2])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_fully_transparent_pixels_are_composited_on_white(processor, mode):
    image = PIL.Image.new("RGBA", (70, 64), (0, 0, 0, 0)).convert(mode)
    np.testing.assert_allclose(_pixels(processor, image), 1.0, atol=1e-6)


def test_palette_transparency_key_is_composited_on_white(processor):
    image = PIL.Image.new("P", (70, 64), 0)
    image.putpalette([0, 0, 0] * 256)
    image.info["transparency"] = 0
    np.testing.assert_allclose(_pixels(processor, image), 1.0, atol=1e-6)


def test_half_transparent_black_is_mid_grey(processor):
    image = PIL.Image.new("RGBA", (64, 64), (0, 0, 0, 128))
    np.testing.assert_allclose(_pixels(processor, image), 127 / 127.5 - 1.0, atol=ONE_GREY_LEVEL)


# --- numpy / torch inputs equal the PIL input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "to_input",
    [
        pytest.param(lambda a: a, id="numpy-hwc-uint8"),
        pytest.param(lambda a: a.transpose(2, 0, 1).copy(), id="numpy-chw-uint8"),
        pytest.param(lambda a: torch.from_numpy(a.transpose(2, 0, 1).copy()), id="torch-chw-uint8"),
        pytest.param(lambda a: torch.from_numpy(a.copy()), id="torch-hwc-uint8"),
        pytest.param(lambda a: a.astype(np.int64), id="numpy-hwc-int64"),
    ],
)
def test_uint8_array_and_tensor_inputs_equal_pil_input_exactly(processor, rgb_array, to_input):
    expected = _pixels(processor, PIL.Image.fromarray(rgb_array))
    np.testing.assert_array_equal(_pixels(processor, to_input(rgb_array)), expected)


@pytest.mark.parametrize(
    "to_input",
    [
        pytest.param(lambda a: a / 255.0, id="numpy-hwc-float64"),
        pytest.param(lambda a: (a.transpose(2, 0, 1) / 255.0).astype(np.float32), id="numpy-chw-float32"),
        pytest.param(lambda a: torch.from_numpy(a.transpose(2, 0, 1) / 255.0).float(), id="torch-chw-float32"),
        pytest.param(lambda a: torch.from_numpy(a / 255.0).to(torch.bfloat16), id="torch-hwc-bfloat16"),
    ],
)
def test_float_array_and_tensor_inputs_equal_pil_input_up_to_rounding(processor, rgb_array, to_input):
    expected = _pixels(processor, PIL.Image.fromarray(rgb_array))
    # bfloat16 keeps 8 significant bits: its inputs are already off by up to half a grey level.
    actual = _pixels(processor, to_input(rgb_array))
    np.testing.assert_allclose(actual, expected, atol=PIL_ROUNDING + ONE_GREY_LEVEL / 2)


def test_two_dimensional_array_equals_grayscale_pil_input(processor, rgb_array):
    gray = rgb_array[..., 0]
    np.testing.assert_array_equal(_pixels(processor, gray), _pixels(processor, PIL.Image.fromarray(gray)))


def test_rgba_array_equals_rgba_pil_input(processor, rgb_array):
    alpha = np.linspace(0, 255, rgb_array.shape[1], dtype=np.uint8)[None, :, None].repeat(rgb_array.shape[0], 0)
    rgba = np.concatenate([rgb_array, alpha], axis=-1)
    np.testing.assert_array_equal(_pixels(processor, rgba), _pixels(processor, PIL.Image.fromarray(rgba)))


def test_float_rgba_array_composites_on_white_like_pil(processor, rgb_array):
    alpha = np.linspace(0, 255, rgb_array.shape[1], dtype=np.uint8)[None, :, None].repeat(rgb_array.shape[0], 0)
    rgba = np.concatenate([rgb_array, alpha], axis=-1)
    expected = _pixels(processor, PIL.Image.fromarray(rgba))
    np.testing.assert_allclose(_pixels(processor, rgba / 255.0), expected, atol=PIL_ROUNDING)


def test_path_input_equals_pil_input(processor, rgb_array, tmp_path):
    path = tmp_path / "image.png"
    PIL.Image.fromarray(rgb_array).save(path)
    expected = _pixels(processor, PIL.Image.fromarray(rgb_array))
    np.testing.assert_array_equal(_pixels(processor, path), expected)
    np.testing.assert_array_equal(_pixels(processor, str(path)), expected)


def test_ambiguous_layout_defaults_to_channels_last_for_numpy_and_first_for_torch(processor):
    image = np.random.default_rng(1).integers(0, 256, size=(3, 80, 3), dtype=np.uint8)
    as_hwc = _pixels(processor, PIL.Image.fromarray(image))
    as_chw = _pixels(processor, PIL.Image.fromarray(image.transpose(1, 2, 0).copy()))
    np.testing.assert_array_equal(_pixels(processor, image), as_hwc)
    np.testing.assert_array_equal(_pixels(processor, torch.from_numpy(image)), as_chw)
    np.testing.assert_array_equal(_pixels(processor, image, input_data_format="channels_first"), as_chw)


# --- lists and batches ------------------------------------------------------------------------------------------


def test_list_of_mixed_sizes_equals_images_processed_one_by_one(processor):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(50, 70, 3), (90, 64, 3), (64, 64, 3)]]
    batch = _pixels(processor, images)
    assert batch.shape == (3, 3, TINY, TINY)
    for index, image in enumerate(images):
        np.testing.assert_array_equal(batch[index], _pixels(processor, image)[0])


def test_mixed_type_list_is_processed_in_order(processor, rgb_array):
    images = [PIL.Image.fromarray(rgb_array), rgb_array / 255.0, torch.from_numpy(rgb_array.transpose(2, 0, 1).copy())]
    batch = _pixels(processor, images)
    assert batch.shape == (3, 3, TINY, TINY)
    np.testing.assert_allclose(batch[1], batch[0], atol=PIL_ROUNDING)
    np.testing.assert_array_equal(batch[2], batch[0])


def test_numpy_four_dimensional_batch_equals_list(processor):
    batch = np.random.default_rng(3).integers(0, 256, size=(2, 50, 70, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_pixels(processor, batch), _pixels(processor, list(batch)))


def test_torch_four_dimensional_batch_equals_list(processor):
    batch = torch.randint(0, 256, (2, 3, 50, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    np.testing.assert_array_equal(_pixels(processor, batch), _pixels(processor, list(batch)))


# --- malformed inputs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("images", "word"),
    [
        pytest.param([], "empty", id="empty-list"),
        pytest.param(np.zeros((0, 20, 30, 3), dtype=np.uint8), "empty", id="empty-batch"),
        pytest.param(np.zeros((0, 20, 3), dtype=np.uint8), "zero-size", id="zero-size-array"),
        pytest.param(PIL.Image.new("RGB", (0, 10)), "zero-size", id="zero-size-pil"),
        pytest.param(np.zeros((20, 30, 2), dtype=np.uint8), "channels", id="two-channels"),
        pytest.param(np.zeros((5, 20, 30), dtype=np.uint8), "channels", id="five-channels"),
        pytest.param(np.full((20, 30, 3), np.nan, dtype=np.float32), "NaN", id="nan"),
        pytest.param(np.full((20, 30, 3), np.inf, dtype=np.float32), "inf", id="inf"),
        pytest.param(np.full((20, 30, 3), 200.0, dtype=np.float32), "[0, 1]", id="float-out-of-range"),
        pytest.param(np.full((20, 30, 3), 1000, dtype=np.uint16), "0..255", id="int-out-of-range"),
        pytest.param(np.zeros((20, 30, 3), dtype=np.complex64), "dtype", id="complex-dtype"),
        pytest.param(np.zeros(30, dtype=np.uint8), "dimensions", id="one-dim"),
        pytest.param(np.zeros((1, 2, 20, 30, 3), dtype=np.uint8), "dimensions", id="five-dims"),
        pytest.param(42, "Unsupported image type", id="int-object"),
        pytest.param({"pixels": 1}, "Unsupported image type", id="dict-object"),
        pytest.param("/nonexistent/cat.png", "/nonexistent/cat.png", id="missing-path"),
    ],
)
def test_malformed_input_raises_value_error_naming_the_problem(processor, images, word):
    with pytest.raises(ValueError) as error:
        processor(images, return_tensors="np")
    assert word in str(error.value)


def test_unreadable_file_raises_value_error_naming_the_path(processor, tmp_path):
    path = tmp_path / "not_an_image.png"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not_an_image.png"):
        processor(path)


# --- postprocess ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("return_tensors", ["PIL.Image.Image", "np", "pt"])
def test_postprocess_round_trips_preprocess_within_one_grey_level(processor, target_size_image, return_tensors):
    pixel_values = processor(target_size_image, return_tensors="pt")["pixel_values"]
    restored = processor.postprocess(pixel_values, return_tensors=return_tensors)
    if return_tensors == "PIL.Image.Image":
        assert len(restored) == 1 and restored[0].mode == "RGB"
        restored = np.asarray(restored[0])[None]
    elif return_tensors == "pt":
        assert restored.dtype == torch.uint8 and restored.shape == (1, 3, TINY, TINY)
        restored = restored.numpy().transpose(0, 2, 3, 1)
    else:
        assert restored.dtype == np.uint8 and restored.shape == (1, TINY, TINY, 3)
    difference = np.abs(restored.astype(np.int16) - target_size_image[None].astype(np.int16))
    assert difference.max() <= 1


def test_postprocess_accepts_a_single_unbatched_image(processor, target_size_image):
    pixel_values = processor(target_size_image, return_tensors="np")["pixel_values"][0]
    restored = processor.postprocess(pixel_values, return_tensors="np")
    assert restored.shape == (1, TINY, TINY, 3)


def test_postprocess_maps_unit_range_to_uint8_and_clamps_outside(processor):
    pixel_values = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    restored = processor.postprocess(pixel_values, return_tensors="np")
    np.testing.assert_array_equal(restored[0, 0, :, 0], [0, 0, 128, 255, 255])  # 127.5 rounds half to even: 128


@pytest.mark.parametrize(
    ("pixel_values", "return_tensors", "word"),
    [
        pytest.param(np.zeros((1, 4, 8, 8)), "np", "shape", id="four-channels"),
        pytest.param(np.zeros((8, 8)), "np", "shape", id="two-dims"),
        pytest.param(np.zeros((0, 3, 8, 8)), "np", "shape", id="empty-batch"),
        pytest.param(np.full((1, 3, 8, 8), np.nan), "np", "NaN", id="nan"),
        pytest.param(np.zeros((1, 3, 8, 8)), "tf", "return_tensors", id="unknown-return-type"),
    ],
)
def test_postprocess_rejects_malformed_input(processor, pixel_values, return_tensors, word):
    with pytest.raises(ValueError, match=word):
        processor.postprocess(pixel_values, return_tensors=return_tensors)


# --- serialization and presets ----------------------------------------------------------------------------------


def test_save_pretrained_from_pretrained_round_trips_the_config(tmp_path):
    processor = DualTokenImageProcessor.from_preset("tiny", resample=PIL.Image.BILINEAR)
    processor.save_pretrained(tmp_path)
    reloaded = DualTokenImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    assert reloaded.crop_size.height == TINY and reloaded.resample == PIL.Image.BILINEAR


def test_module_imports_only_hub_safe_libraries_and_its_configuration_sibling():
    source = Path(image_processing_module.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            assert (node.level, node.module) == (1, "configuration_dualtoken"), f"relative import of {node.module!r}"
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"io", "os", "re", "typing", "warnings", "numpy", "PIL", "torch", "transformers"}, imported


def test_module_copied_with_its_configuration_loads_as_remote_code_and_processes_identically(
    processor, rgb_array, tmp_path
):
    shutil.copy(image_processing_module.__file__, tmp_path / "image_processing_dualtoken.py")
    shutil.copy(configuration_module.__file__, tmp_path / "configuration_dualtoken.py")
    processor.save_pretrained(tmp_path)
    # What AutoImageProcessor does with an `auto_map` entry and trust_remote_code=True.
    remote_class = get_class_from_dynamic_module("image_processing_dualtoken.DualTokenImageProcessor", tmp_path)
    assert remote_class.__module__.startswith("transformers_modules")
    remote = remote_class.from_pretrained(tmp_path)
    assert remote.to_dict() == processor.to_dict()
    np.testing.assert_array_equal(_pixels(remote, rgb_array), _pixels(processor, rgb_array))
    # The remote class takes the package's config: configs are recognised by model type, not by class.
    from_config = remote_class.from_vision_config(DualTokenVisionConfig.from_preset("tiny"))
    assert (from_config.size, from_config.crop_size) == (processor.size, processor.crop_size)


@pytest.mark.parametrize(("name", "image_size"), [("paper", 384), ("v2", 384), ("tiny", 64)])
def test_from_vision_config_resizes_and_crops_to_the_siglip_image_size(name, image_size):
    config = DualTokenVisionConfig.from_preset(name)
    assert config.siglip_config.image_size == image_size
    processor = DualTokenImageProcessor.from_vision_config(config)
    assert processor.size.shortest_edge == image_size
    assert (processor.crop_size.height, processor.crop_size.width) == (image_size, image_size)
    assert DualTokenImageProcessor.from_preset(name).to_dict() == processor.to_dict()


def test_from_vision_config_follows_a_changed_image_size():
    config = DualTokenVisionConfig.from_preset("tiny", siglip_config={"image_size": 96})
    processor = DualTokenImageProcessor.from_vision_config(config)
    assert (processor.size.shortest_edge, processor.crop_size.height, processor.crop_size.width) == (96, 96, 96)


def test_from_vision_config_reads_the_vision_config_of_a_unified_config():
    config = DualTokenConfig(vision_config=DualTokenVisionConfig.from_preset("tiny"))
    assert DualTokenImageProcessor.from_vision_config(config).crop_size.height == TINY


def test_from_vision_config_refuses_another_config():
    with pytest.raises(ValueError, match="SiglipVisionConfig"):
        DualTokenImageProcessor.from_vision_config(DualTokenVisionConfig.from_preset("tiny").siglip_config)


def test_preset_keyword_overrides_win(processor):
    assert DualTokenImageProcessor.from_preset("tiny", crop_size=32).crop_size.height == 32


def test_unknown_preset_raises_value_error_listing_valid_names():
    with pytest.raises(ValueError) as error:
        DualTokenImageProcessor.from_preset("huge")
    assert all(name in str(error.value) for name in ("paper", "v2", "tiny"))
