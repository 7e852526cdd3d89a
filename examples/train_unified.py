#!/usr/bin/env python
# Copyright 2025 The DualToken HF authors. Licensed under the Apache License, Version 2.0.
"""Train the unified DualToken model, one of the paper's four stages at a time, with Accelerate.

    accelerate launch examples/train_unified.py --stage align --llm_model_name_or_path SmolLM2-135M \\
        --tokenizer_model_name_or_path dualtoken-tokenizer --data_files captions.jsonl --output_dir dualtoken-align
    accelerate launch examples/train_unified.py --stage generate --model_name_or_path dualtoken-align \\
        --pretokenized_dir captions-codes --output_dir dualtoken-generate
    accelerate launch examples/train_unified.py --stage joint --model_name_or_path dualtoken-generate \\
        --pretokenized_dir captions-codes --chat_pretokenized_dir llava-codes \\
        --task_ratios caption=1,generate=2,chat=1 --output_dir dualtoken-joint

Each stage starts from a unified model folder (`dualtoken init`, or the previous stage's output), or from a causal LM
and a trained tokenizer folder assembled into a new unified model (`--llm_model_name_or_path`,
`--tokenizer_model_name_or_path`, `--preset` sizing the new depth heads, as `dualtoken init` does), and trains what
`dualtoken_hf.training.unified.STAGES` says, with the paper's AdamW learning rate and global batch size as defaults:
`align` the image projector on captioning, `understand` the projector and the LLM on captioning and/or image chats,
`generate` the pixel and semantic heads on text-to-image, `joint` all of them on all three.

The data are image-caption pairs, used for captioning and text-to-image: JSON / JSON Lines / parquet files with an
image and a text column (`--data_files`), or a dataset written by `examples/pretokenize.py` (`--pretokenized_dir`;
the vision tokenizer then does not run); and image chats (`--chat_files`, or pretokenized `--chat_pretokenized_dir`):
rows with an image and a conversation about it, LLaVA's `conversations` (`{"from": "human"|"gpt", "value":
"<image>\\nWhat is in this image?"}`) or `messages` (`{"role": "user"|"assistant", "content": str or
[{"type": "image"}, {"type": "text", "text": ...}]}`), exactly one `<image>` per conversation, rendered with the
processor's chat template with the loss on the assistant turns only. A stage trains those of its tasks that the
given data feed. By default an epoch is every pair once per task and every chat once; `--task_ratios
caption=1,generate=2,chat=1` draws the epoch's tasks in these proportions instead (as many examples as the default
epoch, or `--examples_per_epoch`), from the seed and the epoch alone. Text-to-image examples drop their caption
with probability `--caption_dropout` for classifier-free guidance, becoming exactly the unconditional prompt that
`generate(generation_mode="image")` uses; which examples drop depends only on the seed, the epoch and the example,
so a resumed run drops the same ones.

With `--lora_rank`, a stage that trains the LLM trains LoRA adapters on its linear layers instead (its other groups
in full); the folder keeps them in `language_model_adapter/` next to the unmerged base weights, every later stage
continues that adapter (frozen where the stage does not train the LLM), and loading the folder merges it. A start
folder that holds only the trained parts (`save_unified_folder(..., base_language_model=...)`) gives one too.

Every loss term (`loss`, `text_loss`, `pixel_loss`, `semantic_loss`) is logged per optimiser step to
`<output_dir>/logs/train_unified.jsonl` (and `--report_to`). Checkpoints hold the full Accelerate state and the
data position, written atomically; `--resume_from_checkpoint latest` continues exactly where the run stopped. A step
whose loss is NaN or infinite on any process is skipped and counted. The final folder is a complete unified model
folder (weights, processor, remote code, model card), the start of the next stage; `--push_to_hub --hub_model_id`
uploads it (without checkpoints and logs).
"""

import argparse
import json
from pathlib import Path

from accelerate.logging import get_logger
from accelerate.utils import set_seed

