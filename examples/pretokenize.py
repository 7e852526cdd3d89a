#!/usr/bin/env python
# Copyright 2025 The DualToken HF authors. Licensed under the Apache License, Version 2.0.
"""Encode an image or image-text dataset into pixel and semantic codes with a trained DualToken tokenizer.

    accelerate launch --num_processes 8 examples/pretokenize.py \\
        --tokenizer_model_name_or_path dualtoken-tokenizer --data_files captions.jsonl \\
        --output_dir captions-codes --batch_size 64

Sources (through `datasets`): an image folder (`--train_data_dir`, with an optional `metadata.jsonl` for captions),
JSON/JSON Lines or parquet files (`--data_files`; an image column of paths, relative ones read from `--image_root`,
or of `datasets` images), webdataset tar shards (`--train_shards "cc12m-{0000..2175}.tar"`: brace ranges expand;
read with `datasets`' `webdataset` builder, which first converts them to its Arrow cache under `--cache_dir`), or a
named dataset (`--dataset_name`). The image column is `--image_column` (`image`), or when the data has none the
first of `jpg`/`jpeg`/`png`/`webp` it has: a webdataset sample's files become columns named by their extension
(`000.png` -> `png`, `000.txt` -> `txt` as a string, `000.json` -> `json` as a struct, `000.cls` -> `cls` as an
int, plus `__key__` and `__url__`, the sample's name and shard).

Each process encodes its own contiguous shard (`dataset.shard(num_shards=num_processes, index=rank)`) in chunks of
`--chunk_size` rows, and writes each chunk as one parquet file,
`<output_dir>/data/train-<rank>-of-<num_processes>-<chunk>.parquet`, with the columns

- `pixel_codes`, `semantic_codes`: the codes `(h, w, D)` of one image, flattened (row-major) to a list of ints;
- `pixel_shape`, `semantic_shape`: that `[h, w, D]`;
- every column of the source but its images, copied unchanged with its name and `datasets` type (a caption
  `text` or `txt`, a `label`, the `conversations` or `messages` of chat data, a webdataset `json` struct, ...):
  train on a webdataset caption with `examples/train_unified.py --text_column txt`.

Sorted by name, the files hold the readable rows in the source's order. Read them back with
`datasets.load_dataset("parquet", data_dir="<output_dir>/data", split="train")` and
`torch.tensor(row["pixel_codes"]).view(row["pixel_shape"])`.

Images are opened with the package's one opener (`open_image`); an unreadable one is skipped, logged and counted.
Interruptions: a chunk file appears only once complete (written aside, then renamed), so a rerun with the same
arguments skips the finished chunks of every shard and encodes the rest; the settings that decide the contents
(tokenizer, source, its size and copied columns with their types, number of processes, chunk size) are recorded
and a rerun with other ones is refused.
At the end `<output_dir>/pretokenize.json` gives the totals (rows written, images skipped).
"""

import argparse
import json
import logging
import math
import os
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from dualtoken_hf.cli.parser import non_negative_int, positive_int
from dualtoken_hf.hub.folders import load_image_processor, load_tokenizer
from dualtoken_hf.image_processing_dualtoken import open_image
from dualtoken_hf.training import claim_output_dir, resolve_image_column, undecoded
from dualtoken_hf.training.data import expand_shard_pattern
from dualtoken_hf.training.unified import data_files_builder, image_source


logger = get_logger(__name__)

