"""Refuse a training checkpoint whose pickles hold more than tensors, before Accelerate loads it.

`Accelerator.load_state` (checked against accelerate 1.16) reads the model from safetensors and the optimiser,
scheduler, sampler and RNG states with `torch.load(..., weights_only=True)`, but the objects registered with
`register_for_checkpointing` (here the discriminator, its optimiser and its schedule: `custom_checkpoint_<i>.pkl`)
with `weights_only=False`, which runs whatever the pickle holds. A checkpoint need not be the run's own
(`--resume_from_checkpoint PATH` takes any folder, e.g. one downloaded from the Hub), so [`check_weights_only`] first
reads every pickle of the folder with `weights_only=True` (memory-mapped: no tensor data is read) and refuses the
folder if any needs more. What the training script saves (state dicts of tensors, numbers, strings, lists, dicts,
NumPy RNG states) passes.
"""

import pickle
from pathlib import Path

import torch
from accelerate.utils.other import TORCH_SAFE_GLOBALS


PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


def check_weights_only(checkpoint_dir: str | Path) -> None:
    """Raise `ValueError` naming the first pickle of `checkpoint_dir` (any depth) that `torch.load(...,
    weights_only=True)` refuses; Accelerate's own safe globals (NumPy arrays and dtypes of the RNG states) are
    allowed."""
    checkpoint_dir = Path(checkpoint_dir)
    for path in sorted(checkpoint_dir.rglob("*")):
        if path.suffix not in PICKLE_SUFFIXES or not path.is_file():
            continue
        try:
            with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            reason = " ".join(str(error).split())[:300]
            raise ValueError(
                f"{str(path)!r} holds more than tensors and plain values, and loading it would run pickled code: "
                f"{reason}. Resume only from checkpoints written by this script, or start a new run"
            ) from error


__all__ = ["check_weights_only"]
