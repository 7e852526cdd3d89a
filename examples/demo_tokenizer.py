#!/usr/bin/env python
# Copyright 2025 The DualToken HF authors. Licensed under the Apache License, Version 2.0.
"""`make demo`: train the tiny DualToken tokenizer on real photos, offline, in a few minutes on 2 CPU cores.

The photos bundled with scikit-image are split into a training folder and held-out photos. The real training script
(`examples/train_tokenizer.py`, called in-process) trains the `tiny` preset on random crops of the training photos;
the held-out photos are then reconstructed (encode -> pixel codes -> decode) by the untrained and the trained
tokenizer. PSNR/SSIM before and after are printed, and `outputs/demo_reconstructions.png` shows
original | before | after for each held-out photo.

The run uses the paper recipe's loss weights without the perceptual term (LPIPS needs torchvision and VGG weights,
neither installable here) and, by default, without the GAN (in a few hundred CPU steps it costs PSNR), with a
learning rate and warmup sized for a few hundred steps.
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from accelerate.utils import set_seed
from skimage import data

from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionModel
from dualtoken_hf.evaluation import psnr, ssim
from dualtoken_hf.training import save_reconstruction_grid


sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_tokenizer  # noqa: E402  (the example script next to this one)


# Real photographs and scans shipped with scikit-image (no download). `data.cat()` is `chelsea` again, so it is left
# out; grayscale photos are used as RGB.
TRAINING_PHOTOS = (
    "astronaut", "brick", "camera", "cell", "clock", "coins", "colorwheel", "grass", "gravel", "hubble_deep_field",
    "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "text",
)
HELD_OUT_PHOTOS = ("chelsea", "coffee", "rocket")


def load_photo(name: str) -> PIL.Image.Image:
    """A scikit-image photo as an RGB PIL image (alpha dropped, grayscale replicated)."""
    array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return PIL.Image.fromarray(array[..., :3]).convert("RGB")


def shrink(image: PIL.Image.Image, shortest_side: int = 160) -> PIL.Image.Image:
    """Downscale so the shortest side is `shortest_side`: crops of 25-100 % of it still cover the 64 px input, and
    decoding small files keeps the data loader far ahead of the model."""
    scale = shortest_side / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), PIL.Image.Resampling.BICUBIC)


def write_training_folder(folder: Path) -> Path:
    """The training photos as PNG files (both views of the stereo pair count as photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    photos = {name: load_photo(name) for name in TRAINING_PHOTOS}
    for index, view in enumerate(data.stereo_motorcycle()[:2]):
        photos[f"stereo_motorcycle_{index}"] = PIL.Image.fromarray(view)
    for name, photo in photos.items():
        shrink(photo).save(folder / f"{name}.png")
    return folder


@torch.no_grad()
def reconstruct(model: DualTokenVisionModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Images -> pixel codes -> images, clamped to [-1, 1]."""
    model.eval()
    return model.decode(model.encode(pixel_values).pixel_codes).clamp(-1, 1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="outputs", help="Where the grid, the photos and the run go.")
    parser.add_argument("--max_train_steps", type=int, default=500)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--gan_start_step", type=int, default=None,
                        help="Start the GAN here (default: never; in a few hundred CPU steps it costs PSNR).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_threads", type=int, default=1,
                        help="Torch threads; 1 is fastest for this tiny model on a shared 2-core machine.")
    return parser.parse_args()


def main(args: argparse.Namespace):
    torch.set_num_threads(args.num_threads)
    output_dir = Path(args.output_dir)
    run_dir = output_dir / "demo_tokenizer"
    train_args = train_tokenizer.parse_args([
        "--preset", "tiny",
        "--train_data_dir", str(write_training_folder(output_dir / "demo_photos")),
        "--cache_dir", str(output_dir / "demo_datasets_cache"),
        "--output_dir", str(run_dir),
        "--seed", str(args.seed),
        "--max_train_steps", str(args.max_train_steps),
        "--train_batch_size", str(args.train_batch_size),
        "--learning_rate", str(args.learning_rate),
        "--lr_warmup_steps", "50",
        "--gan_start_step", str(args.gan_start_step if args.gan_start_step is not None else args.max_train_steps),
        "--perceptual_loss", "none",  # LPIPS needs torchvision and VGG weights, neither installable here
        "--crop_scale_min", "0.25",  # more varied crops than the official 0.9-1, from only 19 photos
        "--checkpointing_steps", str(args.max_train_steps + 1),  # no checkpoint: the final folder is enough
        "--validation_steps", str(args.max_train_steps),
    ])

    processor = DualTokenImageProcessor.from_preset("tiny")
    held_out = processor([load_photo(name) for name in HELD_OUT_PHOTOS], return_tensors="pt").pixel_values
    set_seed(args.seed)  # the same initial tokenizer the training script builds
    before = reconstruct(train_tokenizer.build_tokenizer(train_args), held_out)

    start = time.perf_counter()
    train_tokenizer.main(train_args)
    training_seconds = time.perf_counter() - start
    after = reconstruct(DualTokenVisionModel.from_pretrained(run_dir, use_safetensors=True), held_out)

    scores = {
        label: (psnr(images, held_out, data_range=2.0), ssim((images + 1) / 2, (held_out + 1) / 2, data_range=1.0))
        for label, images in (("before", before), ("after", after))
    }
    print(f"\ntrained {args.max_train_steps} steps in {training_seconds:.0f} s; held-out photos "
          f"({', '.join(HELD_OUT_PHOTOS)}), {held_out.shape[-1]} px:")
    print(f"{'photo':<10} {'PSNR before':>12} {'PSNR after':>11} {'SSIM before':>12} {'SSIM after':>11}")
    for index, name in enumerate(HELD_OUT_PHOTOS):
        print(f"{name:<10} {scores['before'][0][index]:12.2f} {scores['after'][0][index]:11.2f} "
              f"{scores['before'][1][index]:12.3f} {scores['after'][1][index]:11.3f}")
    print(f"{'mean':<10} {scores['before'][0].mean():12.2f} {scores['after'][0].mean():11.2f} "
          f"{scores['before'][1].mean():12.3f} {scores['after'][1].mean():11.3f}")
    grid = save_reconstruction_grid([held_out, before, after], output_dir / "demo_reconstructions.png", scale=4)
    print(f"original | before | after: {grid}")


if __name__ == "__main__":
    main(parse_args())
