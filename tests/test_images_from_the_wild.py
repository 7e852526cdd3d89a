"""Images from the wild, through every path that reads image files: the opener and the image processor (the API
raises `ValueError` naming the file), `dualtoken tokenize`, the training dataset and the evaluation `ImageFolder`
(these skip an unreadable file and count it). Every case is a generated file in a temporary folder.
"""

import io
import json
import re
import struct
import zlib
from dataclasses import dataclass
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open

from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionModel
from dualtoken_hf.cli import main
from dualtoken_hf.evaluation import ImageFolder
from dualtoken_hf.image_processing_dualtoken import open_image
from dualtoken_hf.training.data import ImageTrainDataset, TrainTransform, load_image_dataset, undecoded


EXIF_ORIENTATION = 0x0112
ROTATE_90_CLOCKWISE = 6  # EXIF: rotate the stored image 90 degrees clockwise to display it
JPEG_TOLERANCE = 24


def png_file(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, nor a header that lies about the size)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def encoded(image: PIL.Image.Image, image_format: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **kwargs)
    return buffer.getvalue()


def gradient(width: int, height: int) -> np.ndarray:
    """An RGB image whose red grows along x, green along y, blue constant: every pixel tells where it is."""
    x = np.linspace(0, 255, width).round().astype(np.uint8)
    y = np.linspace(0, 255, height).round().astype(np.uint8)
    image = np.empty((height, width, 3), np.uint8)
    image[..., 0], image[..., 1], image[..., 2] = x[None, :], y[:, None], 90
    return image


# ------------------------------------------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Case:
    """One file: its bytes, and the upright RGB image every reader must see (`None`: unreadable, with `reason` a
    phrase of the error), equal within `tolerance`."""

    filename: str
    data: Callable[[], bytes]
    expected: Callable[[], np.ndarray] | None = None
    tolerance: int = 0
    reason: str = ""


def _exif_rotated_jpeg() -> bytes:
    stored = np.zeros((24, 40, 3), np.uint8)
    stored[...] = (0, 0, 255)
    stored[:8] = (255, 0, 0)  # a red top stripe: once rotated clockwise, on the right
    exif = PIL.Image.Exif()
    exif[EXIF_ORIENTATION] = ROTATE_90_CLOCKWISE
    return encoded(PIL.Image.fromarray(stored), "JPEG", quality=95, subsampling=0, exif=exif)


def _exif_rotated_upright() -> np.ndarray:
    upright = np.zeros((40, 24, 3), np.uint8)
    upright[...] = (0, 0, 255)
    upright[:, -8:] = (255, 0, 0)
    return upright


SIXTEEN_BIT_LEVELS = np.array([[0, 60, 120, 255], [255, 180, 30, 7]], np.uint16)


def _sixteen_bit_gray_png() -> bytes:
    return encoded(PIL.Image.fromarray(SIXTEEN_BIT_LEVELS * 257), "PNG")


def _sixteen_bit_rgb_png() -> bytes:
    levels = np.stack([SIXTEEN_BIT_LEVELS, SIXTEEN_BIT_LEVELS[:, ::-1], 255 - SIXTEEN_BIT_LEVELS], axis=-1) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in levels)
    return png_file(4, 2, 16, 2, rows)


def _sixteen_bit_rgb_expected() -> np.ndarray:
    return np.stack([SIXTEEN_BIT_LEVELS, SIXTEEN_BIT_LEVELS[:, ::-1], 255 - SIXTEEN_BIT_LEVELS], -1).astype(np.uint8)


PALETTE = [(255, 0, 0), (0, 128, 255), (20, 200, 40)]


def _palette_png() -> bytes:
    image = PIL.Image.new("P", (9, 5), 0)
    image.putpalette([value for color in PALETTE for value in color])
    image.paste(1, (3, 0, 6, 5))
    image.paste(2, (6, 0, 9, 5))
    return encoded(image, "PNG")


def _palette_expected() -> np.ndarray:
    return np.repeat(np.repeat(np.array(PALETTE, np.uint8)[None], 3, axis=1), 5, axis=0)


LA_GRAY, LA_ALPHA = np.array([[0, 100, 0, 200]], np.uint8), np.array([[0, 255, 128, 255]], np.uint8)


def _la_png() -> bytes:
    return encoded(PIL.Image.fromarray(np.stack([LA_GRAY, LA_ALPHA], axis=-1), "LA"), "PNG")


def _la_expected() -> np.ndarray:
    over_white = LA_GRAY * (LA_ALPHA / 255) + 255 * (1 - LA_ALPHA / 255)  # composited on white
    return np.repeat(over_white.round().astype(np.uint8)[..., None], 3, axis=-1)


def _animated_gif() -> bytes:
    frames = [PIL.Image.new("RGB", (8, 6), color) for color in [(255, 0, 0), (0, 0, 255), (0, 255, 0)]]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


CMYK_COLORS = [(200, 30, 30), (30, 160, 60), (20, 40, 220), (240, 240, 240)]


