"""DualToken, Hugging Face native: a dual-codebook (pixel + semantic) vision tokenizer and the unified MLLM on it.

Importing the package registers its classes with the transformers Auto classes (and the "text-to-image" pipeline),
so saved folders load with `AutoModel.from_pretrained(path)` without `trust_remote_code`; the folders also carry
their own remote code for places where this package is not installed.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForMultimodalLM,
    AutoProcessor,
)

from .configuration_dualtoken import DualTokenConfig, DualTokenVisionConfig
from .image_processing_dualtoken import DualTokenImageProcessor
from .modeling_dualtoken import (
    DualTokenCausalLMOutputWithPast,
    DualTokenForConditionalGeneration,
    DualTokenImageGenerationOutput,
)
from .modeling_dualtoken_decoder import DualTokenPixelDecoder
from .modeling_dualtoken_vision import DualTokenVisionModel, DualTokenVisionOutput
from .pipeline_dualtoken import register_pipelines
from .processing_dualtoken import DualTokenProcessor
from .quantization_dualtoken import DualTokenResidualQuantizer, ResidualQuantizerOutput


AutoConfig.register(DualTokenVisionConfig.model_type, DualTokenVisionConfig, exist_ok=True)
AutoConfig.register(DualTokenConfig.model_type, DualTokenConfig, exist_ok=True)
AutoModel.register(DualTokenVisionConfig, DualTokenVisionModel, exist_ok=True)
for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM):
    auto_class.register(DualTokenConfig, DualTokenForConditionalGeneration, exist_ok=True)
for config_class in (DualTokenVisionConfig, DualTokenConfig):
    AutoImageProcessor.register(config_class, image_processor_classes={"pil": DualTokenImageProcessor}, exist_ok=True)
AutoProcessor.register(DualTokenConfig, DualTokenProcessor, exist_ok=True)
register_pipelines()

# Saved folders get an `auto_map` and a copy of these modules, so they also load where the package is absent.
DualTokenVisionConfig.register_for_auto_class()
DualTokenConfig.register_for_auto_class()
DualTokenVisionModel.register_for_auto_class("AutoModel")
DualTokenImageProcessor.register_for_auto_class("AutoImageProcessor")
DualTokenForConditionalGeneration.register_for_auto_class("AutoModel")
DualTokenProcessor.register_for_auto_class("AutoProcessor")

__version__ = "0.1.0"

__all__ = [
    "DualTokenCausalLMOutputWithPast",
    "DualTokenConfig",
    "DualTokenForConditionalGeneration",
    "DualTokenImageGenerationOutput",
    "DualTokenImageProcessor",
    "DualTokenPixelDecoder",
    "DualTokenProcessor",
    "DualTokenResidualQuantizer",
    "DualTokenVisionConfig",
    "DualTokenVisionModel",
    "DualTokenVisionOutput",
    "ResidualQuantizerOutput",
]
