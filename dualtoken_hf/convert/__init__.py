"""Converters from the official DualToken checkpoints (not needed by a Hub folder)."""

from .official import official_config_to_hf, official_to_hf


__all__ = ["official_config_to_hf", "official_to_hf"]
