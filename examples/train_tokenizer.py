#!/usr/bin/env python
# Copyright 2025 The DualToken HF authors. Licensed under the Apache License, Version 2.0.
"""Train the DualToken vision tokenizer (paper §3.2, eq. 1-4) with Accelerate.

    accelerate launch examples/train_tokenizer.py \\
        --siglip_model_name_or_path google/siglip-so400m-patch14-384 --preset paper \\
        --train_shards "cc12m/cc12m-train-{0000..2175}.tar" --mixed_precision bf16 --gradient_checkpointing \\
        --output_dir dualtoken-tokenizer --push_to_hub --hub_model_id me/dualtoken-tokenizer

One generator step per micro-batch (eq. 2): pixel L2 + perceptual + adaptive-weighted hinge GAN on the pixel decoder,
L2 (and optionally 1 - cos) between the student's semantic features (`paper`: the semantic layer; `v2`: its quantized,
projected-back features) / pooled output and the frozen original SigLIP tower (eq. 4; `--teacher_model_name_or_path`,
by default the SigLIP the tokenizer was initialised from), and the commitment losses of both quantizers (eq. 1).
Once the GAN has started, a PatchGAN discriminator takes its own step with its own optimiser and schedule.

Codebooks are not trained by gradient: every training forward updates them by EMA (and restarts dead codes), as the
official code does per forward. With gradient accumulation that is one EMA update per micro-batch, not per optimiser
step. Under DDP the quantizers all-reduce their statistics inside the forward (also inside `no_sync`), and every
process runs the same number of forwards, so the codebooks stay identical on all processes; the run checks this at
the end (`out_of_sync` in `train_summary.json`).

The discriminator is kept out of DDP/FSDP/DeepSpeed wrapping (its gradients are averaged by one all-reduce): it is
called twice per step with different parameters frozen, which wrapped modules do not allow, and DeepSpeed accepts a
single model per Accelerator.

Interruptions: the output folder is locked for the run (a second run into it fails at once); checkpoints are written
atomically, so `--resume_from_checkpoint latest` never picks a half-written one and a resumed run logs the same
losses as an uninterrupted one. A step whose loss is NaN or infinite on any process is skipped (no update; the
codebook EMA is put back) and counted (`train/nonfinite_steps`); `--max_consecutive_nonfinite` in a row stop the run.
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
from importlib.util import find_spec
from pathlib import Path

import torch
import transformers
from transformers import SiglipVisionModel
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from diffusers.optimization import SchedulerType, get_scheduler
from tqdm.auto import tqdm

from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionConfig, DualTokenVisionModel
from dualtoken_hf.cli.parser import non_negative_float, non_negative_int, positive_float, positive_int
from dualtoken_hf.configuration_dualtoken import PRESETS
from dualtoken_hf.evaluation import PERCEPTUAL_LOSS_HELP, build_perceptual_loss, psnr, ssim
from dualtoken_hf.hub import CardDetails, save_tokenizer_folder
from dualtoken_hf.hub.locking import LOCK_FILE
from dualtoken_hf.training import (
    RECIPES,
    HubUploader,
    ImageTrainDataset,
    JSONLinesTracker,
    NonFiniteGuard,
    PatchGANDiscriminator,
    StreamingImageTrainDataset,
    TrainingState,
    TrainTransform,
    add_checkpoint_arguments,
    average_gradients,
    claim_output_dir,
    collate_images,
    discriminator_losses,
    first_readable_images,
    get_recipe,
    load_image_dataset,
    out_of_sync,
    prune_checkpoints,
    resolve_checkpoint,
    resolve_image_column,
    save_checkpoint,
    save_reconstruction_grid,
    tokenizer_losses,
    undecoded,
    warmup_warning,
    without_global_rng,
)
from dualtoken_hf.training.hub import OUTPUT_DIR_IGNORE_PATTERNS
from dualtoken_hf.training.recipes import SEMANTIC_LOSS_FEATURES
from dualtoken_hf.training.weights_only import check_weights_only


logger = get_logger(__name__)

RECIPE_SETTINGS = {
    "reconstruction_weight": "Weight of the pixel L2 (eq. 3).",
    "perceptual_weight": "Weight of the perceptual loss (eq. 3, lambda_p).",
    "generator_weight": "Weight of the adaptive-weighted GAN generator loss (eq. 3, lambda_g).",
    "discriminator_weight": "Weight of the discriminator's hinge loss (official: 1.0 during the first GAN epoch, then "
                            "this; we use this throughout).",
    "semantic_weight": "Weight of the semantic loss (eq. 2, lambda_2).",
    "semantic_feature_weight": "Weight of the semantic layer's term inside the semantic loss (eq. 4).",
    "semantic_pooled_weight": "Weight of the pooled output's term inside the semantic loss.",
    "semantic_cosine_weight": "Weight of 1 - cos next to each L2 of the semantic loss.",
    "commitment_weight": "Weight of the two commitment losses (eq. 2, lambda_3).",
    "adaptive_weight_min": "Lower clamp of the adaptive GAN weight.",
    "adaptive_weight_max": "Upper clamp of the adaptive GAN weight.",
    "learning_rate": "Peak learning rate of the tokenizer (AdamW).",
    "adam_beta1": "AdamW beta1 of the tokenizer and the discriminator (official).",
    "adam_beta2": "AdamW beta2 of the tokenizer and the discriminator (official).",
    "adam_weight_decay": "AdamW weight decay of the tokenizer (official; the discriminator has none, as officially).",
    "lr_warmup_steps": "Linear warmup steps of both learning-rate schedules.",
    "gan_start_step": "Optimiser step at which the GAN loss and the discriminator start (official: half-way through "
                      "the first epoch, about 19.5k steps for CC12M at 8 x 32 images; the recipes round to 20k).",
}


def _recipe_value(recipe: dict, name: str):
    weights = dataclasses.asdict(recipe["loss_weights"])
    return weights[name] if name in weights else recipe[name]


def adam_beta(text: str) -> float:
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def recipe_setting_type(name: str):
    """The argparse type of recipe setting `name`: step counts are integers >= 0, the learning rate > 0, the Adam
    betas in [0, 1), weights and weight decay >= 0."""
    if name.endswith(("step", "steps")):
        return non_negative_int
    if name == "learning_rate":
        return positive_float
    if name.startswith("adam_beta"):
        return adam_beta
    return non_negative_float


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])

    model = parser.add_argument_group("model")
    model.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                       help="Tokenizer layout when not starting from --pretrained_model_name_or_path.")
    model.add_argument("--pretrained_model_name_or_path", help="A DualToken tokenizer (folder or Hub id) to continue.")
    model.add_argument("--siglip_model_name_or_path",
                       help="Start from this pretrained SigLIP vision tower, as the paper does (layout from --preset).")
    model.add_argument("--teacher_model_name_or_path",
                       help="The frozen SigLIP vision tower the semantic loss (eq. 4) compares with. Default: the "
                            "initial tower when starting from --siglip_model_name_or_path or a preset; with "
                            "--pretrained_model_name_or_path, the SigLIP that tokenizer was initialised from (its "
                            "config's siglip_name_or_path; an error if it records none), never the tower being "
                            "continued.")

    recipe = parser.add_argument_group("recipe (every setting defaults to the value of --recipe)")
    recipe.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                        help="Loss weights and optimiser settings: 'paper' (2025 release) or 'v2' (later official).")
    for name, description in RECIPE_SETTINGS.items():
        values = ", ".join(f"{key}: {_recipe_value(value, name)}" for key, value in RECIPES.items())
        recipe.add_argument(f"--{name}", type=recipe_setting_type(name), default=None,
                            help=f"{description} Recipes: {values}.")
    recipe.add_argument("--semantic_loss_features", choices=SEMANTIC_LOSS_FEATURES, default=None,
                        help="Student features of the semantic loss (eq. 4): 'layer', the semantic layer's unquantized "
                             "output, or 'quantized', the semantic code embeddings projected back to the tower width "
                             "(the official v2 code's zq_semantic). Recipes: paper: layer, v2: quantized.")
    recipe.add_argument("--perceptual_loss", default="lpips", help=f"Perceptual loss: {PERCEPTUAL_LOSS_HELP}.")
    recipe.add_argument("--discriminator_learning_rate", type=positive_float, default=None,
                        help="Peak learning rate of the discriminator (default: --learning_rate).")
    recipe.add_argument("--discriminator_channels", type=positive_int, default=64, help="PatchGAN base channels.")
    recipe.add_argument("--discriminator_layers", type=positive_int, default=3, help="PatchGAN stride-2 convs.")
    recipe.add_argument("--lr_scheduler", default="cosine",
                        choices=[kind.value for kind in SchedulerType if kind is not SchedulerType.PIECEWISE_CONSTANT],
                        help="diffusers schedule after warmup for both optimisers ('constant' has no warmup).")
    recipe.add_argument("--max_grad_norm", type=positive_float, default=None,
                        help="Clip the tokenizer's gradient norm (the official recipe does not clip).")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", help="A folder of images (loaded with datasets' imagefolder).")
    data.add_argument("--dataset_name", help="A dataset on the Hub or a local dataset script / folder.")
    data.add_argument("--dataset_config_name")
    data.add_argument("--train_shards", nargs="+",
                      help="Webdataset tar shards, streamed; brace ranges such as 'cc12m-{0000..2175}.tar' expand.")
    data.add_argument("--image_column", default="image",
                      help="Image column (for tar shards, the first of jpg/jpeg/png/webp present is used if absent).")
    data.add_argument("--validation_data_dir",
                      help="Images for validation grids (default: the first training images, center-cropped).")
    data.add_argument("--num_validation_images", type=positive_int, default=4)
    data.add_argument("--cache_dir", help="datasets cache folder.")
    data.add_argument("--crop_scale_min", type=float, default=0.9,
                      help="Smallest area fraction of the random resized crop (official: 0.9; upper bound 1).")
    data.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=True,
                      help="Random horizontal flips.")
    data.add_argument("--shuffle_buffer_size", type=positive_int, default=1000,
                      help="Shuffle buffer of streamed shards.")
    data.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)

    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", default="dualtoken-tokenizer")
    training.add_argument("--seed", type=non_negative_int, default=0)
    training.add_argument("--train_batch_size", type=positive_int, default=32,
                          help="Per process (official: 32 on 8 GPUs).")
    training.add_argument("--num_train_epochs", type=positive_int, default=20,
                          help="Official: 20 (ignored with max steps).")
    training.add_argument("--max_train_steps", type=positive_int, default=None,
                          help="Optimiser steps; required for streamed shards. Overrides --num_train_epochs.")
    training.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    training.add_argument("--gradient_checkpointing", action="store_true")
    training.add_argument("--mixed_precision", choices=["no", "bf16"], default=None,
                          help="Defaults to the accelerate config. fp16 is not supported (two optimisers, no scaler).")
    add_checkpoint_arguments(training)
    training.add_argument("--validation_steps", type=positive_int, default=500,
                          help="Save a reconstruction grid and log validation PSNR/SSIM every this many steps.")
    training.add_argument("--report_to", default="jsonl",
                          help="Comma-separated trackers besides <output_dir>/logs/train_tokenizer.jsonl, which is "
                               "always written: tensorboard, wandb, ... or all.")

    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", help="Repository to push to, 'user/name'.")
    hub.add_argument("--hub_token")
    hub.add_argument("--hub_private_repo", action="store_true")
    hub.add_argument("--hub_strategy", choices=["end", "checkpoint"], default="end",
                     help="'end': push the final folder; 'checkpoint': also push each checkpoint to last-checkpoint/ "
                          "in the background while training goes on.")

    args = parser.parse_args(argv)
    sources = [args.train_data_dir, args.dataset_name, args.train_shards]
    if sum(source is not None for source in sources) != 1:
        parser.error("give exactly one of --train_data_dir, --dataset_name and --train_shards")
    if args.pretrained_model_name_or_path and args.siglip_model_name_or_path:
        parser.error("give at most one of --pretrained_model_name_or_path and --siglip_model_name_or_path")
    if args.train_shards and args.max_train_steps is None:
        parser.error("--train_shards streams an unsized dataset: give --max_train_steps")
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")
    if not 0 < args.crop_scale_min <= 1:
        parser.error(f"--crop_scale_min must be in (0, 1], got {args.crop_scale_min}")
    weights = get_recipe(args.recipe, **{name: getattr(args, name) for name in RECIPE_SETTINGS})["loss_weights"]
    if weights.adaptive_weight_min > weights.adaptive_weight_max:
        parser.error(f"--adaptive_weight_min {weights.adaptive_weight_min} is above --adaptive_weight_max "
                     f"{weights.adaptive_weight_max}")
    if args.perceptual_loss == "lpips":
        missing = [name for name in ("lpips", "torchvision") if find_spec(name) is None]
        if missing:
            # One line, before anything heavy: under `accelerate launch` it is the first line the user sees.
            raise SystemExit(
                f"{parser.prog}: error: --perceptual_loss lpips (the default) needs {' and '.join(missing)}: "
                "pip install lpips (it brings torchvision and downloads VGG weights on first use), or pass "
                "--perceptual_loss none or a 'package.module:factory' network"
            )
    return args


def build_tokenizer(args) -> DualTokenVisionModel:
    """The initial tokenizer: a saved one, one started from a SigLIP tower, or a randomly initialised preset."""
    if args.pretrained_model_name_or_path:
        return DualTokenVisionModel.from_pretrained(args.pretrained_model_name_or_path, use_safetensors=True)
    if args.siglip_model_name_or_path:
        return DualTokenVisionModel.from_siglip(args.siglip_model_name_or_path, preset=args.preset)
    return DualTokenVisionModel(DualTokenVisionConfig.from_preset(args.preset))


def teacher_name_or_path(args, model: DualTokenVisionModel) -> str | None:
    """Where the teacher of eq. 4 comes from: --teacher_model_name_or_path, else, when continuing a tokenizer, the
    SigLIP its config records; `None` when the tokenizer's initial tower is itself the original one."""
    if args.teacher_model_name_or_path:
        return args.teacher_model_name_or_path
    if not args.pretrained_model_name_or_path:
        return None
    if model.config.siglip_name_or_path is None:
        raise ValueError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} does not record the SigLIP it was "
            "initialised from (config.siglip_name_or_path), so the teacher of the semantic loss is unknown; pass "
            "--teacher_model_name_or_path with the original SigLIP tower (a copy of the continued tower would let "
            "the semantics drift further with every run)"
        )
    return model.config.siglip_name_or_path


