#!/usr/bin/env python
# Copyright 2025 The DualToken HF authors. Licensed under the Apache License, Version 2.0.
"""Fine-tune a trained unified DualToken model with PEFT LoRA adapters: a new generation style or a captioning domain.

    accelerate launch examples/finetune_lora.py --model_name_or_path dualtoken-joint --tasks generate --lora_heads \\
        --data_files watercolours.jsonl --output_dir dualtoken-watercolour-lora \\
        --push_to_hub --hub_model_id me/dualtoken-watercolour-lora

The base model stays frozen; LoRA adapters go on every linear layer of the LLM (attention and MLP projections) and,
with `--lora_heads`, of the pixel and semantic depth heads and their generation projectors if the model has them (a
small, shareable style adapter). The data and the training loop are those of `examples/train_unified.py`
(`dualtoken_hf.training.unified`): image-caption pairs or a pretokenized dataset, used for the `--tasks` given
(`generate`: text-to-image, with caption dropout for guidance; `caption`: captioning), checkpoints with exact
`--resume_from_checkpoint`, every loss term logged.

The output folder holds the adapter (`adapter_config.json`, `adapter_model.safetensors`) and its model card; load it
with `PeftModel.from_pretrained(base_model, folder)`.
"""

import argparse
import json
from pathlib import Path

from accelerate.logging import get_logger
from accelerate.utils import set_seed
from peft import LoraConfig, PeftModel, get_peft_model

from dualtoken_hf.cli.parser import positive_float, positive_int
from dualtoken_hf.hub import CardDetails
from dualtoken_hf.hub.cards import write_lora_card
from dualtoken_hf.hub.folders import load_processor, load_unified
from dualtoken_hf.training.unified import (
    TASKS,
    PairsTrainer,
    add_data_arguments,
    add_hub_arguments,
    add_training_arguments,
    check_data_arguments,
    check_hub_arguments,
    describe_training_data,
    lora_target_modules,
    push_output_dir,
)


logger = get_logger(__name__)

LEARNING_RATE = 1e-4
TOTAL_BATCH_SIZE = 16
TASK_NAMES = {"generate": "text-to-image", "caption": "captioning", "chat": "image chat"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", required=True, help="The trained unified model folder to adapt.")
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=["generate"],
                        help="What each image-caption pair trains: text-to-image (a generation style), captioning "
                             "(a captioning domain), or both.")

    lora = parser.add_argument_group("LoRA")
    lora.add_argument("--lora_rank", type=positive_int, default=16)
    lora.add_argument("--lora_alpha", type=positive_float, default=32.0)
    lora.add_argument("--lora_dropout", type=float, default=0.05)
    lora.add_argument("--lora_heads", action="store_true",
                      help="Also adapt the linear layers of the pixel and semantic depth heads and of their "
                           "generation projectors if the model has them (needs --tasks generate: only text-to-image "
                           "trains them).")

    add_data_arguments(parser)
    add_training_arguments(parser, learning_rate_help=f"AdamW learning rate (default {LEARNING_RATE}).",
                           batch_size_help="Examples per optimiser step over all processes and accumulation steps "
                                           f"(default {TOTAL_BATCH_SIZE}).",
                           log_name="finetune_lora")
    add_hub_arguments(parser)

    args = parser.parse_args(argv)
    args.tasks = tuple(dict.fromkeys(args.tasks))
    check_data_arguments(parser, args, args.tasks)
    if not 0 <= args.lora_dropout < 1:
        parser.error(f"--lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.lora_heads and "generate" not in args.tasks:
        parser.error(f"--lora_heads adapts the depth heads, which only text-to-image trains; --tasks are "
                     f"{list(args.tasks)}")
    check_hub_arguments(parser, args)
    return args


def main(args: argparse.Namespace) -> tuple[PeftModel, dict]:
    """Train and save the adapter; returns the adapted model (in memory) and the run's summary."""
    output_dir = Path(args.output_dir)
    set_seed(args.seed)
    model = load_unified(args.model_name_or_path)
    processor = load_processor(args.model_name_or_path)
    model.requires_grad_(False)
    groups = ("language_model",)
    if args.lora_heads:
        projectors = ("generation_projectors",) if model.config.generation_projector else ()
        groups += (*projectors, "pixel_head", "semantic_head")
    lora_config = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=lora_target_modules(model, groups))
    model = get_peft_model(model, lora_config)

    with PairsTrainer(args, "finetune_lora", find_unused_parameters=len(args.tasks) > 1) as trainer:
        trained, total = model.get_nb_trainable_parameters()
        logger.info(f"LoRA on {', '.join(groups)}: training {trained} of {total} parameters")
        result = trainer.train(model, processor, args.tasks, args.learning_rate or LEARNING_RATE,
                               args.total_batch_size or TOTAL_BATCH_SIZE, description="LoRA")
        state = result.state
        model = trainer.accelerator.unwrap_model(result.model)
        summary = {"tasks": list(args.tasks), "adapted": list(groups), "global_step": state.global_step,
                   "trained_parameters": trained, "skipped_images": state.skipped_images,
                   "nonfinite_steps": state.nonfinite_steps, "num_processes": trainer.accelerator.num_processes,
                   "last_logs": result.logs}
        if trainer.accelerator.is_main_process:
            model.save_pretrained(output_dir)
            card = CardDetails(
                origin=f"Trained with `examples/finetune_lora.py` of `dualtoken_hf` on "
                       f"{' and '.join(TASK_NAMES[task] for task in args.tasks)}.",
                facts={"adapted modules": ", ".join(groups),
                       "trained parameters": f"{trained} of {total}",
                       "optimiser steps": state.global_step,
                       "examples per step": result.total_batch_size,
                       "learning rate": f"{result.learning_rate} (AdamW, {args.lr_scheduler})",
                       "caption dropout": args.caption_dropout,
                       "training data": describe_training_data(args)},
                repo_id=args.hub_model_id,
                base_model=args.model_name_or_path,
            )
            write_lora_card(output_dir, model.peft_config["default"], card)
            (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
            if args.push_to_hub:
                push_output_dir(args, commit_message="Upload LoRA adapter")
        trainer.end()
    return model, summary


if __name__ == "__main__":
    main(parse_args())
