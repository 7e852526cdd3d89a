"""Training data: the official random resized crop, shard patterns, and skipping unreadable images."""

import io
import logging
import tarfile

import numpy as np
import PIL.Image
import pytest
import torch

from dualtoken_hf.training import (
    ImageTrainDataset,
    StreamingImageTrainDataset,
    TrainTransform,
    collate_images,
    load_image_dataset,
    random_resized_crop_box,
    resolve_image_column,
    undecoded,
)
from dualtoken_hf.training.data import expand_shard_pattern


def write_image(path, size=(48, 40), seed=0):
    array = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)
    PIL.Image.fromarray(array).save(path)


def test_random_resized_crop_box_stays_in_the_official_ranges():
    rng = np.random.default_rng(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(400, 300, rng)
        width, height = right - left, bottom - top
        assert 0 <= left < right <= 400 and 0 <= top < bottom <= 300
        assert 0.9 * 400 * 300 * 0.98 <= width * height <= 400 * 300
        assert 3 / 4 * 0.98 <= width / height <= 4 / 3 * 1.02


def test_random_resized_crop_falls_back_to_a_ratio_clamped_center_crop():
    # A 10:1 strip admits no crop with ratio <= 4/3 and area >= 90 %: center crop of ratio 4/3, full height.
    assert random_resized_crop_box(1000, 100, np.random.default_rng(0)) == (433, 0, 566, 100)


def test_train_transform_is_deterministic_per_draw_and_normalised():
    image = PIL.Image.fromarray(np.full((30, 50, 3), 255, np.uint8))
    transform = TrainTransform(16)
    pixel_values = transform(image, np.random.default_rng(3))
    assert pixel_values.shape == (3, 16, 16) and pixel_values.dtype == torch.float32
    assert torch.allclose(pixel_values, torch.ones_like(pixel_values))  # white -> 1 with mean = std = 0.5
    assert torch.equal(transform(image, np.random.default_rng(3)), pixel_values)


def test_expand_shard_pattern_keeps_zero_padding():
    assert expand_shard_pattern("cc12m-{0008..0010}.tar") == ["cc12m-0008.tar", "cc12m-0009.tar", "cc12m-0010.tar"]
    assert expand_shard_pattern("data/*.tar") == ["data/*.tar"]


def test_unreadable_and_truncated_images_are_skipped_and_counted(tmp_path, caplog):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "a.png", seed=0)
    (folder / "b_garbage.jpg").write_bytes(b"not an image")
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buffer, "JPEG")
    (folder / "c_truncated.jpg").write_bytes(buffer.getvalue()[:200])
    write_image(folder / "d.png", seed=1)
    raw = undecoded(load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache")), "image")
    dataset = ImageTrainDataset(raw, "image", TrainTransform(16), seed=0)
    names = [example["image"]["path"].rsplit("/", 1)[-1] for example in raw]
    assert names == ["a.png", "b_garbage.jpg", "c_truncated.jpg", "d.png"]

    with caplog.at_level(logging.WARNING, logger="dualtoken_hf.training.data"):
        batch = collate_images([dataset[index] for index in range(len(dataset))])
    # Item 1 skips both bad files to reach d.png, item 2 skips one.
    assert batch["skipped_images"].tolist() == [0, 2, 1, 0]
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert not torch.equal(batch["pixel_values"][1], batch["pixel_values"][3])  # own (seed, epoch, index) draws
    assert "b_garbage.jpg" in caplog.text and "c_truncated.jpg" in caplog.text


def test_transparent_training_image_is_composited_on_white_like_the_processor(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    PIL.Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(folder / "clear.png")
    raw = undecoded(load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache")), "image")
    example = ImageTrainDataset(raw, "image", TrainTransform(16), seed=0)[0]
    assert example["skipped_images"] == 0
    assert torch.equal(example["pixel_values"], torch.ones(3, 16, 16))  # white, not the black of a bare RGB convert


def test_dataset_draws_depend_on_epoch(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    write_image(folder / "a.png", size=(80, 60))
    raw = undecoded(load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache")), "image")
    dataset = ImageTrainDataset(raw, "image", TrainTransform(16, crop_scale=(0.2, 1.0)), seed=0)
    first = dataset[0]["pixel_values"]
    assert torch.equal(dataset[0]["pixel_values"], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[0]["pixel_values"], first)


def test_load_image_dataset_wants_exactly_one_source():
    with pytest.raises(ValueError, match="exactly one"):
        load_image_dataset()
    with pytest.raises(ValueError, match="exactly one"):
        load_image_dataset(train_data_dir="a", dataset_name="b")


def test_tar_shards_stream_with_unreadable_files_skipped_and_counted(tmp_path):
    with tarfile.open(tmp_path / "shard-0000.tar", "w") as shard:
        for index, payload in enumerate([None, b"garbage", None]):
            if payload is None:
                buffer = io.BytesIO()
                PIL.Image.fromarray(np.full((20, 30, 3), 40 * index, np.uint8)).save(buffer, "JPEG")
                payload = buffer.getvalue()
            member = tarfile.TarInfo(f"{index:05d}.jpg")
            member.size = len(payload)
            shard.addfile(member, io.BytesIO(payload))
    raw = load_image_dataset(train_shards=[str(tmp_path / "shard-{0000..0000}.tar")])
    column = resolve_image_column(raw, "image")
    assert column == "jpg"
    dataset = StreamingImageTrainDataset(undecoded(raw, column), column, TrainTransform(8), seed=0)
    examples = list(dataset)
    assert [example["skipped_images"] for example in examples] == [0, 1]
