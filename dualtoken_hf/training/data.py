"""Training images for the tokenizer: loading, the official random crop, and skipping unreadable files.

Three sources, all through `datasets`: an image folder (`imagefolder`), a dataset from the Hub or a local script, and
webdataset-style tar shards (streamed, for CC12M scale). Images are decoded here, with the package's one opener
(`open_image`), rather than by `datasets`, so an unreadable or truncated file is skipped, logged and counted (each
example carries `skipped_images`, the number of files skipped to produce it) instead of ending the run. Augmentation
uses NumPy/PIL only: a bicubic RandomResizedCrop (scale 0.9-1, ratio 3/4-4/3, as the official recipe) and a
horizontal flip, then the processor's normalisation (`to_pixel_values`: pixel values in [-1, 1]). Random draws
depend only on the seed, the epoch and the example's position, so an epoch can be resumed anywhere by skipping
batches.
"""

import itertools
import logging
import math
import re

import datasets
import numpy as np
import PIL.Image
import torch

from ..image_processing_dualtoken import open_image, to_pixel_values


logger = logging.getLogger(__name__)

WEBDATASET_IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp")
# A run of this many unreadable files in a row means the data source is broken, not a few bad files.
MAX_CONSECUTIVE_UNREADABLE = 1000


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """The `(left, top, right, bottom)` crop of torchvision's RandomResizedCrop: up to 10 draws of an area fraction
    in `scale` and a log-uniform aspect ratio in `ratio`, then a center crop clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        crop_width = round(math.sqrt(target_area * aspect))
        crop_height = round(math.sqrt(target_area / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return left, top, left + crop_width, top + crop_height
    aspect = width / height
    if aspect < min(ratio):
        crop_width, crop_height = width, round(width / min(ratio))
    elif aspect > max(ratio):
        crop_width, crop_height = round(height * max(ratio)), height
    else:
        crop_width, crop_height = width, height
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


class TrainTransform:
    """Random resized crop to `resolution` (bicubic), optional horizontal flip, normalisation to [-1, 1]."""

    def __init__(
        self,
        resolution: int,
        crop_scale: tuple[float, float] = (0.9, 1.0),
        crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        random_flip: bool = True,
    ):
        self.resolution = resolution
        self.crop_scale = crop_scale
        self.crop_ratio = crop_ratio
        self.random_flip = random_flip

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator) -> torch.Tensor:
        box = random_resized_crop_box(image.width, image.height, rng, self.crop_scale, self.crop_ratio)
        image = image.resize((self.resolution, self.resolution), PIL.Image.Resampling.BICUBIC, box=box)
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        return to_pixel_values(image)[0]


def _try_decode(value) -> PIL.Image.Image | None:
    """`open_image(value)` (an undecoded `datasets` value, a path, bytes or a PIL image), or `None` after logging
    why it is unreadable."""
    try:
        return open_image(value)
    except ValueError as error:
        logger.warning("skipping unreadable image: %s", error)
        return None


class _EpochSeededImages:
    """What both training datasets hold: the source dataset, its image column, the transform, the seed and epoch."""

    def __init__(self, dataset, image_column: str, transform: TrainTransform, seed: int = 0):
        self.dataset = dataset
        self.image_column = image_column
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch


class ImageTrainDataset(_EpochSeededImages, torch.utils.data.Dataset):
    """
    Map-style training images. Item `i` is the first readable image at positions `i, i+1, ...` (wrapping around),
    transformed with draws from `(seed, epoch, i)`; `skipped_images` counts the unreadable files passed over.
    """

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        attempts = min(len(self), MAX_CONSECUTIVE_UNREADABLE)
        for skipped in range(attempts):
            image = _try_decode(self.dataset[(index + skipped) % len(self)][self.image_column])
            if image is not None:
                rng = np.random.default_rng([self.seed, self.epoch, index])
                return {"pixel_values": self.transform(image, rng), "skipped_images": skipped}
        raise RuntimeError(f"no readable image among {attempts} consecutive files from position {index}")


class StreamingImageTrainDataset(_EpochSeededImages, torch.utils.data.IterableDataset):
    """Training images from a streaming `datasets.IterableDataset` (tar shards); unreadable files are skipped and
    counted on the next readable example."""

    def set_epoch(self, epoch: int):
        super().set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        # Each data-loader worker streams its own shards, so the worker id keeps the draws of workers apart.
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        skipped = 0
        for index, example in enumerate(self.dataset):
            image = _try_decode(example[self.image_column])
            if image is None:
                skipped += 1
                if skipped >= MAX_CONSECUTIVE_UNREADABLE:
                    raise RuntimeError(f"{skipped} consecutive unreadable images in the stream")
                continue
            rng = np.random.default_rng([self.seed, self.epoch, worker_id, index])
            yield {"pixel_values": self.transform(image, rng), "skipped_images": skipped}
            skipped = 0


def without_global_rng(batches):
    """Iterate `batches` while restoring the global CPU torch RNG around every fetch.

    Data loaders draw a worker seed from the global RNG whenever an iterator starts (Accelerate's batch dispatcher
    ignores a loader's own generator), and the codebook restarts draw from that same RNG. Keeping the data side out
    of it makes the training's random stream independent of when iterators start, so a run resumed mid-epoch
    continues exactly like an uninterrupted one. The data needs no global draws: its randomness is per example.
    """
    with torch.random.fork_rng(devices=[]):
        iterator = iter(batches)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch


def collate_images(examples: list[dict]) -> dict:
    """Stack `pixel_values` `(B, 3, H, W)` and the per-example `skipped_images` counts `(B,)` (per example, so
    Accelerate can split a batch between processes)."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "skipped_images": torch.tensor([example["skipped_images"] for example in examples]),
    }


