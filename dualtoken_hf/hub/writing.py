"""Write complete Hub folders, one writer per model kind: [`save_tokenizer_folder`] and [`save_unified_folder`].

Every producer of a folder (conversion, `dualtoken init`, training, export, the test assets) goes through these, so a
folder always holds what a Hub user needs: weights, config, remote code, the processor and the model card.
"""

import os
import shutil

import torch
from transformers import AutoConfig

from .. import pipeline_dualtoken
from ..image_processing_dualtoken import DualTokenImageProcessor
from ..modeling_dualtoken import EXTRA_EMBEDDINGS_KEY, DualTokenForConditionalGeneration, from_base_language_model
from ..modeling_dualtoken_vision import DualTokenVisionModel
from ..processing_dualtoken import DualTokenProcessor
from .cards import CardDetails, write_tokenizer_card, write_unified_card
from .folders import check_image_processor


def save_tokenizer_folder(
    model: DualTokenVisionModel,
    save_dir: str | os.PathLike,
    image_processor: DualTokenImageProcessor | None = None,
    card: CardDetails | None = None,
    state_dict: dict | None = None,
    max_shard_size: str | int = "5GB",
) -> str:
    """
    Save a tokenizer (safetensors, config, remote code), its image processor and its model card.

    The folder then loads with `AutoModel`/`AutoImageProcessor.from_pretrained(save_dir, trust_remote_code=True)`
    where this package is not installed. Returns `save_dir` as a string.

    Args:
        model: The tokenizer.
        save_dir: Where to write.
        image_processor: The processor to save; defaults to the standard one for the model's image size. Its crop
            must be the model's image size.
        card: What the model card says beyond the config; defaults to `CardDetails()`.
        state_dict: The weights to save instead of `model.state_dict()` (e.g. gathered from a sharded training run).
        max_shard_size: Largest safetensors file before the weights are sharded.
    """
    save_dir = str(save_dir)
    if image_processor is None:
        image_processor = DualTokenImageProcessor.from_vision_config(model.config)
    check_image_processor(image_processor, model.config, "the image processor to save")
    model.save_pretrained(save_dir, state_dict=state_dict, max_shard_size=max_shard_size)
    image_processor.save_pretrained(save_dir)
    write_tokenizer_card(save_dir, model.config, card or CardDetails())
    return save_dir


def save_unified_folder(
    model: DualTokenForConditionalGeneration,
    processor: DualTokenProcessor,
    save_dir: str | os.PathLike,
    card: CardDetails | None = None,
    max_shard_size: str | int = "5GB",
    state_dict: dict | None = None,
    base_language_model: dict | None = None,
) -> str:
    """
    Save the unified model (sharded safetensors, remote code, generation config), its processor, the DualToken
    pipelines and the model card (`card`, default `CardDetails()`).

    The folder then loads with `AutoModel`/`AutoProcessor.from_pretrained(save_dir, trust_remote_code=True)` and
    `pipeline("text-to-image" | "any-to-any" | "image-text-to-text", model=save_dir, trust_remote_code=True)`
    where this package is not installed. Returns `save_dir` as a string.

    Args:
        state_dict: The weights to save instead of `model.state_dict()`.
        base_language_model: Save only the trained parts: `{"name_or_path": ..., "gguf_file": ...}` (`gguf_file`
            optional; `vocab_size` is read from the base LLM's config when missing) names the base LLM, whose
            weights the folder then lacks and `from_pretrained` loads; the input embeddings' rows beyond its
            vocabulary are kept (`EXTRA_EMBEDDINGS_KEY`). For a model whose LLM is the base LLM, or trains through
            a LoRA adapter (`dualtoken_hf.training.lora`): other changes of the LLM weights are not saved.
    """
    save_dir = str(save_dir)
    check_image_processor(processor.image_processor, model.config.vision_config, "the processor's image processor")
    model.config.custom_pipelines = pipeline_dualtoken.custom_pipelines_entry()
    if base_language_model is not None:
        base_language_model = _with_vocab_size(base_language_model)
        state_dict = trained_parts(model, model.state_dict() if state_dict is None else state_dict,
                                   base_language_model["vocab_size"])
    model.config.base_language_model = base_language_model
    try:
        model.save_pretrained(save_dir, state_dict=state_dict, max_shard_size=max_shard_size)
    finally:
        model.config.base_language_model = None  # the model in memory stays complete
    processor.save_pretrained(save_dir)
    shutil.copy(pipeline_dualtoken.__file__, os.path.join(save_dir, os.path.basename(pipeline_dualtoken.__file__)))
    write_unified_card(save_dir, model.config, card or CardDetails())
    return save_dir


def _with_vocab_size(base_language_model: dict) -> dict:
    unknown = set(base_language_model) - {"name_or_path", "gguf_file", "vocab_size"}
    if "name_or_path" not in base_language_model or unknown:
        raise ValueError(f"base_language_model needs 'name_or_path' and may have 'gguf_file' and 'vocab_size', got "
                         f"{sorted(base_language_model)}")
    if "vocab_size" in base_language_model:
        return base_language_model
    gguf_file = base_language_model.get("gguf_file")
    config = from_base_language_model(base_language_model,
                                      lambda source: AutoConfig.from_pretrained(source, gguf_file=gguf_file))
    return {**base_language_model, "vocab_size": config.get_text_config().vocab_size}


def trained_parts(model: DualTokenForConditionalGeneration, state_dict: dict[str, torch.Tensor],
                  vocab_size: int) -> dict[str, torch.Tensor]:
    """`state_dict` without the LLM and its tied LM head, plus the input embeddings' rows from `vocab_size` on (the
    tokens added to the base LLM's vocabulary) as `EXTRA_EMBEDDINGS_KEY`."""
    if not model.config.tie_word_embeddings:
        raise ValueError("a folder without the base LLM needs the LM head tied to the input embeddings; this model's "
                         "is untied (tie_word_embeddings=False)")
    embeddings = model.get_input_embeddings().weight
    name = next(f"language_model.{name}" for name, parameter in model.language_model.named_parameters()
                if parameter is embeddings)
    if not 0 < vocab_size <= embeddings.shape[0]:
        raise ValueError(f"the base LLM's vocab_size must be in [1, {embeddings.shape[0]}] (this model's), got "
                         f"{vocab_size}")
    parts = {key: value for key, value in state_dict.items() if not key.startswith(("language_model.", "lm_head."))}
    parts[EXTRA_EMBEDDINGS_KEY] = state_dict[name][vocab_size:].clone()
    return parts


__all__ = ["save_tokenizer_folder", "save_unified_folder", "trained_parts"]
