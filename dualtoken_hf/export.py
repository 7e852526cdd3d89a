"""Write complete Hub folders for the unified model (not a Hub module: it may import the package)."""

import os
import shutil

from . import pipeline_dualtoken
from .modeling_dualtoken import DualTokenForConditionalGeneration
from .processing_dualtoken import DualTokenProcessor


def save_unified_folder(
    model: DualTokenForConditionalGeneration,
    processor: DualTokenProcessor,
    save_dir: str | os.PathLike,
    max_shard_size: str | int = "5GB",
) -> str:
    """Save model (sharded safetensors, remote code, generation config), processor and the DualToken pipelines.

    The folder then loads with `AutoModel`/`AutoProcessor.from_pretrained(save_dir, trust_remote_code=True)` and
    `pipeline("text-to-image" | "any-to-any" | "image-text-to-text", model=save_dir, trust_remote_code=True)`
    where this package is not installed. Returns `save_dir` as a string.
    """
    save_dir = str(save_dir)
    model.config.custom_pipelines = pipeline_dualtoken.custom_pipelines_entry()
    model.save_pretrained(save_dir, max_shard_size=max_shard_size)
    processor.save_pretrained(save_dir)
    shutil.copy(pipeline_dualtoken.__file__, os.path.join(save_dir, os.path.basename(pipeline_dualtoken.__file__)))
    return save_dir


__all__ = ["save_unified_folder"]