def build_teacher(args, model: DualTokenVisionModel) -> SiglipVisionModel:
    """The frozen teacher of eq. 4: the original SigLIP tower (see `teacher_name_or_path`), never the tower that a
    continued run trains."""
    source = teacher_name_or_path(args, model)
    if source is None:
        teacher = copy.deepcopy(model.siglip)
    else:
        teacher = SiglipVisionModel.from_pretrained(source, use_safetensors=True)
        expected = model.config.siglip_config
        names = ("hidden_size", "num_hidden_layers", "image_size", "patch_size")
        mismatched = {name: (getattr(teacher.config, name), getattr(expected, name)) for name in names
                      if getattr(teacher.config, name) != getattr(expected, name)}
        if mismatched:
            raise ValueError(f"the teacher {source} does not match the tokenizer's tower: "
                             + ", ".join(f"{name} {got} vs {want}" for name, (got, want) in mismatched.items()))
    return teacher.eval().requires_grad_(False)


def build_train_data(args, resolution: int):
    """(torch dataset, raw `datasets` dataset, image column) of the training images."""
    raw = load_image_dataset(args.train_data_dir, args.dataset_name, args.dataset_config_name, args.train_shards,
                             args.cache_dir)
    image_column = resolve_image_column(raw, args.image_column)
    raw = undecoded(raw, image_column)
    transform = TrainTransform(resolution, crop_scale=(args.crop_scale_min, 1.0), random_flip=args.random_flip)
    if args.train_shards:
        stream = raw.shuffle(seed=args.seed, buffer_size=args.shuffle_buffer_size)
        return StreamingImageTrainDataset(stream, image_column, transform, seed=args.seed), raw, image_column
    return ImageTrainDataset(raw, image_column, transform, seed=args.seed), raw, image_column


