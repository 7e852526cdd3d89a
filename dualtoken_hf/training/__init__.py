"""Training utilities for the DualToken tokenizer: losses (eq. 1-4), recipes, data, metrics, checkpoints, Hub upload.

Not part of a Hub folder: the Hub-facing modules of `dualtoken_hf` never import this subpackage.
"""

from .checkpointing import TrainingState, list_checkpoints, prune_checkpoints, resolve_checkpoint
from .data import (
    ImageTrainDataset,
    StreamingImageTrainDataset,
    TrainTransform,
    collate_images,
    decode_image,
    first_readable_images,
    load_image_dataset,
    random_resized_crop_box,
    resolve_image_column,
    undecoded,
    without_global_rng,
)
from .distributed import average_gradients, fingerprints, out_of_sync
from .hub import HubUploader
from .images import image_grid, save_reconstruction_grid, to_pil
from .losses import (
    PERCEPTUAL_LOSS_HELP,
    FeaturePerceptualLoss,
    LPIPSPerceptualLoss,
    PatchGANDiscriminator,
    adaptive_generator_weight,
    build_perceptual_loss,
    discriminator_losses,
    frozen,
    hinge_discriminator_loss,
    hinge_generator_loss,
    semantic_distillation_loss,
    tokenizer_losses,
)
from .metrics import psnr, ssim
from .recipes import RECIPES, LossWeights, get_recipe
from .tracking import JSONLinesTracker, read_jsonl


__all__ = [
    "PERCEPTUAL_LOSS_HELP",
    "RECIPES",
    "FeaturePerceptualLoss",
    "HubUploader",
    "ImageTrainDataset",
    "JSONLinesTracker",
    "LPIPSPerceptualLoss",
    "LossWeights",
    "PatchGANDiscriminator",
    "StreamingImageTrainDataset",
    "TrainTransform",
    "TrainingState",
    "adaptive_generator_weight",
    "average_gradients",
    "build_perceptual_loss",
    "collate_images",
    "decode_image",
    "discriminator_losses",
    "fingerprints",
    "first_readable_images",
    "frozen",
    "get_recipe",
    "hinge_discriminator_loss",
    "hinge_generator_loss",
    "image_grid",
    "list_checkpoints",
    "load_image_dataset",
    "out_of_sync",
    "prune_checkpoints",
    "psnr",
    "random_resized_crop_box",
    "read_jsonl",
    "resolve_checkpoint",
    "resolve_image_column",
    "save_reconstruction_grid",
    "semantic_distillation_loss",
    "ssim",
    "to_pil",
    "tokenizer_losses",
    "undecoded",
    "without_global_rng",
]
