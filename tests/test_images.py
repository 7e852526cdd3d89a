"""The one image path: `open_image`, `flatten_images` and the 8-bit <-> `pixel_values` conversions."""

import io
import re

import numpy as np
import PIL.Image
import pytest
import torch

from dualtoken_hf.evaluation import ImageFolder
from dualtoken_hf.image_processing_dualtoken import (
    DualTokenImageProcessor,
    flatten_images,
    open_image,
    to_pil_images,
    to_pixel_values,
)


EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE = 6  # EXIF: rotate the stored image 90 degrees clockwise to display it


def red_top_stripe(width: int = 40, height: int = 24) -> PIL.Image.Image:
    """A blue image whose top 8 rows are red, so that a rotation moves the red stripe to another side."""
    array = np.zeros((height, width, 3), np.uint8)
    array[...] = (0, 0, 255)
    array[:8] = (255, 0, 0)
    return PIL.Image.fromarray(array)


def rotated_jpeg(path) -> None:
    exif = PIL.Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    red_top_stripe().save(path, "JPEG", quality=95, exif=exif)


def encoded(image: PIL.Image.Image, image_format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **kwargs)
    return buffer.getvalue()


# --- open_image: orientation and modes -----------------------------------------------------------------------------


def test_exif_rotated_jpeg_is_returned_upright(tmp_path):
    path = tmp_path / "rotated.jpg"
    rotated_jpeg(path)
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (24, 40)  # width and height swapped
    array = np.asarray(image).astype(int)
    # The red top stripe of the stored image is on the right once rotated clockwise; the left is blue.
    assert (np.abs(array[:, -6:] - (255, 0, 0)) < 24).all()
    assert (np.abs(array[:, :12] - (0, 0, 255)) < 24).all()
    with PIL.Image.open(path) as stored:
        expected = stored.convert("RGB").transpose(PIL.Image.Transpose.ROTATE_270)
    np.testing.assert_array_equal(array, np.asarray(expected))


def test_palette_png_gives_its_palette_colors(tmp_path):
    image = PIL.Image.new("P", (6, 4), 0)
    image.putpalette([255, 0, 0, 0, 128, 255] + [0, 0, 0] * 254)
    image.paste(1, (3, 0, 6, 4))
    image.save(tmp_path / "palette.png")
    array = np.asarray(open_image(tmp_path / "palette.png"))
    assert (array[:, :3] == (255, 0, 0)).all() and (array[:, 3:] == (0, 128, 255)).all()


def test_palette_png_with_a_transparent_index_is_composited_on_white(tmp_path):
    image = PIL.Image.new("P", (6, 4), 0)
    image.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    image.paste(1, (3, 0, 6, 4))
    image.save(tmp_path / "palette.png", transparency=0)
    array = np.asarray(open_image(tmp_path / "palette.png"))
    assert (array[:, :3] == 255).all() and (array[:, 3:] == (10, 20, 30)).all()


def test_la_png_is_composited_on_white(tmp_path):
    gray = np.array([[0, 100, 0]], np.uint8)
    alpha = np.array([[0, 255, 128]], np.uint8)
    PIL.Image.fromarray(np.stack([gray, alpha], axis=-1), "LA").save(tmp_path / "la.png")
    array = np.asarray(open_image(tmp_path / "la.png")).astype(int)
    # Transparent -> white, opaque -> its gray, half transparent black -> about 255 * (1 - 128 / 255).
    assert array[0, 0].tolist() == [255, 255, 255] and array[0, 1].tolist() == [100, 100, 100]
    assert (np.abs(array[0, 2] - 127) <= 1).all()


