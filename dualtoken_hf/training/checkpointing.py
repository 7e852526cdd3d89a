"""Checkpoint folders under `--output_dir` (`checkpoint-<step>`) and the data position saved with each one.

`accelerator.save_state` stores models, optimisers, schedulers, registered objects (discriminator and its optimiser
and schedule), RNG states and the sampler; the codebook EMA state is part of the tokenizer's buffers. What it does not
know is where the run stood in its data, which `training_state.json` adds.

Naming and pruning are our own rather than Accelerate's `ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)` (checked against accelerate 1.16, `Accelerator.save_state`/`load_state`), which does not do this job:

- it names folders `<project_dir>/checkpoints/checkpoint_<i>` by save count, so a folder does not say its optimiser
  step, and `--resume_from_checkpoint checkpoint-<step>` (the transformers/diffusers convention) cannot name one;
- it does not restore the save count on `load_state`, so the first save after a resume fails with "Checkpoint
  directory ... already exists" unless the script resets `project_configuration.iteration` itself;
- it counts, prunes and resumes from every folder, also one half-written by a crash (`load_state()` picks the
  highest number); here a checkpoint counts only once its `training_state.json`, written last, exists.
"""

import dataclasses
import json
import shutil
from pathlib import Path


CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"


@dataclasses.dataclass
class TrainingState:
    """Where a run stands: optimiser steps done, the epoch, the micro-batches of that epoch already consumed (the
    data position to skip to on resume), and unreadable images skipped so far (on this process)."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_images: int = 0

    def save(self, checkpoint_dir: str | Path):
        (Path(checkpoint_dir) / TRAINING_STATE_FILE).write_text(json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> "TrainingState":
        return cls(**json.loads((Path(checkpoint_dir) / TRAINING_STATE_FILE).read_text()))


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of `output_dir` (those with a training state), oldest first."""
    folders = Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
    complete = [folder for folder in folders if (folder / TRAINING_STATE_FILE).is_file()]
    return sorted(complete, key=checkpoint_step)


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str) -> Path | None:
    """`"latest"` -> the newest checkpoint of `output_dir` (`None` if there is none); otherwise the given folder,
    as a path or as a name inside `output_dir`."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    for candidate in (Path(resume_from_checkpoint), Path(output_dir) / resume_from_checkpoint):
        if (candidate / TRAINING_STATE_FILE).is_file():
            return candidate
    raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder")


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that one more fits within `total_limit`; returns the deleted folders."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = checkpoints[: max(len(checkpoints) - total_limit + 1, 0)]
    for folder in removed:
        shutil.rmtree(folder)
    return removed
