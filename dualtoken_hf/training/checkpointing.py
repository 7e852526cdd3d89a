"""Checkpoint folders under `--output_dir` (`checkpoint-<step>`) and the data position saved with each one.

`accelerator.save_state` stores models, optimisers, schedulers, registered objects (discriminator and its optimiser
and schedule), RNG states and the sampler; the codebook EMA state is part of the tokenizer's buffers. What it does not
know is where the run stood in its data, which `training_state.json` adds.

A checkpoint is written atomically ([`save_checkpoint`]): every process saves into `checkpoint-<step>.tmp-<pid>`,
the files are synced to disk, `training_state.json` (the completion marker) is written last, and only then is the
folder renamed to `checkpoint-<step>`. A crash or a full disk while saving therefore never leaves a folder that
`--resume_from_checkpoint latest` could pick half-written, and old checkpoints are pruned only once the new one is
complete (so for a moment `--checkpoints_total_limit` + 1 of them are on disk).

Naming and pruning are our own rather than Accelerate's `ProjectConfiguration(automatic_checkpoint_naming=True,
total_limit=N)` (checked against accelerate 1.16, `Accelerator.save_state`/`load_state`), which does not do this job:

- it names folders `<project_dir>/checkpoints/checkpoint_<i>` by save count, so a folder does not say its optimiser
  step, and `--resume_from_checkpoint checkpoint-<step>` (the transformers/diffusers convention) cannot name one;
- it does not restore the save count on `load_state`, so the first save after a resume fails with "Checkpoint
  directory ... already exists" unless the script resets `project_configuration.iteration` itself;
- it writes in place and prunes before saving, and it counts, prunes and resumes from every folder, also one
  half-written by a crash (`load_state()` picks the highest number).
"""

import dataclasses
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ..cli.parser import positive_int
from ..hub.locking import FolderLock


logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
# Written last into a checkpoint: a folder without it is not a checkpoint.
TRAINING_STATE_FILE = "training_state.json"
# `checkpoint-<step>.tmp-<pid>`: a checkpoint being written (or left by a crash while it was).
PARTIAL_MARK = ".tmp-"


class CheckpointSaveError(OSError):
    """Saving a checkpoint failed; its partial folder was removed and the earlier checkpoints are untouched."""


def add_checkpoint_arguments(group) -> None:
    """The flags every training script shares for checkpoints, resumption and non-finite steps (argparse group)."""
    group.add_argument("--checkpointing_steps", type=positive_int, default=500)
    group.add_argument("--checkpoints_total_limit", type=positive_int, default=None)
    group.add_argument("--resume_from_checkpoint", help="'latest' or a checkpoint folder.")
    group.add_argument("--max_consecutive_nonfinite", type=positive_int, default=10,
                       help="Steps with a NaN/inf loss are skipped (no update) and counted; stop after this many in a "
                            "row.")


