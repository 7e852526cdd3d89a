"""Optimiser steps with a non-finite loss: skipped on every process, counted, and fatal after too many in a row.

Gradients are only applied at the end of a step, so skipping the optimiser steps keeps the weights and optimiser
states as they were. The codebooks are different: their EMA (and the discriminator's BatchNorm statistics) move
inside every training forward, before the loss is known, and a non-finite batch (NaN latents) would write NaN into
the EMA sums, which no later step repairs. [`NonFiniteGuard`] therefore copies these buffers before the first
forward of each step and puts them back when the step is skipped: a skipped step leaves the model exactly as it
was. Its data is consumed all the same; the learning-rate schedules wait for the next real update (as Accelerate
does for steps a gradient scaler skips). Under DeepSpeed the engine steps inside `backward`, before the guard can
decide, so there only the codebooks and the discriminator are protected.
"""

from collections.abc import Iterable

import torch
from accelerate import Accelerator
from torch import nn

from .checkpointing import TrainingState


class NonFiniteLossError(RuntimeError):
    """Too many optimiser steps in a row had a non-finite loss."""


class NonFiniteGuard:
    """
    Decides, once per optimiser step and identically on every process, whether the step is skipped because a loss
    was NaN or infinite on some process.

    Per micro-batch call [`before_forward`] then [`observe`] with its losses; at the end of the accumulation call
    [`skip_step`] on every process, and skip the optimiser steps when it returns `True`.

    Args:
        modules: Modules whose buffers change in the training forward (quantizers, BatchNorm); restored on a skip.
        max_consecutive: Raise `NonFiniteLossError` at this many skipped steps in a row.
    """

    def __init__(self, modules: Iterable[nn.Module], max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be at least 1, got {max_consecutive}")
        self.buffers = [buffer for module in modules for buffer in module.buffers()]
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self._saved_buffers: list[torch.Tensor] | None = None
        self._nonfinite: torch.Tensor | None = None

    def before_forward(self):
        """Copy the buffers if this is the first micro-batch of the step."""
        if self._saved_buffers is None:
            self._saved_buffers = [buffer.detach().clone() for buffer in self.buffers]

    def observe(self, *losses: torch.Tensor):
        """Note whether every loss of this micro-batch is finite (kept on the device: no synchronisation here)."""
        nonfinite = torch.stack([~torch.isfinite(loss.detach()).all() for loss in losses]).any()
        self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite | nonfinite

    def skip_step(self, accelerator: Accelerator, state: TrainingState) -> bool:
        """
        Whether any process saw a non-finite loss during step `state.global_step` (a collective: call on every
        process, after counting the step). If so,
        restore the buffers, count the step in `state.nonfinite_steps`, and raise `NonFiniteLossError` once
        `max_consecutive` steps in a row were skipped.
        """
        if self._nonfinite is None:
            raise RuntimeError("skip_step() before any observe(): no loss of this step was seen")
        skip = accelerator.reduce(self._nonfinite.to(accelerator.device, torch.int64), reduction="sum").item() > 0
        if skip:
            for buffer, saved in zip(self.buffers, self._saved_buffers):
                buffer.copy_(saved)
            state.nonfinite_steps += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
        self._saved_buffers, self._nonfinite = None, None
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"{self.consecutive} optimiser steps in a row had a non-finite loss (the last at step "
                f"{state.global_step}); stopping, as --max_consecutive_nonfinite {self.max_consecutive} asks. "
                "They changed nothing: resume from the last checkpoint with a lower --learning_rate or a "
                "--max_grad_norm, and check the training data for broken images"
            )
        return skip
