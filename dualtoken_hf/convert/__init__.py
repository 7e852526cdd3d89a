"""Converters from the official DualToken checkpoints (not needed by a Hub folder).

`load_official_checkpoint(path)` reads a checkpoint file's state and stored configs; `official_to_hf` maps them to our
config and state dict; `convert_official_folder` does both and writes a Hub-ready folder (`dualtoken convert-official`).
"""

from .checkpoint import convert_official_folder, load_official_checkpoint, read_official_checkpoint
from .official import official_config_to_hf, official_to_hf


__all__ = [
    "convert_official_folder",
    "load_official_checkpoint",
    "official_config_to_hf",
    "official_to_hf",
    "read_official_checkpoint",
]
