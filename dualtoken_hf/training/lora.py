"""The LLM of the unified stages trained through a PEFT LoRA adapter instead of in full (`examples/train_unified.py
--lora_rank`): wrap the model, continue a saved adapter, freeze by stage, save.

A unified folder keeps the adapter in its `language_model_adapter/` subfolder (the standard PEFT files, keys as PEFT
saves an adapter of the whole unified model), next to the unmerged base weights. `load_unified(folder)` and
`AutoModel.from_pretrained(folder, trust_remote_code=True)` merge it; training loads the folder unmerged
(`load_unified(folder, merge_adapter=False)`) and continues the adapter with [`load_language_model_adapter`].
"""

import dataclasses
import os
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from ..hub.folders import language_model_adapter_dir
from ..hub.writing import save_unified_folder
from ..modeling_dualtoken import ADAPTER_WEIGHTS_NAME, LANGUAGE_MODEL_ADAPTER
from .unified import Stage, apply_stage, lora_target_modules


def add_language_model_lora(model: nn.Module, rank: int, alpha: float) -> PeftModel:
    """`model` wrapped with new LoRA adapters (rank `rank`, scale `alpha / rank`, no dropout) on every linear layer
    of its LLM (`lora_target_modules`: attention and MLP projections, not the tied LM head)."""
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                        target_modules=lora_target_modules(model, ("language_model",)))
    return get_peft_model(model, config)


def load_language_model_adapter(model: nn.Module, folder: str | os.PathLike) -> PeftModel | None:
    """`model` (loaded from `folder` with `merge_adapter=False`) wrapped with the LLM adapter saved in `folder`, as
    it was saved and trainable; `None` when `folder` has no adapter."""
    adapter_dir = language_model_adapter_dir(folder)
    if adapter_dir is None:
        return None
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)


def apply_lora_stage(model: PeftModel, stage: Stage) -> list[str]:
    """`apply_stage` for a model whose LLM has a LoRA adapter: the stage's groups other than the LLM train in full;
    the LLM trains through its adapter only when the stage trains it (its base weights stay frozen), else the adapter
    stays frozen too. Returns the names of the trained parameters (in the unwrapped model)."""
    unified = model.get_base_model()
    others = tuple(group for group in stage.trains if group != "language_model")
    trained = apply_stage(unified, dataclasses.replace(stage, trains=others)) if others else []
    if not others:
        unified.requires_grad_(False)
    if "language_model" in stage.trains:
        for name, parameter in unified.named_parameters():
            if ".lora_" in name:
                parameter.requires_grad_(True)
                trained.append(name)
    return trained


def save_lora_unified_folder(model: PeftModel, processor, save_dir: str | os.PathLike, **kwargs) -> str:
    """`save_unified_folder` (same keyword arguments) for a model whose LLM has a LoRA adapter: the unmerged base
    weights under their usual names, and the adapter in `language_model_adapter/` (`adapter_config.json`,
    `adapter_model.safetensors`)."""
    unified = model.get_base_model()
    state_dict = {name.replace(".base_layer.", "."): value for name, value in unified.state_dict().items()
                  if ".lora_" not in name}
    save_unified_folder(unified, processor, save_dir, state_dict=state_dict, **kwargs)
    adapter_dir = Path(save_dir) / LANGUAGE_MODEL_ADAPTER
    model.peft_config["default"].save_pretrained(adapter_dir)
    save_file({name: value.contiguous() for name, value in get_peft_model_state_dict(model).items()},
              adapter_dir / ADAPTER_WEIGHTS_NAME, metadata={"format": "pt"})
    return str(save_dir)


__all__ = [
    "add_language_model_lora",
    "apply_lora_stage",
    "load_language_model_adapter",
    "save_lora_unified_folder",
]
