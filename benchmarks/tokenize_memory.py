"""Peak memory of `dualtoken tokenize` over 200 and 2,000 images: streamed (ours: one batch of images in memory, codes
saved batch by batch) against reading every image first (the command before, reproduced here as the baseline).

Each run is a fresh process (`python -m dualtoken_hf tokenize ...`, one torch thread) on a tiny random tokenizer and
generated JPEG photos; its peak resident memory comes from the kernel (`os.wait4`'s `ru_maxrss`). Both variants must
write the same codes.

    python benchmarks/tokenize_memory.py [--counts 200 2000] [--size 256] [--write]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

import harness
from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionConfig, DualTokenVisionModel
from dualtoken_hf.cli.files import load_codes


SECTION = "tokenize memory"
BATCH_SIZE = 8
# The command before streaming: every image decoded first, codes concatenated in memory, one file written at the end.
READ_ALL_FIRST = r"""
import sys, torch
from dualtoken_hf.cli.files import open_images, save_codes
from dualtoken_hf.hub.folders import load_image_processor, load_tokenizer

model, output, batch_size, *paths = sys.argv[1:]
images = open_images(paths)
tokenizer = load_tokenizer(model)
image_processor = load_image_processor(model, tokenizer.config)
pixel_codes, semantic_codes = [], []
with torch.no_grad():
    for start in range(0, len(images), int(batch_size)):
        batch = image_processor(images[start : start + int(batch_size)], return_tensors="pt").pixel_values
        encoded = tokenizer.encode(batch)
        pixel_codes.append(encoded.pixel_codes)
        semantic_codes.append(encoded.semantic_codes)
save_codes(output, torch.cat(pixel_codes), torch.cat(semantic_codes), paths, model)
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[200, 2000], help="numbers of images")
    parser.add_argument("--size", type=int, default=256, help="side of the generated photos in pixels")
    parser.add_argument("--write", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    return parser.parse_args(argv)


def write_photos(folder: Path, count: int, size: int) -> list[str]:
    """`count` smooth random photos (low-resolution noise upscaled, JPEG), named in order."""
    folder.mkdir(parents=True)
    generator = np.random.default_rng(0)
    paths = []
    for index in range(count):
        small = PIL.Image.fromarray(generator.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        path = folder / f"photo-{index:05d}.jpg"
        small.resize((size, size), PIL.Image.BICUBIC).save(path, quality=90)
        paths.append(str(path))
    return paths


def peak_rss_of(command: list[str]) -> tuple[float, float]:
    """Run `command` to completion; its peak resident memory (MiB) and wall time (s)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} ... failed:\n{stderr.decode()[-2000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def main(args) -> str:
    torch.set_num_threads(1)  # as in the measured processes, so the machine summary says what they ran with
    torch.manual_seed(0)
    rows, peaks = [], []
    with tempfile.TemporaryDirectory(prefix="tokenize-memory-") as scratch:
        scratch = Path(scratch)
        model = scratch / "tokenizer"
        DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).save_pretrained(model)
        DualTokenImageProcessor.from_preset("tiny").save_pretrained(model)
        for count in args.counts:
            folder = scratch / f"photos-{count}"
            paths = write_photos(folder, count, args.size)
            streamed, read_all = scratch / f"streamed-{count}.safetensors", scratch / f"read-all-{count}.safetensors"
            stream_command = [sys.executable, "-m", "dualtoken_hf", "tokenize", "--model", str(model), str(folder),
                              "--output", str(streamed), "--batch-size", str(BATCH_SIZE), "--device", "cpu"]
            baseline_command = [sys.executable, "-c", READ_ALL_FIRST, str(model), str(read_all), str(BATCH_SIZE),
                                *paths]
            stream_rss, stream_s = peak_rss_of(stream_command)
            baseline_rss, baseline_s = peak_rss_of(baseline_command)
            ours, theirs = load_codes(streamed)[0], load_codes(read_all)[0]
            if not all(torch.equal(ours[name], theirs[name]) for name in ours):
                raise RuntimeError(f"the two variants wrote different codes for {count} images")
            rows.append([count, f"{baseline_rss:.0f} MiB", f"{stream_rss:.0f} MiB", f"{baseline_s:.0f} s",
                         f"{stream_s:.0f} s"])
            peaks.append((baseline_rss, stream_rss))
            print(f"{count} images: read all first {baseline_rss:.0f} MiB, streamed {stream_rss:.0f} MiB",
                  file=sys.stderr, flush=True)
    header = ["images", "peak RSS, read all first (before)", "peak RSS, streamed (ours)", "time, before",
              "time, ours"]
    report = "\n\n".join([
        "## `dualtoken tokenize` memory (`benchmarks/tokenize_memory.py`)",
        f"Command: `python benchmarks/tokenize_memory.py --counts {' '.join(map(str, args.counts))} --size "
        f"{args.size}`: a tiny random tokenizer, {args.size}×{args.size} JPEG photos, batches of {BATCH_SIZE}, one "
        "fresh process per run (one torch thread); peak RSS from the kernel (`ru_maxrss`). Both variants wrote "
        "identical codes.",
        harness.machine_summary(),
        harness.markdown_table(header, rows),
        f"From {args.counts[0]} to {args.counts[-1]} images the peak grows by {peaks[-1][1] - peaks[0][1]:.0f} MiB "
        f"streamed and by {peaks[-1][0] - peaks[0][0]:.0f} MiB reading all first (the decoded images). Times are "
        "single runs on a shared machine: a rough guide only.",
    ])
    if args.write:
        harness.replace_section(harness.RESULTS_FILE, SECTION, report)
    return report


if __name__ == "__main__":
    print(main(parse_args()))