@dataclasses.dataclass
class TrainingState:
    """Where a run stands: optimiser steps done, the epoch, the micro-batches of that epoch already consumed (the
    data position to skip to on resume), unreadable images skipped so far (on this process), and optimiser steps
    skipped for a non-finite loss."""

    global_step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    skipped_images: int = 0
    nonfinite_steps: int = 0

    def epoch_batches(self, accelerator: Accelerator, dataloader, dataset):
        """The current epoch's batches from where this state stands in it (after a resume: the rest of the epoch);
        `dataset` and `dataloader` are told the epoch first, so shuffling and augmentation follow it."""
        dataset.set_epoch(self.epoch)
        dataloader.set_epoch(self.epoch)
        if self.batches_in_epoch:
            return accelerator.skip_first_batches(dataloader, self.batches_in_epoch)
        return dataloader

    def end_epoch(self):
        """Move on to the next epoch; an epoch that yielded no batch means the data is empty (or all unreadable)."""
        if self.batches_in_epoch == 0:
            raise RuntimeError("the training data produced no batch")
        self.epoch += 1
        self.batches_in_epoch = 0

    def save(self, checkpoint_dir: str | Path):
        """Write `training_state.json` into `checkpoint_dir` and sync it to disk."""
        with (Path(checkpoint_dir) / TRAINING_STATE_FILE).open("w") as handle:
            handle.write(json.dumps(dataclasses.asdict(self), indent=2))
            handle.flush()
            os.fsync(handle.fileno())

    @classmethod
    def load(cls, checkpoint_dir: str | Path) -> "TrainingState":
        return cls(**json.loads((Path(checkpoint_dir) / TRAINING_STATE_FILE).read_text()))


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of `output_dir` (`checkpoint-<step>` holding a training state), oldest first;
    partial `checkpoint-<step>.tmp-<pid>` folders and folders without the completion marker are left out."""
    name = re.compile(rf"{re.escape(CHECKPOINT_PREFIX)}\d+")
    folders = Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
    complete = [
        folder for folder in folders if name.fullmatch(folder.name) and (folder / TRAINING_STATE_FILE).is_file()
    ]
    return sorted(complete, key=checkpoint_step)


def resolve_checkpoint(output_dir: str | Path, resume_from_checkpoint: str) -> Path | None:
    """`"latest"` -> the newest complete checkpoint of `output_dir` (`None` if there is none); otherwise the given
    folder, as a path or as a name inside `output_dir`."""
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    for candidate in (Path(resume_from_checkpoint), Path(output_dir) / resume_from_checkpoint):
        if (candidate / TRAINING_STATE_FILE).is_file():
            return candidate
    raise ValueError(f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint folder")


def prune_checkpoints(output_dir: str | Path, total_limit: int | None) -> list[Path]:
    """Delete the oldest complete checkpoints until at most `total_limit` remain; returns the deleted folders."""
    if total_limit is None:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = checkpoints[: max(len(checkpoints) - total_limit, 0)]
    for folder in removed:
        shutil.rmtree(folder)
    return removed


def remove_partial_checkpoints(output_dir: str | Path) -> list[Path]:
    """Delete the `checkpoint-<step>.tmp-<pid>` folders a crashed save left in `output_dir`; returns them. Only
    safe while holding the folder's lock (another run's save in progress looks the same)."""
    partial = sorted(Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*{PARTIAL_MARK}*"))
    for folder in partial:
        shutil.rmtree(folder, ignore_errors=True)
    return partial


def claim_output_dir(accelerator: Accelerator, output_dir: str | Path) -> FolderLock | None:
    """
    Lock `output_dir` for this run (on the main process; see [`FolderLock`]) and remove the partial checkpoints a
    crashed run left in it. Call on every process: all of them raise `FolderInUseError` when another process holds
    the folder. Returns the lock on the main process (`None` elsewhere); release it when the run ends (the system
    releases it when the process exits, also on a crash).
    """
    lock, failure = None, None
    if accelerator.is_main_process:
        try:
            lock = FolderLock(output_dir)
        except OSError as error:
            failure = error
    if _failed_anywhere(accelerator, failure):
        raise failure or OSError(f"the main process could not lock {str(output_dir)!r}")
    if lock is not None:
        for folder in remove_partial_checkpoints(output_dir):
            logger.info(f"removed {folder}, a checkpoint left incomplete by an interrupted run")
    return lock


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, state: TrainingState) -> Path:
    """
    Save the full Accelerate state and `state` as `<output_dir>/checkpoint-<step>`, atomically (see the module
    docstring); an existing folder of that step is replaced. Call on every process. Returns the folder.

    Raises `CheckpointSaveError` on every process when saving fails anywhere (a full disk shows as an `OSError` or
    as torch's `RuntimeError`): the partial folder is removed and the earlier checkpoints are untouched.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{state.global_step}"
    # Every process writes its own files (RNG states, shards) into one folder, named after the main process.
    partial = output_dir / broadcast_object_list([f"{final.name}{PARTIAL_MARK}{os.getpid()}"])[0]
    failure = None
    try:
        accelerator.save_state(str(partial))
    except Exception as error:
        failure = error
    _stop_if_failed(accelerator, failure, partial, final)
    if accelerator.is_main_process:
        try:
            _publish(partial, final, state)
        except Exception as error:
            failure = error
    _stop_if_failed(accelerator, failure, partial, final)
    return final


def _publish(partial: Path, final: Path, state: TrainingState):
    """Sync `partial` to disk, add the completion marker, rename it to `final`."""
    for path in partial.rglob("*"):
        if path.is_file():
            _fsync(path)
    state.save(partial)
    _fsync(partial)
    if final.exists():  # a run resumed from an earlier checkpoint saves this step again
        replaced = final.with_name(f"{partial.name}-replaced")
        os.replace(final, replaced)
        os.replace(partial, final)
        shutil.rmtree(replaced)
    else:
        os.replace(partial, final)
    _fsync(final.parent)


def _fsync(path: Path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _failed_anywhere(accelerator: Accelerator, failure: BaseException | None) -> bool:
    """Whether any process reports a failure (a collective: call on every process)."""
    flag = torch.tensor(int(failure is not None), device=accelerator.device)
    return accelerator.reduce(flag, reduction="sum").item() > 0


def _stop_if_failed(accelerator: Accelerator, failure: BaseException | None, partial: Path, final: Path):
    if not _failed_anywhere(accelerator, failure):
        return
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    checkpoints = list_checkpoints(final.parent)
    message = (
        f"could not save {final.name} in {str(final.parent)!r}: "
        + (f"{type(failure).__name__}: {failure}" if failure is not None else "it failed on another process")
        + ". Nothing of it was kept; the newest complete checkpoint is "
        + (checkpoints[-1].name if checkpoints else "none")
        + ". Free disk space (or fix the cause), then resume with --resume_from_checkpoint latest."
    )
    raise CheckpointSaveError(message) from failure
