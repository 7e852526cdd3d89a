"""DualToken, Hugging Face native: a dual-codebook (pixel + semantic) vision tokenizer and the unified MLLM on it.

The package imports lazily (PEP 562): `import dualtoken_hf` loads neither torch nor transformers, so the `dualtoken`
command line answers `--help` at once. The first access to a public name (`from dualtoken_hf import
DualTokenVisionModel`) imports the model code and registers its classes with the transformers Auto classes (and the
"text-to-image" pipeline), so saved folders load with `AutoModel.from_pretrained(path)` without `trust_remote_code`
and `save_pretrained` writes an `auto_map` and a copy of the remote code, for places where this package is not
installed. Code that reaches the classes only through the Auto classes calls [`register_auto_classes`] first; the
`hub` subpackage, which every folder writer goes through, calls it when it is imported.
"""

import importlib


__version__ = "0.1.0"

# public name -> the Hub module that defines it
_EXPORTS = {
    "DualTokenCausalLMOutputWithPast": "modeling_dualtoken",
    "DualTokenConfig": "configuration_dualtoken",
    "DualTokenDepthHeadConfig": "configuration_dualtoken",
    "DualTokenForConditionalGeneration": "modeling_dualtoken",
    "DualTokenImageGenerationOutput": "modeling_dualtoken",
    "DualTokenImageProcessor": "image_processing_dualtoken",
    "DualTokenPixelDecoder": "modeling_dualtoken_decoder",
    "DualTokenPixelDecoderConfig": "configuration_dualtoken",
    "DualTokenProcessor": "processing_dualtoken",
    "DualTokenQuantizerConfig": "configuration_dualtoken",
    "DualTokenResidualQuantizer": "quantization_dualtoken",
    "DualTokenVisionConfig": "configuration_dualtoken",
    "DualTokenVisionModel": "modeling_dualtoken_vision",
    "DualTokenVisionOutput": "modeling_dualtoken_vision",
    "ResidualQuantizerOutput": "quantization_dualtoken",
}

__all__ = [*_EXPORTS, "register_auto_classes"]

_auto_classes_registered = False


def register_auto_classes() -> None:
    """Register the DualToken classes with transformers' Auto classes and pipelines (once; later calls do nothing).

    After it, `AutoConfig`/`AutoModel`/`AutoModelForCausalLM`/`AutoModelForImageTextToText`/
    `AutoModelForMultimodalLM`/`AutoImageProcessor`/`AutoProcessor.from_pretrained(path)` and
    `pipeline("text-to-image", model=path)` load DualToken folders without `trust_remote_code`, and `save_pretrained`
    writes an `auto_map` and copies the remote code into the folder. Accessing any public name of the package
    calls it, so it is only needed where the Auto classes are used before any DualToken class is touched.
    """
    global _auto_classes_registered
    if _auto_classes_registered:
        return
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
    from .modeling_dualtoken import DualTokenForConditionalGeneration
    from .modeling_dualtoken_vision import DualTokenVisionModel
    from .pipeline_dualtoken import register_pipelines
    from .processing_dualtoken import DualTokenProcessor

    AutoConfig.register(DualTokenVisionConfig.model_type, DualTokenVisionConfig, exist_ok=True)
    AutoConfig.register(DualTokenConfig.model_type, DualTokenConfig, exist_ok=True)
    AutoModel.register(DualTokenVisionConfig, DualTokenVisionModel, exist_ok=True)
    for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM):
        auto_class.register(DualTokenConfig, DualTokenForConditionalGeneration, exist_ok=True)
    for config_class in (DualTokenVisionConfig, DualTokenConfig):
        AutoImageProcessor.register(
            config_class, image_processor_classes={"pil": DualTokenImageProcessor}, exist_ok=True
        )
    AutoProcessor.register(DualTokenConfig, DualTokenProcessor, exist_ok=True)
    register_pipelines()

    # Saved folders get an `auto_map` and a copy of these modules, so they also load where the package is absent.
    DualTokenVisionConfig.register_for_auto_class()
    DualTokenConfig.register_for_auto_class()
    DualTokenVisionModel.register_for_auto_class("AutoModel")
    DualTokenImageProcessor.register_for_auto_class("AutoImageProcessor")
    DualTokenForConditionalGeneration.register_for_auto_class("AutoModel")
    DualTokenProcessor.register_for_auto_class("AutoProcessor")
    _auto_classes_registered = True


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
