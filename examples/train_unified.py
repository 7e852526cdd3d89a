#!/usr/bin/env python
# Copyright 2025 The DualToken HF authors. Licensed under the Apache License, Version 2.0.
"""Train the unified DualToken model, one of the paper's four stages at a time, with Accelerate.

    accelerate launch examples/train_unified.py --stage align --model_name_or_path dualtoken-init \\
        --data_files captions.jsonl --output_dir dualtoken-align
    accelerate launch examples/train_unified.py --stage generate --model_name_or_path dualtoken-align \\
        --pretokenized_dir captions-codes --output_dir dualtoken-generate

Each stage starts from a unified model folder (`dualtoken init`, or the previous stage's output) and trains what
`dualtoken_hf.training.unified.STAGES` says, with the paper's AdamW learning rate and global batch size as defaults:
`align` the image projector on captioning, `understand` the projector and the LLM on captioning, `generate` the
pixel and semantic heads on text-to-image, `joint` all of them on both. The data are image-caption pairs: JSON /
JSON Lines / parquet files with an image and a text column (`--data_files`), or a dataset written by
`examples/pretokenize.py` (`--pretokenized_dir`; the vision tokenizer then does not run). Every pair gives one
example per task of the stage.

Every loss term (`loss`, `text_loss`, `pixel_loss`, `semantic_loss`) is logged per optimiser step to
`<output_dir>/logs/train_unified.jsonl` (and `--report_to`). Checkpoints hold the full Accelerate state and the
data position, written atomically; `--resume_from_checkpoint latest` continues exactly where the run stopped. A step
whose loss is NaN or infinite on any process is skipped and counted. The final folder is a complete unified model
folder (weights, processor, remote code, model card), the start of the next stage.
"""

import argparse
import json
import logging
import math
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from tqdm.auto import tqdm

from dualtoken_hf.cli.parser import non_negative_int, positive_float, positive_int
from dualtoken_hf.hub import CardDetails
from dualtoken_hf.hub.folders import load_processor, load_unified
from dualtoken_hf.hub.writing import save_unified_folder
from dualtoken_hf.training import (
    JSONLinesTracker,
    NonFiniteGuard,
    TrainingState,
    claim_output_dir,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    warmup_warning,
    without_global_rng,
)
from dualtoken_hf.training.unified import (
    STAGES,
    CaptionPairsDataset,
    SequenceBuilder,
    apply_stage,
    collate_sequences,
    data_files_builder,
)
from dualtoken_hf.training.weights_only import check_weights_only


logger = get_logger(__name__)

LOSS_TERMS = ("loss", "text_loss", "pixel_loss", "semantic_loss")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=list(STAGES), required=True)
    parser.add_argument("--model_name_or_path", required=True,
                        help="The unified model folder to start from (`dualtoken init`, or the previous stage's).")

    data = parser.add_argument_group("data")
    data.add_argument("--data_files", nargs="+", help="Image-caption pairs: JSON / JSON Lines / parquet files.")
    data.add_argument("--pretokenized_dir", help="A dataset written by examples/pretokenize.py (its --output_dir).")
    data.add_argument("--image_column", default="image")
    data.add_argument("--text_column", default="text")
    data.add_argument("--image_root", help="Folder of relative image paths (default: that of the first data file).")
    data.add_argument("--cache_dir", help="datasets cache folder.")
    data.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)

    training = parser.add_argument_group("training (defaults: the stage's, from the paper)")
    training.add_argument("--output_dir", required=True)
    training.add_argument("--seed", type=non_negative_int, default=0)
    training.add_argument("--learning_rate", type=positive_float, default=None,
                          help="AdamW peak learning rate. Stages: " +
                               ", ".join(f"{name}: {stage.learning_rate}" for name, stage in STAGES.items()) + ".")
    training.add_argument("--total_batch_size", type=positive_int, default=None,
                          help="Examples per optimiser step over all processes and accumulation steps. Stages: " +
                               ", ".join(f"{name}: {stage.batch_size}" for name, stage in STAGES.items()) + ".")
    training.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    training.add_argument("--adam_weight_decay", type=float, default=0.0)
    schedules = [kind.value for kind in SchedulerType if kind is not SchedulerType.PIECEWISE_CONSTANT]
    training.add_argument("--lr_scheduler", default="constant", choices=schedules)
    training.add_argument("--lr_warmup_steps", type=non_negative_int, default=0)
    training.add_argument("--max_grad_norm", type=positive_float, default=None)
    training.add_argument("--num_train_epochs", type=positive_int, default=1)
    training.add_argument("--max_train_steps", type=positive_int, default=None,
                          help="Optimiser steps; overrides --num_train_epochs.")
    training.add_argument("--gradient_checkpointing", action="store_true")
    training.add_argument("--mixed_precision", choices=["no", "bf16"], default=None,
                          help="Defaults to the accelerate config.")
    training.add_argument("--checkpointing_steps", type=positive_int, default=500)
    training.add_argument("--checkpoints_total_limit", type=positive_int, default=None)
    training.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder.")
    training.add_argument("--max_consecutive_nonfinite", type=positive_int, default=10)
    training.add_argument("--report_to", default="jsonl",
                          help="Comma-separated trackers besides <output_dir>/logs/train_unified.jsonl (always "
                               "written): tensorboard, wandb, ... or all.")

    args = parser.parse_args(argv)
    if (args.data_files is None) == (args.pretokenized_dir is None):
        parser.error("give exactly one of --data_files and --pretokenized_dir")
    if args.data_files:
        try:
            data_files_builder(args.data_files)
        except ValueError as error:
            parser.error(f"--data_files: {error}")
    return args