def validation_pixel_values(args, raw_train, image_column: str, processor) -> torch.Tensor:
    """Center-cropped validation images `(N, 3, H, W)` in [-1, 1]."""
    if args.validation_data_dir:
        raw_train = undecoded(load_image_dataset(train_data_dir=args.validation_data_dir, cache_dir=args.cache_dir),
                              "image")
        image_column = "image"
    images = first_readable_images(raw_train, image_column, args.num_validation_images)
    return processor(images, return_tensors="pt").pixel_values


def codebook_logs(model: DualTokenVisionModel, codes: dict[str, torch.Tensor]) -> dict[str, float]:
    """Usage (fraction of codes used), perplexity and dead codes per branch, averaged over depths."""
    logs = {}
    for branch, branch_codes in codes.items():
        statistics = model.quantizer(branch).codebook_statistics(branch_codes)
        for name, values in statistics.items():
            logs[f"codebook/{branch}_{name}"] = values.float().mean().item()
    return logs


def replicated_state(model: DualTokenVisionModel, discriminator: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Everything that must stay identical on all processes without DDP doing it: codebooks and discriminator."""
    state = {f"{branch}_quantizer.{name}": buffer for branch in ("pixel", "semantic")
             for name, buffer in model.quantizer(branch).named_buffers()}
    state.update({f"discriminator.{name}": value for name, value in discriminator.named_parameters()})
    return state


def discriminator_backward(accelerator, discriminator, pixel_values, reconstruction, weights,
                           accumulation_steps: int) -> dict[str, torch.Tensor]:
    """Accumulate the discriminator's hinge-loss gradients of one micro-batch; returns the terms to log."""
    with accelerator.autocast():
        terms = discriminator_losses(discriminator, pixel_values, reconstruction, weights)
    (terms.pop("total") / accumulation_steps).backward()
    return terms


def optimizer_step(accelerator, args, model, optimizer, lr_scheduler, discriminator, discriminator_optimizer,
                   discriminator_scheduler, gan_active: bool, skip: bool) -> dict[str, float]:
    """End of an accumulation: unless `skip` (a non-finite loss), step the tokenizer's optimiser and schedule and,
    once the GAN runs, the discriminator's (its gradients averaged over processes); then clear the gradients.
    Returns the learning rates this step applied."""
    applied = {"lr": optimizer.param_groups[0]["lr"], "lr_discriminator": discriminator_optimizer.param_groups[0]["lr"]}
    if not skip:
        if args.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        if gan_active:
            average_gradients(discriminator, accelerator)
            discriminator_optimizer.step()
            discriminator_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    discriminator_optimizer.zero_grad(set_to_none=True)
    return applied


def step_logs(accelerator, micro_batch_logs: list[dict], state: TrainingState) -> dict[str, float]:
    """Logs of one optimiser step: every term averaged over its micro-batches and the processes; the skipped-image
    count summed over both and added to the run total in `state`."""
    skipped = torch.stack([log.pop("data/skipped_images").sum() for log in micro_batch_logs]).sum()
    state.skipped_images += round(accelerator.reduce(skipped, reduction="sum").item())
    names = list(micro_batch_logs[0])
    means = torch.stack([torch.stack([log[name] for log in micro_batch_logs]).mean() for name in names])
    logs = dict(zip(names, accelerator.reduce(means, reduction="mean").tolist()))
    logs["data/skipped_images"] = state.skipped_images
    return logs


@torch.no_grad()
def validate(accelerator, model, pixel_values: torch.Tensor, step: int, output_dir: Path) -> dict[str, float]:
    """Reconstruct the validation images through codes (encode -> decode), save a grid, return PSNR/SSIM."""
    model.eval()
    tokenizer = accelerator.unwrap_model(model)
    with accelerator.autocast():
        reconstructions = tokenizer.decode(tokenizer.encode(pixel_values).pixel_codes).float().clamp(-1, 1)
    model.train()
    if accelerator.is_main_process:
        save_reconstruction_grid([pixel_values, reconstructions], output_dir / "validation" / f"step-{step:07d}.png")
    return {
        "validation/psnr": psnr(reconstructions, pixel_values, data_range=2.0).mean().item(),
        # SSIM is not shift-invariant: compute it on [0, 1] like published numbers.
        "validation/ssim": ssim((reconstructions + 1) / 2, (pixel_values + 1) / 2, data_range=1.0).mean().item(),
    }


def save_and_push_checkpoint(accelerator, args, state: TrainingState, uploader: HubUploader | None):
    """`checkpoint-<step>` with the full Accelerate state and the data position, written atomically; once it is
    complete, prune the oldest beyond --checkpoints_total_limit and push it per the flags."""
    output_dir = Path(args.output_dir)
    path = save_checkpoint(accelerator, output_dir, state)
    if accelerator.is_main_process:
        logger.info(f"saved {path}")
        if uploader is not None and args.checkpoints_total_limit is not None:
            uploader.wait()  # never delete a checkpoint that is still being uploaded
        for folder in prune_checkpoints(output_dir, args.checkpoints_total_limit):
            logger.info(f"removed old checkpoint {folder}")
        if uploader is not None and args.hub_strategy == "checkpoint":
            uploader.upload(path, path_in_repo="last-checkpoint",
                            commit_message=f"Training in progress, step {state.global_step}")
    accelerator.wait_for_everyone()


def save_final_model(accelerator, args, model, processor, training_facts: dict, uploader: HubUploader | None):
    """Save the Hub-ready folder (weights, config, remote code, image processor, model card) and push it."""
    tokenizer = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    card = CardDetails(
        origin="Trained with `examples/train_tokenizer.py` of `dualtoken_hf`.",
        facts=training_facts,
        repo_id=args.hub_model_id,
        base_model=args.siglip_model_name_or_path or args.pretrained_model_name_or_path,
        dataset=args.dataset_name,
    )
    save_tokenizer_folder(tokenizer, args.output_dir, processor, card=card, state_dict=state_dict)
    if uploader is not None:
        uploader.upload(args.output_dir, commit_message="End of training",
                        ignore_patterns=[*OUTPUT_DIR_IGNORE_PATTERNS, LOCK_FILE])
        uploader.wait()


def train(args: argparse.Namespace, on_exit: contextlib.ExitStack) -> dict:
    """The run of [`main`]; what it holds until the end (the output folder's lock) goes on `on_exit`."""
    output_dir = Path(args.output_dir)
    set_seed(args.seed)
    model = build_tokenizer(args)
    teacher = build_teacher(args, model)

    logging_dir = output_dir / "logs"
    jsonl_tracker = JSONLinesTracker("train_tokenizer", logging_dir)
    trackers = [jsonl_tracker] + [name for name in args.report_to.split(",") if name and name != "jsonl"]
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        # Without semantic feedback the blocks after the semantic layer take no part in the loss.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=not model.config.semantic_feedback)],
    )
    if accelerator.mixed_precision == "fp16":
        raise ValueError("fp16 is not supported (the discriminator has no grad scaler); use --mixed_precision bf16")
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    logger.info(accelerator.state, main_process_only=False)
    if not accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_error()
    # One run per output folder: a second one fails here instead of interleaving checkpoints.
    output_lock = claim_output_dir(accelerator, output_dir)
    if output_lock is not None:
        on_exit.enter_context(output_lock)

    recipe = get_recipe(args.recipe, semantic_loss_features=args.semantic_loss_features,
                        **{name: getattr(args, name) for name in RECIPE_SETTINGS})
    weights = recipe["loss_weights"]
    if recipe["semantic_loss_features"] == "quantized" and not model.config.semantic_feedback:
        raise ValueError("semantic_loss_features 'quantized' needs a tokenizer with semantic_feedback (its quantized "
                         "semantic features replace the semantic layer); use --semantic_loss_features layer")
    perceptual_loss = build_perceptual_loss(args.perceptual_loss)
    logger.info(f"recipe {args.recipe}: {recipe}")
    logger.info(f"teacher of the semantic loss: {teacher_name_or_path(args, model) or 'the initial tower'}")
    logger.info(f"perceptual loss: {args.perceptual_loss}")

    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    discriminator = PatchGANDiscriminator(base_channels=args.discriminator_channels,
                                          num_layers=args.discriminator_layers).train()
    betas = (recipe["adam_beta1"], recipe["adam_beta2"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learning_rate"], betas=betas,
                                  weight_decay=recipe["adam_weight_decay"])
    discriminator_optimizer = torch.optim.AdamW(discriminator.parameters(), betas=betas, weight_decay=0.0,
                                                lr=args.discriminator_learning_rate or recipe["learning_rate"])

    resolution = model.config.image_size
    processor = DualTokenImageProcessor.from_vision_config(model.config)
    with accelerator.main_process_first():
        train_dataset, raw_train, image_column = build_train_data(args, resolution)
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        batch_size=args.train_batch_size,
        shuffle=not args.train_shards,
        collate_fn=collate_images,
        num_workers=args.dataloader_num_workers,
        drop_last=True,
    )
    if not args.train_shards and len(train_dataset) < args.train_batch_size * accelerator.num_processes:
        raise ValueError(f"{len(train_dataset)} training images cannot fill one batch of "
                         f"{args.train_batch_size} on each of {accelerator.num_processes} processes")

    if args.max_train_steps is None:
        batches_per_process = len(train_dataloader) / accelerator.num_processes
        steps_per_epoch = math.ceil(batches_per_process / args.gradient_accumulation_steps)
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    warning = warmup_warning(recipe["lr_warmup_steps"], args.max_train_steps)
    if warning and args.lr_scheduler != "constant":  # the constant schedule has no warmup
        logger.warning(warning)
    # Prepared schedulers step once per process (Accelerate's convention), hence the factor.
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer,
        num_warmup_steps=recipe["lr_warmup_steps"] * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    discriminator_scheduler = get_scheduler(
        args.lr_scheduler, discriminator_optimizer,
        num_warmup_steps=recipe["lr_warmup_steps"],
        num_training_steps=max(args.max_train_steps - recipe["gan_start_step"], 1),
    )

    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )
    teacher.to(accelerator.device)
    discriminator.to(accelerator.device)
    if perceptual_loss is not None:
        perceptual_loss.to(accelerator.device)
    accelerator.register_for_checkpointing(discriminator, discriminator_optimizer, discriminator_scheduler)
    tokenizer = accelerator.unwrap_model(model)
    semantic_layer = tokenizer.config.semantic_layer

    accelerator.init_trackers(
        "train_tokenizer",
        config={key: value if isinstance(value, (int, float, str, bool)) else str(value)
                for key, value in vars(args).items() if key != "hub_token"},
    )
    uploader = None
    if args.push_to_hub and accelerator.is_main_process:
        uploader = HubUploader(args.hub_model_id, token=args.hub_token, private=args.hub_private_repo or None)

    state = TrainingState()
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    if checkpoint is not None:
        check_weights_only(checkpoint)  # Accelerate unpickles registered objects with weights_only=False
        accelerator.load_state(str(checkpoint))
        state = TrainingState.load(checkpoint)
        logger.info(f"resumed from {checkpoint} at step {state.global_step}")
    elif args.resume_from_checkpoint:
        logger.info(f"no checkpoint in {output_dir}; starting a new run")
    if args.resume_from_checkpoint and accelerator.is_main_process:
        jsonl_tracker.truncate(state.global_step)  # the steps after the checkpoint are logged again

    validation_images = validation_pixel_values(args, raw_train, image_column, processor).to(accelerator.device)
    total_batch_size = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"training {args.max_train_steps} steps of {total_batch_size} images; GAN from step "
                f"{recipe['gan_start_step']}")
    progress_bar = tqdm(range(args.max_train_steps), initial=state.global_step, desc="steps",
                        disable=not accelerator.is_local_main_process)

    nonfinite_guard = NonFiniteGuard([tokenizer.quantizer("pixel"), tokenizer.quantizer("semantic"), discriminator],
                                     args.max_consecutive_nonfinite)
    logs = {}
    micro_batch_logs = []
    while state.global_step < args.max_train_steps:
        batches = state.epoch_batches(accelerator, train_dataloader, train_dataset)
        for batch in without_global_rng(batches):
            pixel_values = batch["pixel_values"]
            gan_active = state.global_step >= recipe["gan_start_step"]
            nonfinite_guard.before_forward()
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    outputs = model(pixel_values, output_hidden_states=True)
                    with torch.no_grad():
                        teacher_outputs = teacher(pixel_values, output_hidden_states=True)
                    # Looked up after the forward: sharding wrappers may swap the parameter for a view during it.
                    last_layer = tokenizer.pixel_decoder.decoder.conv_out.weight
                    terms = tokenizer_losses(outputs, pixel_values, teacher_outputs, semantic_layer, weights,
                                             perceptual_loss, discriminator if gan_active else None, last_layer,
                                             semantic_loss_features=recipe["semantic_loss_features"])
                accelerator.backward(terms["total"])
            micro_batch_log = {f"loss/{name}": value for name, value in terms.items()}
            nonfinite_guard.observe(terms["total"])

            if gan_active:
                discriminator_terms = discriminator_backward(accelerator, discriminator, pixel_values,
                                                             outputs.reconstruction, weights,
                                                             args.gradient_accumulation_steps)
                nonfinite_guard.observe(discriminator_terms["discriminator"])
                micro_batch_log.update({f"discriminator/{name}": value for name, value in discriminator_terms.items()})

            micro_batch_log["train/psnr"] = psnr(outputs.reconstruction.detach().float().clamp(-1, 1),
                                                 pixel_values.float(), data_range=2.0).mean()
            micro_batch_log["data/skipped_images"] = batch["skipped_images"]
            micro_batch_logs.append({name: value.detach().float() for name, value in micro_batch_log.items()})
            state.batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue

            state.global_step += 1
            skipped = nonfinite_guard.skip_step(accelerator, state)
            learning_rates = optimizer_step(accelerator, args, model, optimizer, lr_scheduler, discriminator,
                                            discriminator_optimizer, discriminator_scheduler, gan_active, skipped)
            logs = step_logs(accelerator, micro_batch_logs, state)
            micro_batch_logs = []
            logs.update(learning_rates)
            logs["train/nonfinite_steps"] = state.nonfinite_steps
            logs.update(codebook_logs(tokenizer, {"pixel": accelerator.gather(outputs.pixel_codes),
                                                  "semantic": accelerator.gather(outputs.semantic_codes)}))
            if state.global_step % args.validation_steps == 0 or state.global_step == args.max_train_steps:
                logs.update(validate(accelerator, model, validation_images, state.global_step, output_dir))
            accelerator.log(logs, step=state.global_step)
            progress_bar.update(1)
            progress_bar.set_postfix(loss=logs["loss/total"], psnr=logs["train/psnr"])

            if state.global_step % args.checkpointing_steps == 0:
                save_and_push_checkpoint(accelerator, args, state, uploader)
            if state.global_step >= args.max_train_steps:
                break
        else:
            state.end_epoch()

    accelerator.wait_for_everyone()
    mismatched = out_of_sync(accelerator, replicated_state(tokenizer, discriminator))
    if mismatched:
        logger.error(f"state differs between processes: {mismatched}")
    summary = {
        "global_step": state.global_step,
        "skipped_images": state.skipped_images,
        "nonfinite_steps": state.nonfinite_steps,
        "perceptual_loss": args.perceptual_loss,
        "recipe": args.recipe,
        "num_processes": accelerator.num_processes,
        "out_of_sync": mismatched,
        "last_logs": logs,
    }
    training_facts = {
        "recipe": f"{args.recipe} ({json.dumps(dataclasses.asdict(weights))})",
        "perceptual loss": args.perceptual_loss,
        "semantic loss": f"{recipe['semantic_loss_features']} features against "
                         f"{teacher_name_or_path(args, tokenizer) or 'the initial tower'}",
        "optimiser steps": state.global_step,
        "images per step": total_batch_size,
        "learning rate": f"{recipe['learning_rate']} (AdamW, betas {betas}, "
                         f"{recipe['lr_warmup_steps']} warmup steps, {args.lr_scheduler})",
        "GAN start step": recipe["gan_start_step"],
        "training data": args.dataset_name or args.train_data_dir or " ".join(args.train_shards),
        "unreadable images skipped": state.skipped_images,
    }
    save_final_model(accelerator, args, model, processor, training_facts, uploader)
    if accelerator.is_main_process:
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    if torch.distributed.is_initialized():
        # A worker that exits with a live gloo group can hang in its exit handlers and outlive the launcher.
        torch.distributed.destroy_process_group()
    return summary


def main(args: argparse.Namespace) -> dict:
    """Train; returns the run summary (also written to `<output_dir>/train_summary.json`). The output folder is
    unlocked however the run ends."""
    with contextlib.ExitStack() as on_exit:
        return train(args, on_exit)


if __name__ == "__main__":
    main(parse_args())