def _cmyk_bars() -> np.ndarray:
    return np.repeat(np.array(CMYK_COLORS, np.uint8)[None], 16, axis=0).repeat(16, axis=1)


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _lying_png_header(width: int, height: int) -> bytes:
    """A PNG of a few bytes whose header claims `width` x `height` 1-bit pixels: decoding it would allocate them."""
    return png_file(width, height, 1, 0, b"\x00" * 16)


CASES = {
    "exif-rotated JPEG": Case("rotated.jpg", _exif_rotated_jpeg, _exif_rotated_upright, JPEG_TOLERANCE),
    "16-bit gray PNG": Case(
        "gray16.png", _sixteen_bit_gray_png, lambda: np.repeat(SIXTEEN_BIT_LEVELS.astype(np.uint8)[..., None], 3, -1)
    ),
    "16-bit RGB PNG": Case("rgb16.png", _sixteen_bit_rgb_png, _sixteen_bit_rgb_expected),
    "palette PNG": Case("palette.png", _palette_png, _palette_expected),
    "LA PNG": Case("gray_alpha.png", _la_png, _la_expected, tolerance=1),
    "animated GIF": Case("animated.gif", _animated_gif, lambda: np.full((6, 8, 3), (255, 0, 0), np.uint8)),
    "CMYK JPEG": Case(
        "cmyk.jpg",
        lambda: encoded(PIL.Image.fromarray(_cmyk_bars()).convert("CMYK"), "JPEG", quality=95),
        _cmyk_bars,
        JPEG_TOLERANCE,
    ),
    "1x1 PNG": Case("dot.png", lambda: encoded(PIL.Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"),
                    lambda: np.array([[[9, 99, 199]]], np.uint8)),
    "10000x50 PNG": Case("banner.png", lambda: encoded(PIL.Image.fromarray(gradient(10000, 50)), "PNG"),
                         lambda: gradient(10000, 50)),
    "truncated JPEG": Case(
        "truncated.jpg", lambda: _truncated(encoded(PIL.Image.fromarray(gradient(64, 64)), "JPEG")),
        reason="Truncated File Read",
    ),
    "truncated PNG": Case(
        "truncated.png", lambda: _truncated(encoded(PIL.Image.fromarray(gradient(64, 64)), "PNG")),
        reason="truncated",
    ),
    "text file named .jpg": Case("notes.jpg", lambda: b"shopping list: milk, eggs\n", reason="cannot identify"),
    "empty file": Case("empty.png", lambda: b"", reason="cannot identify"),
    # 10,000 x 10,000 is above PIL's default limit (89,478,485) but below twice it, where PIL itself only warns.
    "decompression bomb (PIL warns)": Case(
        "bomb_warning.png", lambda: _lying_png_header(10_000, 10_000), reason="100,000,000 pixels, more than"
    ),
    "decompression bomb (PIL refuses)": Case(
        "bomb_error.png", lambda: _lying_png_header(100_000, 100_000), reason="10,000,000,000 pixels, more than"
    ),
}
READABLE = sorted(name for name, case in CASES.items() if case.expected is not None)
UNREADABLE = sorted(name for name, case in CASES.items() if case.expected is None)
GOOD_FILE = "good.png"


@pytest.fixture(scope="module")
def wild_folder(tmp_path_factory) -> Path:
    """Every case's file, and one good photo-like image, in one folder."""
    folder = tmp_path_factory.mktemp("wild")
    for case in CASES.values():
        (folder / case.filename).write_bytes(case.data())
    PIL.Image.fromarray(gradient(80, 70)).save(folder / GOOD_FILE)
    return folder


@pytest.fixture(scope="module")
def processor() -> DualTokenImageProcessor:
    return DualTokenImageProcessor.from_preset("tiny")


def unreadable_error(case: Case, path: Path) -> str:
    """The pattern of the `ValueError` that reading `case` raises: it names the file and says why."""
    return re.escape(f"cannot read {str(path)!r} as an image") + ".*" + re.escape(case.reason)


# ------------------------------------------------------------------------------------------ the API raises


@pytest.mark.parametrize("name", READABLE)
def test_the_opener_gives_the_upright_rgb_image(name, wild_folder):
    case = CASES[name]
    image = open_image(wild_folder / case.filename)
    expected = case.expected()
    assert image.mode == "RGB" and image.size == (expected.shape[1], expected.shape[0])
    difference = np.abs(np.asarray(image).astype(int) - expected.astype(int))
    assert difference.max() <= case.tolerance, difference.max()


@pytest.mark.parametrize("name", UNREADABLE)
def test_the_opener_and_the_processor_raise_a_value_error_naming_the_file(name, wild_folder, processor):
    case = CASES[name]
    path = wild_folder / case.filename
    with pytest.raises(ValueError, match=unreadable_error(case, path)):
        open_image(path)
    with pytest.raises(ValueError, match=unreadable_error(case, path)):
        processor(str(path), return_tensors="pt")


def test_a_decompression_bomb_is_refused_from_its_header(wild_folder):
    # A 10,000 x 10,000 PNG of a few bytes: were it decoded, PIL would allocate 100 MB before finding it truncated.
    path = wild_folder / CASES["decompression bomb (PIL warns)"].filename
    assert path.stat().st_size < 200
    with pytest.raises(ValueError, match="PIL.Image.MAX_IMAGE_PIXELS = 89,478,485") as raised:
        open_image(path)
    assert isinstance(raised.value.__cause__, PIL.Image.DecompressionBombWarning)


def test_the_pixel_limit_is_pils_own(wild_folder, monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 79 * 70)  # the good image has 80 x 70 pixels
    with pytest.raises(ValueError, match="5,600 pixels, more than PIL.Image.MAX_IMAGE_PIXELS = 5,530"):
        open_image(wild_folder / GOOD_FILE)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 80 * 70)
    assert open_image(wild_folder / GOOD_FILE).size == (80, 70)