from dualtoken_hf.cli.parser import positive_float, positive_int
from dualtoken_hf.configuration_dualtoken import UNIFIED_PRESETS
from dualtoken_hf.hub import CardDetails
from dualtoken_hf.hub.assemble import assemble_unified
from dualtoken_hf.hub.folders import folder_base_language_model, load_processor, load_tokenizer, load_unified
from dualtoken_hf.hub.writing import save_unified_folder
from dualtoken_hf.training.lora import (
    add_language_model_lora,
    apply_lora_stage,
    load_language_model_adapter,
    save_lora_unified_folder,
)
from dualtoken_hf.training.unified import (
    STAGES,
    PairsTrainer,
    add_data_arguments,
    add_hub_arguments,
    add_training_arguments,
    apply_stage,
    check_data_arguments,
    check_hub_arguments,
    describe_training_data,
    push_output_dir,
    trained_tasks,
)


logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", choices=list(STAGES), required=True)
    start = parser.add_argument_group("start from a unified model folder, or from an LLM and a trained tokenizer")
    start.add_argument("--model_name_or_path",
                       help="The unified model folder to start from (`dualtoken init`, or the previous stage's).")
    start.add_argument("--llm_model_name_or_path", help="A causal LM folder with its text tokenizer.")
    start.add_argument("--llm_gguf_file",
                       help="A GGUF file in --llm_model_name_or_path to read the LLM and its text tokenizer from.")
    start.add_argument("--tokenizer_model_name_or_path",
                       help="A trained vision tokenizer folder (examples/train_tokenizer.py), or a unified folder "
                            "whose tokenizer to take.")
    start.add_argument("--preset", default="dualtoken-3b", choices=sorted(UNIFIED_PRESETS),
                       help="Sizes of the new depth heads of an assembled model (default: %(default)s, the paper's).")
    lora = parser.add_argument_group("LoRA: train the LLM through adapters (a few MB) instead of in full")
    lora.add_argument("--lora_rank", type=positive_int,
                      help="Rank of new LoRA adapters on every linear layer of the LLM, for a stage that trains it. A "
                           "start folder with an adapter (language_model_adapter/) continues that one in any case.")
    lora.add_argument("--lora_alpha", type=positive_float, help="LoRA scale numerator (default: 2 × --lora_rank).")
    lora.add_argument("--trained_parts_only", action="store_true",
                      help="With --llm_model_name_or_path: save the folder without the LLM's weights, which loading "
                           "reads from that LLM (the folder records it). A start folder saved so gives one anyway.")
    add_data_arguments(parser)
    add_training_arguments(
        parser,
        learning_rate_help="AdamW peak learning rate. Stages: " +
                           ", ".join(f"{name}: {stage.learning_rate}" for name, stage in STAGES.items()) + ".",
        batch_size_help="Examples per optimiser step over all processes and accumulation steps. Stages: " +
                        ", ".join(f"{name}: {stage.batch_size}" for name, stage in STAGES.items()) + ".",
        log_name="train_unified",
    )
    add_hub_arguments(parser)
    args = parser.parse_args(argv)
    from_folder = args.model_name_or_path is not None
    assembled = (args.llm_model_name_or_path, args.tokenizer_model_name_or_path)
    if from_folder == any(assembled) or not from_folder and not all(assembled):
        parser.error("give --model_name_or_path, or both --llm_model_name_or_path and --tokenizer_model_name_or_path")
    if args.lora_rank is None and args.lora_alpha is not None:
        parser.error("--lora_alpha needs --lora_rank")
    if args.lora_rank is not None and "language_model" not in STAGES[args.stage].trains:
        parser.error(f"--lora_rank adapts the LLM, which stage {args.stage!r} does not train")
    if args.trained_parts_only and from_folder:
        parser.error("--trained_parts_only records the LLM of --llm_model_name_or_path as the base; a start folder "
                     "keeps its own layout")
    if args.lora_rank is not None and args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_rank
    check_data_arguments(parser, args, STAGES[args.stage].tasks)
    check_hub_arguments(parser, args)
    return args