def load_pairs(args) -> datasets.Dataset:
    if args.pretokenized_dir:
        return datasets.load_dataset("parquet", data_dir=str(Path(args.pretokenized_dir) / "data"), split="train",
                                     cache_dir=args.cache_dir)
    pairs = datasets.load_dataset(data_files_builder(args.data_files), data_files={"train": args.data_files},
                                  split="train", cache_dir=args.cache_dir)
    if isinstance(pairs.features.get(args.image_column), datasets.Image):
        pairs = pairs.cast_column(args.image_column, datasets.Image(decode=False))
    return pairs


def per_process_batch_size(total: int, accelerator: Accelerator, accumulation: int) -> int:
    share = accelerator.num_processes * accumulation
    if total % share:
        raise ValueError(f"--total_batch_size {total} must be a multiple of processes × accumulation steps "
                         f"({accelerator.num_processes} × {accumulation} = {share})")
    return total // share


def step_logs(accelerator, micro_batch_logs: list[dict], state: TrainingState) -> dict[str, float]:
    """Each logged value averaged over the micro-batches of the step and over processes."""
    names = list(micro_batch_logs[0])
    means = torch.stack([torch.stack([log[name] for log in micro_batch_logs]).mean() for name in names])
    means = accelerator.reduce(means, reduction="mean")
    logs = {name: value.item() for name, value in zip(names, means)}
    logs["data/skipped_images"] = state.skipped_images
    return logs


def save_and_prune_checkpoint(accelerator, args, state: TrainingState):
    path = save_checkpoint(accelerator, args.output_dir, state)
    if accelerator.is_main_process:
        logger.info(f"saved {path}")
        for folder in prune_checkpoints(args.output_dir, args.checkpoints_total_limit):
            logger.info(f"removed old checkpoint {folder}")
    accelerator.wait_for_everyone()