@pytest.mark.parametrize("name", READABLE)
def test_the_processor_reads_a_path_as_the_opener_reads_it(name, wild_folder, processor):
    path = wild_folder / CASES[name].filename
    from_path = processor(str(path), return_tensors="pt").pixel_values
    assert from_path.shape == (1, 3, 64, 64)
    assert torch.equal(from_path, processor(open_image(path), return_tensors="pt").pixel_values)


# ------------------------------------------------------------------------------ scripts skip and count


def test_tokenize_encodes_readable_files_and_skips_and_counts_the_others(wild_folder, tokenizer_folder, processor,
                                                                         tmp_path, capsys):
    paths = [wild_folder / CASES[name].filename for name in sorted(CASES)] + [wild_folder / GOOD_FILE]
    output = tmp_path / "codes.safetensors"
    assert main(["tokenize", "--model", str(tokenizer_folder), *map(str, paths), "--output", str(output)]) == 0
    err = capsys.readouterr().err

    for name in UNREADABLE:
        case = CASES[name]
        path = wild_folder / case.filename
        (line,) = [line for line in err.splitlines() if f"cannot read {str(path)!r} as an image" in line]
        assert line.startswith("dualtoken tokenize: warning:") and line.endswith("; skipped"), line
        assert case.reason in line, line
    assert f"skipped {len(UNREADABLE)} of {len(paths)} images" in err

    readable = [path for path in paths if path.name not in {CASES[name].filename for name in UNREADABLE}]
    with safe_open(output, "pt") as handle:
        assert json.loads(handle.metadata()["sources"]) == list(map(str, readable))
        pixel_codes = handle.get_tensor("pixel_codes")
    model = DualTokenVisionModel.from_pretrained(tokenizer_folder).eval()
    with torch.no_grad():
        expected = model.encode(processor([open_image(path) for path in readable], return_tensors="pt").pixel_values)
    assert torch.equal(pixel_codes, expected.pixel_codes)


def test_tokenize_fails_when_no_file_is_readable(wild_folder, tokenizer_folder, tmp_path, capsys):
    paths = [str(wild_folder / CASES[name].filename) for name in UNREADABLE]
    output = tmp_path / "codes.safetensors"
    assert main(["tokenize", "--model", str(tokenizer_folder), *paths, "--output", str(output)]) == 2
    assert f"none of the {len(paths)} images could be read" in capsys.readouterr().err
    assert not output.exists()


def test_the_evaluation_folder_reads_what_the_processor_reads_and_counts_the_rest(wild_folder, processor):
    images = ImageFolder(str(wild_folder))
    assert len(images) == len(CASES) + 1
    batches = list(images.batches(processor, batch_size=1))
    readable = [path for path in images.paths if str(path) not in images.unreadable]
    assert sorted(images.unreadable) == sorted(str(wild_folder / CASES[name].filename) for name in UNREADABLE)
    assert len(batches) == len(readable) == len(READABLE) + 1
    for path, (pixel_values, labels) in zip(readable, batches):
        assert torch.equal(pixel_values, processor(str(path), return_tensors="pt").pixel_values), path
        assert labels.tolist() == [-1]


def test_the_training_dataset_reads_what_the_opener_reads_and_counts_the_rest(wild_folder, tmp_path):
    dataset = load_image_dataset(train_data_dir=str(wild_folder), cache_dir=str(tmp_path / "cache"))
    dataset = undecoded(dataset, "image")
    transform = TrainTransform(64)
    training = ImageTrainDataset(dataset, "image", transform, seed=3)
    unreadable = {CASES[name].filename for name in UNREADABLE}
    files = [Path(dataset[index]["image"]["path"]).name for index in range(len(dataset))]
    assert sorted(files) == sorted([case.filename for case in CASES.values()] + [GOOD_FILE])

    for index, filename in enumerate(files):
        item = training[index]
        # Item i is the first readable file from position i on; `skipped_images` counts the ones passed over.
        skipped = next(offset for offset in range(len(files)) if files[(index + offset) % len(files)] not in unreadable)
        assert item["skipped_images"] == skipped, filename
        source = wild_folder / files[(index + skipped) % len(files)]
        expected = transform(open_image(source), np.random.default_rng([3, 0, index]))
        assert torch.equal(item["pixel_values"], expected), filename
