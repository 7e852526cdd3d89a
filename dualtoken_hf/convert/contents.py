"""What an official checkpoint dict holds: the `RQVAESiglipModel` state under `"state_dict"` (or `"model"`), possibly
with DDP's `module.` prefixes, and the config dicts saved beside it (`rqvaesiglip_config`, `siglip_vision_config`,
`siglip_text_config`; dicts or JSON strings). A plain dict of tensors is a state dict on its own.
"""

import json

import torch


CONFIG_ENTRIES = ("rqvaesiglip_config", "siglip_vision_config", "siglip_text_config")
STATE_ENTRIES = ("state_dict", "model")
DDP_PREFIX = "module."


def config_entry(value, name: str, source: str) -> dict:
    """A config entry of a checkpoint (a dict, or a JSON string of one) as a dict; `source` names the checkpoint."""
    if isinstance(value, dict):
        return value
    try:
        config = json.loads(value)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{name} in {source} is not a JSON config dict: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{name} in {source} must be a JSON object, got {type(config).__name__}")
    return config


def state_entry(checkpoint: dict) -> str | None:
    """The entry of a training checkpoint dict that holds the model state, or `None` for a plain state dict."""
    return next((name for name in STATE_ENTRIES if isinstance(checkpoint.get(name), dict)), None)


def unpack_checkpoint(checkpoint: dict, source: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """`(state_dict without module. prefixes, {config entry name: config dict})` of a checkpoint dict or a plain
    state dict (which carries no configs). Raises `ValueError` when it holds no dict of tensors."""
    entry = state_entry(checkpoint)
    state = checkpoint[entry] if entry else checkpoint
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(
            f"{source} holds no state dict: expected a {' or '.join(map(repr, STATE_ENTRIES))} entry of tensors or a "
            f"dict of tensors, got the entries {sorted(map(str, checkpoint))[:10]}"
        )
    configs = {}
    if entry:
        configs = {name: config_entry(checkpoint[name], name, source) for name in CONFIG_ENTRIES if name in checkpoint}
    return {key.removeprefix(DDP_PREFIX): value for key, value in state.items()}, configs


__all__ = ["CONFIG_ENTRIES", "DDP_PREFIX", "STATE_ENTRIES", "config_entry", "state_entry", "unpack_checkpoint"]