def expand_shard_pattern(pattern: str) -> list[str]:
    """Expand webdataset brace ranges: `"cc12m-{0000..0002}.tar"` -> `["cc12m-0000.tar", ..., "cc12m-0002.tar"]`
    (zero padding kept, several ranges allowed). Other patterns are returned as they are (`datasets` globs them)."""
    ranges = re.findall(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not ranges:
        return [pattern]
    template = re.sub(r"\{\d+\.\.\d+\}", "{}", pattern)
    choices = [[str(n).zfill(len(start)) for n in range(int(start), int(end) + 1)] for start, end in ranges]
    return [template.format(*combination) for combination in itertools.product(*choices)]


def load_image_dataset(
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_shards: list[str] | None = None,
    cache_dir: str | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """The training split of exactly one source: an image folder, a named dataset, or tar shards (streamed)."""
    sources = [source for source in (train_data_dir, dataset_name, train_shards) if source]
    if len(sources) != 1:
        raise ValueError("give exactly one of --train_data_dir, --dataset_name and --train_shards")
    if train_shards:
        files = [path for pattern in train_shards for path in expand_shard_pattern(pattern)]
        return datasets.load_dataset("webdataset", data_files={"train": files}, split="train", streaming=True)
    if train_data_dir:
        return datasets.load_dataset("imagefolder", data_dir=train_data_dir, split="train", cache_dir=cache_dir)
    return datasets.load_dataset(dataset_name, dataset_config_name, split="train", cache_dir=cache_dir)


def resolve_image_column(dataset, image_column: str) -> str:
    """`image_column` if the dataset has it, else the first webdataset image extension column present."""
    columns = list(dataset.features or {})
    if image_column in columns:
        return image_column
    for candidate in WEBDATASET_IMAGE_COLUMNS:
        if candidate in columns:
            return candidate
    raise ValueError(f"--image_column {image_column!r} not found; the dataset has columns {columns}")


def undecoded(dataset, image_column: str):
    """The dataset with `image_column` left as bytes/paths, so unreadable files reach our decoder."""
    if isinstance((dataset.features or {}).get(image_column), datasets.Image):
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def first_readable_images(dataset, image_column: str, count: int) -> list[PIL.Image.Image]:
    """Up to `count` readable images from the start of the dataset (validation images)."""
    images = (_try_decode(example[image_column]) for example in dataset)
    return list(itertools.islice((image for image in images if image is not None), count))
