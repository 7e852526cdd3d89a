"""DualToken, Hugging Face native: a dual-codebook (pixel + semantic) vision tokenizer.

Importing the package registers its classes with the transformers Auto classes, so saved folders load with
`AutoModel.from_pretrained(path)` without `trust_remote_code`; the folders also carry their own remote code.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel

from .configuration_dualtoken import DualTokenVisionConfig
from .image_processing_dualtoken import DualTokenImageProcessor
from .modeling_dualtoken_decoder import DualTokenPixelDecoder
from .modeling_dualtoken_vision import DualTokenVisionModel, DualTokenVisionOutput
from .quantization_dualtoken import DualTokenResidualQuantizer, ResidualQuantizerOutput


AutoConfig.register(DualTokenVisionConfig.model_type, DualTokenVisionConfig, exist_ok=True)
AutoModel.register(DualTokenVisionConfig, DualTokenVisionModel, exist_ok=True)
AutoImageProcessor.register(DualTokenVisionConfig, image_processor_classes={"pil": DualTokenImageProcessor}, exist_ok=True)

# Saved folders get an `auto_map` and a copy of these modules, so they also load where the package is absent.
DualTokenVisionConfig.register_for_auto_class()
DualTokenVisionModel.register_for_auto_class("AutoModel")
DualTokenImageProcessor.register_for_auto_class("AutoImageProcessor")

__version__ = "0.1.0"

__all__ = [
    "DualTokenImageProcessor",
    "DualTokenPixelDecoder",
    "DualTokenResidualQuantizer",
    "DualTokenVisionConfig",
    "DualTokenVisionModel",
    "DualTokenVisionOutput",
    "ResidualQuantizerOutput",
]