def main(args: argparse.Namespace) -> dict:
    stage = STAGES[args.stage]
    output_dir = Path(args.output_dir)
    set_seed(args.seed)
    # A start folder that holds only the trained parts gives a folder that does too, on the same base LLM.
    base_language_model, lora_model = None, None
    if args.model_name_or_path:
        model = load_unified(args.model_name_or_path, merge_adapter=False)
        processor = load_processor(args.model_name_or_path)
        started_from = args.model_name_or_path
        base_language_model = folder_base_language_model(args.model_name_or_path)
        lora_model = load_language_model_adapter(model, args.model_name_or_path)
    else:
        model, processor = assemble_unified(load_tokenizer(args.tokenizer_model_name_or_path),
                                            args.llm_model_name_or_path, args.preset,
                                            gguf_file=args.llm_gguf_file)
        if args.trained_parts_only:
            base_language_model = {"name_or_path": args.llm_model_name_or_path, "gguf_file": args.llm_gguf_file}
        started_from = (f"the LLM {args.llm_model_name_or_path} and the tokenizer "
                        f"{args.tokenizer_model_name_or_path} (new {args.preset} heads)")
    if lora_model is not None and args.lora_rank not in (None, lora_model.peft_config["default"].r):
        raise ValueError(f"--lora_rank {args.lora_rank}: {args.model_name_or_path} has an LLM adapter of rank "
                         f"{lora_model.peft_config['default'].r}, which this stage continues")
    if lora_model is None and args.lora_rank is not None:
        lora_model = add_language_model_lora(model, args.lora_rank, args.lora_alpha)
    if lora_model is not None:
        model = lora_model
        trained_names = apply_lora_stage(model, stage)
    else:
        trained_names = apply_stage(model, stage)

    # A joint-stage batch with no text-to-image example leaves the heads out of the graph (captioning and chat batches
    # both use the projector and the LLM).
    unused_heads = "generate" in stage.tasks and len(stage.tasks) > 1
    with PairsTrainer(args, "train_unified", find_unused_parameters=unused_heads) as trainer:
        logger.info(f"stage {stage.name}: training {len(trained_names)} parameter tensors of {stage.trains}")
        result = trainer.train(model, processor, stage.tasks, args.learning_rate or stage.learning_rate,
                               args.total_batch_size or stage.batch_size, description=f"stage {stage.name}")
        state = result.state
        summary = {"stage": stage.name, "tasks": list(trained_tasks(stage.tasks, args)),
                   "global_step": state.global_step, "skipped_images": state.skipped_images,
                   "nonfinite_steps": state.nonfinite_steps, "num_processes": trainer.accelerator.num_processes,
                   "trained_parameters": trained_names, "last_logs": result.logs}
        if trainer.accelerator.is_main_process:
            card = CardDetails(
                origin=f"Stage {stage.name!r} of `examples/train_unified.py` of `dualtoken_hf`.",
                facts={"stage": f"{stage.name} (trains {', '.join(stage.trains)})",
                       "started from": started_from,
                       "optimiser steps": state.global_step,
                       "examples per step": result.total_batch_size,
                       "learning rate": f"{result.learning_rate} (AdamW, {args.lr_warmup_steps} warmup steps, "
                                        f"{args.lr_scheduler})",
                       "caption dropout": args.caption_dropout,
                       "training data": describe_training_data(args),
                       "LLM adapter": lora_model and "LoRA rank {r}, alpha {lora_alpha} ({note})".format(
                           **lora_model.peft_config["default"].to_dict(),
                           note="trained" if "language_model" in stage.trains else "frozen")},
                repo_id=args.hub_model_id,
                base_model=args.model_name_or_path or args.llm_model_name_or_path,
            )
            save = save_lora_unified_folder if lora_model is not None else save_unified_folder
            save(trainer.accelerator.unwrap_model(result.model), processor, output_dir, card=card,
                 base_language_model=base_language_model)
            (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
            if args.push_to_hub:
                push_output_dir(args, commit_message=f"Stage {stage.name} of the unified model")
        trainer.end()
    return summary


if __name__ == "__main__":
    main(parse_args())