SETTINGS_FILE = "settings.json"
SUMMARY_FILE = "pretokenize.json"
BRANCHES = ("pixel", "semantic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer_model_name_or_path", required=True,
                        help="A trained DualToken tokenizer folder (or a unified model folder: its tokenizer is used).")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", help="A folder of images (datasets' imagefolder; metadata.jsonl for text).")
    data.add_argument("--data_files", nargs="+",
                      help="JSON / JSON Lines / parquet files (one kind), with an image column of paths or images.")
    data.add_argument("--train_shards", nargs="+",
                      help="Webdataset tar shards; brace ranges such as 'cc12m-{0000..2175}.tar' expand.")
    data.add_argument("--dataset_name", help="A dataset on the Hub or a local dataset folder / script.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--split", default="train")
    data.add_argument("--image_column", default="image",
                      help="Image column (if absent, the first of jpg/jpeg/png/webp present, as in tar shards). "
                           "Every other column but images is copied next to the codes.")
    data.add_argument("--image_root",
                      help="Folder that relative image paths are read from (default: the folder of the first of "
                           "--data_files).")
    data.add_argument("--cache_dir", help="datasets cache folder.")

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", required=True)
    run.add_argument("--batch_size", type=positive_int, default=32, help="Images encoded at once, per process.")
    run.add_argument("--chunk_size", type=positive_int, default=10_000,
                     help="Rows per output file: the unit of resumption.")
    run.add_argument("--dataloader_num_workers", type=non_negative_int, default=0,
                     help="Processes that open and preprocess images, per encoding process.")

    args = parser.parse_args(argv)
    sources = [args.train_data_dir, args.data_files, args.train_shards, args.dataset_name]
    if sum(source is not None for source in sources) != 1:
        parser.error("give exactly one of --train_data_dir, --data_files, --train_shards and --dataset_name")
    if args.data_files:
        try:
            data_files_builder(args.data_files)
        except ValueError as error:
            parser.error(f"--data_files: {error}")
    return args


def load_source(args) -> tuple[datasets.Dataset, str]:
    """The split to encode and its image column, left undecoded (so unreadable files reach `open_image`)."""
    if args.train_data_dir:
        dataset = datasets.load_dataset("imagefolder", data_dir=args.train_data_dir, split=args.split,
                                        cache_dir=args.cache_dir)
    elif args.data_files:
        dataset = datasets.load_dataset(data_files_builder(args.data_files), data_files={args.split: args.data_files},
                                        split=args.split, cache_dir=args.cache_dir)
    elif args.train_shards:
        shards = [path for pattern in args.train_shards for path in expand_shard_pattern(pattern)]
        dataset = datasets.load_dataset("webdataset", data_files={args.split: shards}, split=args.split,
                                        cache_dir=args.cache_dir)
    else:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.split,
                                        cache_dir=args.cache_dir)
    image_column = resolve_image_column(dataset, args.image_column)
    return undecoded(dataset, image_column), image_column


def copied_features(dataset: datasets.Dataset, image_column: str) -> dict:
    """The source columns written next to the codes, with their types: all but the images."""
    return {name: feature for name, feature in dataset.features.items()
            if name != image_column and not isinstance(feature, datasets.Image)}


def image_root_of(args) -> Path:
    if args.image_root is not None:
        return Path(args.image_root)
    return Path(args.data_files[0]).parent if args.data_files else Path.cwd()


def output_features(copied: dict) -> datasets.Features:
    """The codes and shapes of both branches, then the copied source columns."""
    features = {}
    for branch in BRANCHES:
        features[f"{branch}_codes"] = datasets.List(datasets.Value("int32"))
        features[f"{branch}_shape"] = datasets.List(datasets.Value("int32"))
    return datasets.Features({**features, **copied})


class BatchOpener:
    """Collate rows into pixel values: open each image with `open_image`, skip (log and count) unreadable ones."""

    def __init__(self, image_processor, image_column: str, copied_columns: list[str], image_root: Path):
        self.image_processor = image_processor
        self.image_column = image_column
        self.copied_columns = copied_columns
        self.image_root = image_root

    def __call__(self, rows: list[dict]) -> dict:
        images, copied, skipped = [], {name: [] for name in self.copied_columns}, 0
        for row in rows:
            try:
                images.append(open_image(image_source(row[self.image_column], self.image_root)))
            except ValueError as error:
                # A plain logger: this runs in data-loader workers too, where Accelerate's logger has no state.
                logging.getLogger(__name__).warning("skipping unreadable image: %s", error)
                skipped += 1
                continue
            for name in self.copied_columns:
                copied[name].append(row[name])
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"] if images else None
        return {"pixel_values": pixel_values, "copied": copied, "rows": len(rows), "skipped_images": skipped}


def check_settings(accelerator: Accelerator, progress_dir: Path, settings: dict):
    """Record the settings of a new run; refuse to continue a run that was started with other ones."""
    path = progress_dir / SETTINGS_FILE
    if accelerator.is_main_process and not path.is_file():
        path.write_text(json.dumps(settings, indent=2))
    accelerator.wait_for_everyone()
    recorded = json.loads(path.read_text())
    changed = {name: (recorded.get(name), value) for name, value in settings.items() if recorded.get(name) != value}
    if changed:
        differences = ", ".join(f"{name}: {old!r} then, {new!r} now" for name, (old, new) in changed.items())
        raise ValueError(
            f"{str(progress_dir.parent)!r} holds a pretokenization started with other settings ({differences}); "
            "rerun with the same arguments to resume, or use a fresh --output_dir"
        )


