"""Write complete Hub folders, one writer per model kind: [`save_tokenizer_folder`] and [`save_unified_folder`].

Every producer of a folder (conversion, `dualtoken init`, training, export, the test assets) goes through these, so a
folder always holds what a Hub user needs: weights, config, remote code, the processor and the model card.
"""

import os
import shutil

from .. import pipeline_dualtoken
from ..image_processing_dualtoken import DualTokenImageProcessor
from ..modeling_dualtoken import DualTokenForConditionalGeneration
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
) -> str:
    """
    Save the unified model (sharded safetensors, remote code, generation config), its processor, the DualToken
    pipelines and the model card (`card`, default `CardDetails()`).

    The folder then loads with `AutoModel`/`AutoProcessor.from_pretrained(save_dir, trust_remote_code=True)` and
    `pipeline("text-to-image" | "any-to-any" | "image-text-to-text", model=save_dir, trust_remote_code=True)`
    where this package is not installed. Returns `save_dir` as a string.
    """
    save_dir = str(save_dir)
    check_image_processor(processor.image_processor, model.config.vision_config, "the processor's image processor")
    model.config.custom_pipelines = pipeline_dualtoken.custom_pipelines_entry()
    model.save_pretrained(save_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(save_dir)
    shutil.copy(pipeline_dualtoken.__file__, os.path.join(save_dir, os.path.basename(pipeline_dualtoken.__file__)))
    write_unified_card(save_dir, model.config, card or CardDetails())
    return save_dir


__all__ = ["save_tokenizer_folder", "save_unified_folder"]
