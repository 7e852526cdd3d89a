"""Multi-process helpers for modules that are kept out of DDP/FSDP/DeepSpeed wrapping (the discriminator), and a
check that replicated state (codebooks, discriminator) really is identical on every process."""

import torch
from accelerate import Accelerator
from torch import nn


def average_gradients(module: nn.Module, accelerator: Accelerator):
    """Average `module`'s gradients over processes with one all-reduce (what DDP would do for a wrapped module)."""
    grads = [parameter.grad for parameter in module.parameters() if parameter.grad is not None]
    if accelerator.num_processes == 1 or not grads:
        return
    averaged = accelerator.reduce(torch.cat([grad.flatten() for grad in grads]), reduction="mean")
    for grad, values in zip(grads, averaged.split([grad.numel() for grad in grads])):
        grad.copy_(values.view_as(grad))


def fingerprints(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One float64 number per tensor: a position-weighted sum, so equal tensors give equal numbers and any change
    (also a permutation) almost surely changes them."""
    values = []
    for tensor in tensors.values():
        flat = tensor.detach().double().flatten()
        values.append((flat * torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)).sum())
    return torch.stack(values)


def out_of_sync(accelerator: Accelerator, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the `tensors` that differ between processes (empty when all processes hold identical values)."""
    gathered = accelerator.gather(fingerprints(tensors)[None]).cpu()
    differs = (gathered != gathered[:1]).any(dim=0)
    return [name for name, flag in zip(tensors, differs.tolist()) if flag]
