"""Open saved DualToken folders: tell a tokenizer folder from a unified one and load what a task needs from it.

Not a Hub module (it may import the package). Every check raises `FileNotFoundError` or `ValueError` with a message
that names the folder and what was expected, so the command line can print it as it is.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModel, AutoProcessor
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from ..configuration_dualtoken import DualTokenConfig, DualTokenVisionConfig
from ..image_processing_dualtoken import DualTokenImageProcessor
from ..modeling_dualtoken import LANGUAGE_MODEL_ADAPTER, DualTokenForConditionalGeneration
from ..modeling_dualtoken_vision import DualTokenVisionModel
from ..processing_dualtoken import DualTokenProcessor


TOKENIZER = DualTokenVisionConfig.model_type
UNIFIED = DualTokenConfig.model_type
MODEL_TYPES = (TOKENIZER, UNIFIED)
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
VISION_TOKENIZER_PREFIX = "vision_tokenizer."


def folder_model_type(folder: str | os.PathLike) -> str:
    """`"dualtoken_vision"` (a tokenizer folder) or `"dualtoken"` (a unified model folder), read from `config.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist or is not a folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"not a DualToken model folder: {str(folder)!r} has no config.json")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ValueError(f"not a DualToken model folder: {str(config_file)!r} is not valid JSON ({error})") from error
    if model_type not in MODEL_TYPES:
        raise ValueError(
            f"not a DualToken model folder: {str(folder)!r} holds a {model_type!r} model, expected one of {MODEL_TYPES}"
        )
    return model_type


def load_model(folder: str | os.PathLike, **kwargs) -> DualTokenVisionModel | DualTokenForConditionalGeneration:
    """The tokenizer or unified model saved in `folder`, in eval mode; `kwargs` go to `from_pretrained`."""
    folder_model_type(folder)
    return AutoModel.from_pretrained(folder, use_safetensors=True, **kwargs).eval()


def load_unified(folder: str | os.PathLike, merge_adapter: bool = True) -> DualTokenForConditionalGeneration:
    """The unified model of `folder`, with the LoRA adapter of its LLM merged if it has one (`merge_adapter=False`:
    left out, for training to continue it); a tokenizer folder is refused (it cannot generate or describe)."""
    if folder_model_type(folder) != UNIFIED:
        raise ValueError(
            f"{str(folder)!r} holds a vision tokenizer; this needs a unified DualToken model folder "
            f"(model_type {UNIFIED!r}, e.g. from `dualtoken init`)"
        )
    return load_model(folder, merge_adapter=merge_adapter)


def folder_base_language_model(folder: str | os.PathLike) -> dict | None:
    """The base LLM a trained-parts-only unified folder is loaded with (`DualTokenConfig.base_language_model`),
    `None` for a complete folder. Read from `config.json`: a loaded model is complete and no longer says."""
    return json.loads((Path(folder) / "config.json").read_text()).get("base_language_model")


def language_model_adapter_dir(folder: str | os.PathLike) -> Path | None:
    """The subfolder of `folder` with its LLM's LoRA adapter (PEFT files), `None` when it has none."""
    adapter_dir = Path(folder) / LANGUAGE_MODEL_ADAPTER
    return adapter_dir if (adapter_dir / "adapter_config.json").is_file() else None


def load_tokenizer(folder: str | os.PathLike) -> DualTokenVisionModel:
    """The vision tokenizer of a tokenizer folder, or the `vision_tokenizer` of a unified folder (read without
    loading the LLM weights)."""
    if folder_model_type(folder) == TOKENIZER:
        return load_model(folder)
    config = DualTokenConfig.from_pretrained(folder)
    tokenizer = DualTokenVisionModel(config.vision_config)
    tokenizer.load_state_dict(_read_weights(Path(folder), VISION_TOKENIZER_PREFIX))
    return tokenizer.eval()


def _read_weights(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a saved model whose names start with `prefix` (prefix removed), from one or many shards."""
    index_file = folder / SAFE_WEIGHTS_INDEX_NAME
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted({shard for name, shard in weight_map.items() if name.startswith(prefix)})
    else:
        shards = [SAFE_WEIGHTS_NAME]
    weights = {}
    for shard in shards:
        if not (folder / shard).is_file():
            raise FileNotFoundError(f"model folder {str(folder)!r} lacks its weights file {shard}")
        with safe_open(folder / shard, "pt") as handle:
            for name in handle.keys():
                if name.startswith(prefix):
                    weights[name[len(prefix) :]] = handle.get_tensor(name)
    return weights


def tokenizer_of(model: DualTokenVisionModel | DualTokenForConditionalGeneration) -> DualTokenVisionModel:
    """The vision tokenizer itself, or the one inside a unified model."""
    return model.vision_tokenizer if isinstance(model, DualTokenForConditionalGeneration) else model


def load_image_processor(folder: str | os.PathLike, config: DualTokenVisionConfig) -> DualTokenImageProcessor:
    """The image processor saved in `folder`, else the standard one for `config`; its crop must be the image size."""
    if any((Path(folder) / name).is_file() for name in IMAGE_PROCESSOR_FILES):
        image_processor = DualTokenImageProcessor.from_pretrained(folder)
    else:
        image_processor = DualTokenImageProcessor.from_vision_config(config)
    check_image_processor(image_processor, config, f"the image processor of {str(folder)!r}")
    return image_processor


def check_image_processor(image_processor: DualTokenImageProcessor, config: DualTokenVisionConfig, name: str) -> None:
    """Raise a `ValueError` naming `name` if the image processor crops to another size than the tokenizer reads."""
    crop = (image_processor.crop_size.height, image_processor.crop_size.width)
    if image_processor.do_center_crop and crop != (config.image_size, config.image_size):
        raise ValueError(
            f"{name} crops to {crop[0]}x{crop[1]} but the tokenizer reads {config.image_size}x{config.image_size} "
            "images"
        )


def load_processor(folder: str | os.PathLike) -> DualTokenProcessor:
    """The `DualTokenProcessor` (text tokenizer, image processor, chat template) saved with a unified model."""
    if not (Path(folder) / "processor_config.json").is_file():
        raise FileNotFoundError(
            f"{str(folder)!r} has no processor_config.json: a unified model folder needs its DualTokenProcessor "
            "(save it with `dualtoken_hf.hub.save_unified_folder`)"
        )
    return AutoProcessor.from_pretrained(folder)


__all__ = [
    "MODEL_TYPES",
    "TOKENIZER",
    "UNIFIED",
    "check_image_processor",
    "folder_base_language_model",
    "folder_model_type",
    "language_model_adapter_dir",
    "load_image_processor",
    "load_model",
    "load_processor",
    "load_tokenizer",
    "load_unified",
    "tokenizer_of",
]
