"""Training utilities for the DualToken tokenizer: losses (eq. 1-4), recipes, data, checkpoints, Hub upload. The
metrics and perceptual networks are shared with evaluation and live in `dualtoken_hf.evaluation`.

Needs the `[train]` extra (Accelerate, datasets). Not part of a Hub folder: the Hub-facing modules of `dualtoken_hf`
never import this subpackage.
"""

from importlib.util import find_spec


_missing = [name for name in ("accelerate", "datasets") if find_spec(name) is None]
if _missing:
    raise ImportError(
        f"dualtoken_hf.training needs {' and '.join(_missing)}, which a base install lacks: "
        "pip install 'dualtoken-hf[train]'"
    )

from .checkpointing import (
    CheckpointSaveError,
    TrainingState,
    add_checkpoint_arguments,
    claim_output_dir,
    list_checkpoints,
    prune_checkpoints,
    remove_partial_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from .data import (
    ImageTrainDataset,
    StreamingImageTrainDataset,
    TrainTransform,
    collate_images,
    first_readable_images,
    load_image_dataset,
    random_resized_crop_box,
    resolve_image_column,
    undecoded,
    without_global_rng,
)
from .distributed import average_gradients, fingerprints, out_of_sync
from .hub import HubUploader
from .images import image_grid, save_reconstruction_grid
from .losses import (
    PatchGANDiscriminator,
    adaptive_generator_weight,
    discriminator_losses,
    frozen,
    hinge_discriminator_loss,
    hinge_generator_loss,
    semantic_distillation_loss,
    tokenizer_losses,
)
from .nonfinite import NonFiniteGuard, NonFiniteLossError
from .recipes import RECIPES, LossWeights, get_recipe
from .schedules import warmup_warning
from .tracking import JSONLinesTracker, read_jsonl


__all__ = [
    "RECIPES",
    "CheckpointSaveError",
    "HubUploader",
    "ImageTrainDataset",
    "JSONLinesTracker",
    "LossWeights",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "PatchGANDiscriminator",
    "StreamingImageTrainDataset",
    "TrainTransform",
    "add_checkpoint_arguments",
    "TrainingState",
    "adaptive_generator_weight",
    "average_gradients",
    "claim_output_dir",
    "collate_images",
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
    "random_resized_crop_box",
    "read_jsonl",
    "remove_partial_checkpoints",
    "resolve_checkpoint",
    "resolve_image_column",
    "save_checkpoint",
    "save_reconstruction_grid",
    "semantic_distillation_loss",
    "tokenizer_losses",
    "undecoded",
    "warmup_warning",
    "without_global_rng",
]