def test_sixteen_bit_png_is_scaled_to_eight_bits_not_clipped(tmp_path):
    levels = np.array([[0, 100 * 257, 200 * 257, 65535]], np.uint16)
    PIL.Image.fromarray(levels).save(tmp_path / "deep.png")
    with PIL.Image.open(tmp_path / "deep.png") as stored:
        assert stored.mode.startswith("I")  # really read as a 16-bit image
    array = np.asarray(open_image(tmp_path / "deep.png"))
    np.testing.assert_array_equal(array[0, :, 0], [0, 100, 200, 255])
    assert (array[..., 0] == array[..., 1]).all() and (array[..., 0] == array[..., 2]).all()


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [PIL.Image.new("RGB", (8, 8), color) for color in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    with PIL.Image.open(tmp_path / "animated.gif") as stored:
        assert stored.n_frames == 2
    assert (np.asarray(open_image(tmp_path / "animated.gif")) == (255, 0, 0)).all()


def test_cmyk_jpeg_gives_its_rgb_colors(tmp_path):
    colors = [(200, 30, 30), (30, 160, 60), (20, 40, 220), (240, 240, 240)]
    rgb = np.repeat(np.array(colors, np.uint8)[None], 16, axis=0).repeat(16, axis=1)  # four 16 px wide bars
    PIL.Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", "JPEG", quality=95)
    with PIL.Image.open(tmp_path / "cmyk.jpg") as stored:
        assert stored.mode == "CMYK"
    array = np.asarray(open_image(tmp_path / "cmyk.jpg")).astype(int)
    for index, color in enumerate(colors):
        assert (np.abs(array[4:-4, 16 * index + 4 : 16 * index + 12] - color) <= 12).all(), color


# --- open_image: sources ---------------------------------------------------------------------------------------------


@pytest.fixture
def png_bytes() -> bytes:
    array = np.random.default_rng(0).integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
    return encoded(PIL.Image.fromarray(array), "PNG")


def test_bytes_file_object_and_datasets_value_equal_the_path(png_bytes, tmp_path):
    path = tmp_path / "image.png"
    path.write_bytes(png_bytes)
    expected = np.asarray(open_image(path))
    assert expected.shape == (12, 20, 3)
    sources = [
        str(path),
        png_bytes,
        bytearray(png_bytes),
        io.BytesIO(png_bytes),
        {"bytes": png_bytes, "path": "elsewhere/image.png"},
        {"bytes": None, "path": str(path)},
    ]
    for source in sources:
        np.testing.assert_array_equal(np.asarray(open_image(source)), expected)


def test_pil_input_is_converted_without_being_modified():
    image = PIL.Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    opened = open_image(image)
    assert opened.mode == "RGB" and (np.asarray(opened) == 255).all()
    assert image.mode == "RGBA" and np.asarray(image)[0, 0].tolist() == [0, 0, 0, 0]


def test_truncated_file_raises_value_error_naming_it(tmp_path):
    full = encoded(red_top_stripe(64, 64), "JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(ValueError, match=re.escape(f"cannot read {str(path)!r} as an image")):
        open_image(path)


@pytest.mark.parametrize(
    ("source", "name"),
    [
        pytest.param(b"not an image", "12 bytes of image data", id="bytes"),
        pytest.param({"bytes": b"not an image", "path": "shard/00001.jpg"}, "'shard/00001.jpg'", id="datasets"),
        pytest.param("/nonexistent/cat.png", "'/nonexistent/cat.png'", id="missing-path"),
    ],
)
def test_unreadable_source_raises_value_error_naming_it(source, name):
    with pytest.raises(ValueError, match=re.escape(f"cannot read {name} as an image")):
        open_image(source)


def test_decompression_bomb_raises_value_error(tmp_path, monkeypatch):
    PIL.Image.new("RGB", (30, 30)).save(tmp_path / "large.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)  # 900 pixels is more than twice the limit
    with pytest.raises(ValueError, match="large.png.*decompression bomb"):
        open_image(tmp_path / "large.png")


@pytest.mark.parametrize("source", [42, {"pixels": 1}, {"bytes": None, "path": None}])
def test_unsupported_source_raises_value_error(source):
    with pytest.raises(ValueError, match="Unsupported image source|both None"):
        open_image(source)


# --- the callers read images through the opener ------------------------------------------------------------------


def test_image_processor_reads_a_path_upright_through_the_opener(tmp_path):
    path = tmp_path / "rotated.jpg"
    rotated_jpeg(path)
    processor = DualTokenImageProcessor(size={"height": 40, "width": 24}, do_center_crop=False)
    from_path = processor(path, return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(from_path, processor(open_image(path), return_tensors="np")["pixel_values"])
    assert from_path[0, 0, :, -1].min() > 0.8  # the red stripe, on the right: red channel near 1


def test_evaluation_folder_skips_and_counts_unreadable_files(tmp_path):
    (tmp_path / "b_class").mkdir()
    (tmp_path / "a_class").mkdir()
    PIL.Image.new("RGB", (16, 16), (255, 0, 0)).save(tmp_path / "a_class" / "red.png")
    (tmp_path / "a_class" / "truncated.jpg").write_bytes(encoded(red_top_stripe(), "JPEG")[:100])
    PIL.Image.new("LA", (16, 16), (0, 0)).save(tmp_path / "b_class" / "clear.png")
    PIL.Image.new("RGB", (16, 16), (0, 0, 255)).save(tmp_path / "loose.png")
    folder = ImageFolder(str(tmp_path))
    processor = DualTokenImageProcessor(size={"height": 16, "width": 16}, crop_size={"height": 16, "width": 16})
    batches = list(folder.batches(processor, batch_size=4))
    assert len(batches) == 1
    pixel_values, labels = batches[0]
    assert labels.tolist() == [0, 1, -1]  # sorted paths; sub-folders are classes, loose images unlabelled
    assert folder.unreadable == [str(tmp_path / "a_class" / "truncated.jpg")]
    # Red, then transparent composited on white, then blue.
    np.testing.assert_allclose(pixel_values[:, :, 0, 0].numpy(), [[1, -1, -1], [1, 1, 1], [-1, -1, 1]])


# --- flatten_images ----------------------------------------------------------------------------------------------


def test_flatten_images_flattens_nesting_splits_batches_and_keeps_paths(tmp_path):
    image = PIL.Image.new("RGB", (2, 2))
    batch = np.zeros((3, 4, 4, 3), np.uint8)
    single = torch.zeros(3, 4, 4)
    flat = flatten_images([[image, tmp_path / "a.png"], (batch, [single]), "b.png"])
    assert len(flat) == 7
    assert flat[0] is image and flat[1] == str(tmp_path / "a.png") and flat[-1] == "b.png"
    assert all(item.shape == (4, 4, 3) for item in flat[2:5]) and flat[5] is single
    assert flatten_images([]) == []


@pytest.mark.parametrize(
    ("images", "phrase"),
    [
        pytest.param(np.zeros(5, np.uint8), "dimensions", id="one-dim"),
        pytest.param([np.zeros((1, 1, 2, 2, 3), np.uint8)], "dimensions", id="five-dims-in-list"),
        pytest.param([PIL.Image.new("RGB", (2, 2)), 3.5], "Unsupported image type float", id="float-in-list"),
    ],
)
def test_flatten_images_rejects_what_is_not_an_image(images, phrase):
    with pytest.raises(ValueError, match=phrase):
        flatten_images(images)


# --- 8-bit images <-> pixel_values ----------------------------------------------------------------------------------


@pytest.fixture
def uint8_image() -> PIL.Image.Image:
    """Every 8-bit value in each channel, in a 16 x 16 image."""
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    return PIL.Image.fromarray(np.stack([values, values[::-1], values.T], axis=-1))


def test_to_pixel_values_maps_each_level_to_x_over_127_5_minus_1(uint8_image):
    pixel_values = to_pixel_values(uint8_image)
    assert pixel_values.shape == (1, 3, 16, 16) and pixel_values.dtype == torch.float32
    expected = torch.from_numpy(np.asarray(uint8_image, np.float64) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(pixel_values[0].double(), expected, atol=1e-6, rtol=0)


def test_pil_to_tensor_to_pil_round_trips_uint8_exactly(uint8_image):
    (restored,) = to_pil_images(to_pixel_values(uint8_image))
    assert restored.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(uint8_image))


def test_tensor_to_pil_to_tensor_round_trips_8_bit_pixel_values_exactly(uint8_image):
    pixel_values = to_pixel_values([uint8_image, uint8_image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)])
    assert torch.equal(to_pixel_values(to_pil_images(pixel_values)), pixel_values)


def test_to_pil_images_rounds_and_clamps_like_postprocess():
    pixel_values = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0]).view(1, 1, 6).expand(3, 1, 6)
    (image,) = to_pil_images(pixel_values)
    np.testing.assert_array_equal(np.asarray(image)[0, :, 0], [0, 0, 128, 191, 255, 255])