def main(args: argparse.Namespace) -> dict:
    stage = STAGES[args.stage]
    output_dir = Path(args.output_dir)
    set_seed(args.seed)
    model = load_unified(args.model_name_or_path)
    processor = load_processor(args.model_name_or_path)
    trained_names = apply_stage(model, stage)

    logging_dir = output_dir / "logs"
    jsonl_tracker = JSONLinesTracker("train_unified", logging_dir)
    trackers = [jsonl_tracker] + [name for name in args.report_to.split(",") if name and name != "jsonl"]
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # A joint-stage batch with no text-to-image example leaves the heads out of the graph.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=len(stage.tasks) > 1)],
    )
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
    output_lock = claim_output_dir(accelerator, output_dir)
    try:
        logger.info(f"stage {stage.name}: training {len(trained_names)} parameter tensors of {stage.trains}")
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        learning_rate = args.learning_rate or stage.learning_rate
        optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad],
                                      lr=learning_rate, weight_decay=args.adam_weight_decay)

        builder = SequenceBuilder(processor)
        image_root = args.image_root or (Path(args.data_files[0]).parent if args.data_files else ".")
        with accelerator.main_process_first():
            pairs = load_pairs(args)
        train_dataset = CaptionPairsDataset(pairs, stage.tasks, builder, args.image_column, args.text_column,
                                            image_root)
        total_batch_size = args.total_batch_size or stage.batch_size
        batch_size = per_process_batch_size(total_batch_size, accelerator, args.gradient_accumulation_steps)
        if len(train_dataset) < batch_size * accelerator.num_processes:
            raise ValueError(f"{len(train_dataset)} training examples cannot fill one batch of {batch_size} on each "
                             f"of {accelerator.num_processes} processes; lower --total_batch_size")
        pad_token_id = processor.tokenizer.pad_token_id
        train_dataloader = torch.utils.data.DataLoader(
            train_dataset, batch_size=batch_size, shuffle=True, drop_last=True,
            collate_fn=lambda examples: collate_sequences(examples, pad_token_id),
            num_workers=args.dataloader_num_workers,
        )
        if args.max_train_steps is None:
            batches_per_process = len(train_dataloader) / accelerator.num_processes
            args.max_train_steps = args.num_train_epochs * math.ceil(batches_per_process /
                                                                     args.gradient_accumulation_steps)
        warning = warmup_warning(args.lr_warmup_steps, args.max_train_steps)
        if warning and args.lr_scheduler != "constant":
            logger.warning(warning)
        # Prepared schedulers step once per process (Accelerate's convention), hence the factor.
        lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                     num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                     num_training_steps=args.max_train_steps * accelerator.num_processes)
        model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            model, optimizer, train_dataloader, lr_scheduler
        )
        accelerator.init_trackers("train_unified", config={
            key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in vars(args).items()
        })

        state = TrainingState()
        checkpoint = None
        if args.resume_from_checkpoint:
            checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
        if checkpoint is not None:
            check_weights_only(checkpoint)
            accelerator.load_state(str(checkpoint))
            state = TrainingState.load(checkpoint)
            logger.info(f"resumed from {checkpoint} at step {state.global_step}")
        if args.resume_from_checkpoint and accelerator.is_main_process:
            jsonl_tracker.truncate(state.global_step)

        logger.info(f"training {args.max_train_steps} steps of {total_batch_size} examples at lr {learning_rate}")
        progress_bar = tqdm(range(args.max_train_steps), initial=state.global_step, desc=f"stage {stage.name}",
                            disable=not accelerator.is_local_main_process)
        nonfinite_guard = NonFiniteGuard([], args.max_consecutive_nonfinite)
        trained_parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        logs, micro_batch_logs = {}, []
        while state.global_step < args.max_train_steps:
            train_dataloader.set_epoch(state.epoch)
            batches = (accelerator.skip_first_batches(train_dataloader, state.batches_in_epoch)
                       if state.batches_in_epoch else train_dataloader)
            for batch in without_global_rng(batches):
                skipped_images = batch.pop("skipped_images")
                nonfinite_guard.before_forward()
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        outputs = model(**batch)
                    accelerator.backward(outputs.loss)
                nonfinite_guard.observe(outputs.loss)
                micro_batch_logs.append({f"loss/{name}": getattr(outputs, name).detach().float()
                                         for name in LOSS_TERMS})
                state.skipped_images += int(skipped_images.sum())
                state.batches_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue

                state.global_step += 1
                if not nonfinite_guard.skip_step(accelerator, state):
                    if args.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(trained_parameters, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                logs = step_logs(accelerator, micro_batch_logs, state)
                micro_batch_logs = []
                logs["train/learning_rate"] = lr_scheduler.get_last_lr()[0]
                logs["train/nonfinite_steps"] = state.nonfinite_steps
                accelerator.log(logs, step=state.global_step)
                progress_bar.update(1)
                progress_bar.set_postfix(loss=logs["loss/loss"])
                if state.global_step % args.checkpointing_steps == 0:
                    save_and_prune_checkpoint(accelerator, args, state)
                if state.global_step >= args.max_train_steps:
                    break
            else:
                if state.batches_in_epoch == 0:
                    raise RuntimeError("the training data produced no batch")
                state.epoch += 1
                state.batches_in_epoch = 0

        accelerator.wait_for_everyone()
        summary = {"stage": stage.name, "global_step": state.global_step, "skipped_images": state.skipped_images,
                   "nonfinite_steps": state.nonfinite_steps, "num_processes": accelerator.num_processes,
                   "trained_parameters": trained_names, "last_logs": logs}
        if accelerator.is_main_process:
            card = CardDetails(
                origin=f"Stage {stage.name!r} of `examples/train_unified.py` of `dualtoken_hf`.",
                facts={"stage": f"{stage.name} (trains {', '.join(stage.trains)})",
                       "started from": args.model_name_or_path,
                       "optimiser steps": state.global_step,
                       "examples per step": total_batch_size,
                       "learning rate": f"{learning_rate} (AdamW, {args.lr_warmup_steps} warmup steps, "
                                        f"{args.lr_scheduler})",
                       "training data": args.pretokenized_dir or " ".join(args.data_files)},
                base_model=args.model_name_or_path,
            )
            save_unified_folder(accelerator.unwrap_model(model), processor, output_dir, card=card)
            (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.end_training()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return summary
    finally:
        if output_lock is not None:
            output_lock.release()


if __name__ == "__main__":
    main(parse_args())