@torch.inference_mode()
def encode_chunk(tokenizer, rows: datasets.Dataset, opener: BatchOpener, args, device, progress) -> tuple[dict, int]:
    """The output columns of one chunk of rows, and the number of unreadable images skipped in it."""
    columns = {f"{branch}_{kind}": [] for branch in BRANCHES for kind in ("codes", "shape")}
    columns.update({name: [] for name in opener.copied_columns})
    skipped = 0
    batches = torch.utils.data.DataLoader(rows, batch_size=args.batch_size, collate_fn=opener,
                                          num_workers=args.dataloader_num_workers)
    for batch in batches:
        skipped += batch["skipped_images"]
        if batch["pixel_values"] is not None:
            output = tokenizer.encode(batch["pixel_values"].to(device), codes_only=True)
            for branch in BRANCHES:
                codes = getattr(output, f"{branch}_codes").cpu()
                columns[f"{branch}_codes"].extend(codes.flatten(1).tolist())
                columns[f"{branch}_shape"].extend([list(codes.shape[1:])] * len(codes))
            for name, values in batch["copied"].items():
                columns[name].extend(values)
        progress.update(batch["rows"])
    return columns, skipped


def write_chunk(columns: dict, features: datasets.Features, path: Path):
    """Write one chunk file atomically: it exists only once complete."""
    partial = path.with_name(f".{path.name}.partial")
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(partial))
    os.replace(partial, path)


def summarize(progress_dir: Path, data_dir: Path) -> dict:
    """Totals over the chunk records of all processes."""
    records = [json.loads(path.read_text()) for path in sorted(progress_dir.glob("train-*.json"))]
    return {
        "rows": sum(record["rows"] for record in records),
        "skipped_images": sum(record["skipped_images"] for record in records),
        "chunks": len(records),
        "data_dir": str(data_dir),
    }


def main(args: argparse.Namespace) -> dict:
    accelerator = Accelerator()
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    output_dir = Path(args.output_dir)
    data_dir, progress_dir = output_dir / "data", output_dir / "progress"
    lock = claim_output_dir(accelerator, output_dir)
    if accelerator.is_main_process:
        data_dir.mkdir(exist_ok=True)
        progress_dir.mkdir(exist_ok=True)
    accelerator.wait_for_everyone()
    try:
        tokenizer = load_tokenizer(args.tokenizer_model_name_or_path).to(accelerator.device)
        image_processor = load_image_processor(args.tokenizer_model_name_or_path, tokenizer.config)
        source, image_column = load_source(args)
        copied = copied_features(source, image_column)
        world, rank = accelerator.num_processes, accelerator.process_index
        check_settings(accelerator, progress_dir, {
            "tokenizer_model_name_or_path": str(Path(args.tokenizer_model_name_or_path).resolve()),
            "source": (args.train_data_dir or args.data_files or args.train_shards
                       or [args.dataset_name, args.dataset_config_name]),
            "split": args.split,
            "rows": len(source),
            "image_column": image_column,
            "columns": datasets.Features(copied).to_dict(),
            "num_processes": world,
            "chunk_size": args.chunk_size,
        })

        shard = source.shard(num_shards=world, index=rank, contiguous=True)
        opener = BatchOpener(image_processor, image_column, list(copied), image_root_of(args))
        features = output_features(copied)
        num_chunks = math.ceil(len(shard) / args.chunk_size)
        progress = tqdm(total=len(shard), desc="pretokenize", disable=not accelerator.is_local_main_process)
        for chunk in range(num_chunks):
            name = f"train-{rank:05d}-of-{world:05d}-{chunk:05d}"
            start, end = chunk * args.chunk_size, min((chunk + 1) * args.chunk_size, len(shard))
            if (data_dir / f"{name}.parquet").is_file():
                progress.update(end - start)
                continue
            columns, skipped = encode_chunk(tokenizer, shard.select(range(start, end)), opener, args,
                                            accelerator.device, progress)
            rows = len(columns["pixel_codes"])
            # The record is written first: a chunk whose parquet file exists always has its record.
            (progress_dir / f"{name}.json").write_text(json.dumps({"rows": rows, "skipped_images": skipped}))
            write_chunk(columns, features, data_dir / f"{name}.parquet")
            if skipped:
                logger.warning(f"{name}: skipped {skipped} unreadable images", main_process_only=False)
        progress.close()
        accelerator.wait_for_everyone()
        summary = summarize(progress_dir, data_dir)
        if accelerator.is_main_process:
            (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
            logger.info(f"wrote {summary['rows']} rows to {data_dir}, skipped {summary['skipped_images']} "
                        "unreadable images")
        return summary
    finally:
        if lock is not None:
            lock.release()
        accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
