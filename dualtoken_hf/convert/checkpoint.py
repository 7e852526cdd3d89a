"""Official tokenizer checkpoint files -> a `DualTokenVisionModel`, reporting what the conversion did not use.

An official training checkpoint (`epoch_N.pt`) is a `torch.save`d dict whose `"state_dict"` (or `"model"`) entry holds
the `RQVAESiglipModel` state, possibly with DDP's `module.` prefixes; a plain state dict of tensors works too. The
reference state files (`.safetensors`) hold the state directly. Config dicts are read from the entries
`rqvaesiglip_config`, `siglip_vision_config` and `siglip_text_config` (safetensors metadata as JSON strings, or dict
or JSON-string entries of a `.pt` checkpoint) when present; explicit arguments take precedence.

`.pt` files are loaded with `torch.load(..., weights_only=True)`, which refuses pickled Python objects: a checkpoint
that holds any (e.g. an `argparse.Namespace` of training arguments) needs `allow_pickle=True`, which runs the pickled
code, so only for files from a trusted source.
"""

import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import SiglipTextConfig, SiglipTextModel

from ..hub.cards import CardDetails
from ..hub.writing import save_tokenizer_folder
from ..modeling_dualtoken_vision import DualTokenVisionModel
from .official import SIGLIP_PREFIX, official_module_prefixes, official_to_hf


CONFIG_ENTRIES = ("rqvaesiglip_config", "siglip_vision_config", "siglip_text_config")
STATE_ENTRIES = ("state_dict", "model")
SAFETENSORS_SUFFIX = ".safetensors"
DDP_PREFIX = "module."
TEXT_TOWER_PREFIX = "siglip_model.text_model."
TEXT_TOWER_FOLDER = "siglip_text"
CONTRASTIVE_KEYS = ("siglip_model.logit_scale", "siglip_model.logit_bias")


class PickleRequiredError(ValueError):
    """A checkpoint holds pickled Python objects, which `weights_only` loading refuses."""


@dataclass
class OfficialCheckpoint:
    """An official checkpoint file, read: its state dict (no `module.` prefixes) and the config dicts it carries."""

    path: Path
    state_dict: dict[str, torch.Tensor]
    configs: dict[str, dict] = field(default_factory=dict)
    epoch: int | None = None


@dataclass
class ConvertedTokenizer:
    """The converted tokenizer and the official keys that no part of it used."""

    model: DualTokenVisionModel
    unused_keys: list[str]


def _config_entry(value, name: str, path: Path) -> dict:
    if isinstance(value, dict):
        return value
    try:
        config = json.loads(value)
    except (TypeError, json.JSONDecodeError) as error:
        raise ValueError(f"{name} in {str(path)!r} is not a JSON config dict: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{name} in {str(path)!r} must be a JSON object, got {type(config).__name__}")
    return config


def _read_safetensors(path: Path) -> OfficialCheckpoint:
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(path)
    except SafetensorError as error:
        raise ValueError(f"cannot read {str(path)!r} as a safetensors file: {error}") from error
    configs = {name: _config_entry(metadata[name], name, path) for name in CONFIG_ENTRIES if name in metadata}
    return OfficialCheckpoint(path, state_dict, configs)


def _torch_load(path: Path, allow_pickle: bool):
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        if refused:
            raise PickleRequiredError(
                f"{str(path)!r} holds a pickled Python object ({refused[1]}), which safe (weights-only) loading "
                "refuses; if you trust the file's source, load it with allow_pickle=True (command line: "
                "--allow-pickle), which runs the pickled code"
            ) from error
        raise ValueError(f"cannot read {str(path)!r} as a PyTorch checkpoint: {error}") from error
    except (EOFError, KeyError, RuntimeError, ImportError, AttributeError) as error:
        message = f"cannot read {str(path)!r} as a PyTorch checkpoint: {type(error).__name__} {error}"
        raise ValueError(message) from error


def _read_torch(path: Path, allow_pickle: bool) -> OfficialCheckpoint:
    checkpoint = _torch_load(path, allow_pickle)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{str(path)!r} holds a {type(checkpoint).__name__}, expected a checkpoint dict")
    entry = next((name for name in STATE_ENTRIES if isinstance(checkpoint.get(name), dict)), None)
    state = checkpoint[entry] if entry else checkpoint
    if not state or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(
            f"{str(path)!r} holds no state dict: expected a {' or '.join(map(repr, STATE_ENTRIES))} entry of tensors "
            f"or a dict of tensors, got the entries {sorted(map(str, checkpoint))[:10]}"
        )
    configs = {}
    if entry:
        configs = {name: _config_entry(checkpoint[name], name, path) for name in CONFIG_ENTRIES if name in checkpoint}
    epoch = checkpoint.get("epoch") if entry else None
    return OfficialCheckpoint(path, state, configs, epoch if isinstance(epoch, int) else None)


def read_official_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> OfficialCheckpoint:
    """Read an official checkpoint file (`.pt`/`.pth`/`.ckpt` by `torch.load`, or `.safetensors`); see the module
    docstring. Raises `PickleRequiredError` for a `.pt` file with Python objects unless `allow_pickle`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {str(path)!r}")
    checkpoint = _read_safetensors(path) if path.suffix == SAFETENSORS_SUFFIX else _read_torch(path, allow_pickle)
    checkpoint.state_dict = {key.removeprefix(DDP_PREFIX): value for key, value in checkpoint.state_dict.items()}
    return checkpoint


def split_unused_keys(state_dict: dict, version: str) -> tuple[dict, list[str]]:
    """`(state of the modules the converter knows, sorted keys of everything else)` (e.g. a discriminator's)."""
    prefixes = official_module_prefixes(version)
    known = {key: value for key, value in state_dict.items() if key.startswith(prefixes)}
    return known, sorted(set(state_dict) - set(known))


def _official_name(key: str) -> str:
    """Our state-dict name -> the official one where the mapping is a plain rename (the SigLIP tower)."""
    return SIGLIP_PREFIX + key.removeprefix("siglip.") if key.startswith("siglip.") else key


def _load_exactly(module: torch.nn.Module, state_dict: dict, official_name) -> None:
    """`load_state_dict` that names missing keys by their official names and raises `KeyError` for any mismatch."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    if missing:
        names = sorted(map(official_name, missing))
        raise KeyError(f"the checkpoint lacks {len(names)} expected key(s): {', '.join(names[:10])}")
    if unexpected:
        names = sorted(unexpected)
        raise KeyError(f"the conversion gave {len(names)} key(s) the model lacks: {', '.join(names[:10])}")


def convert_official_checkpoint(
    checkpoint: OfficialCheckpoint,
    version: str,
    official_config: dict | None = None,
    siglip_vision_config: dict | None = None,
) -> ConvertedTokenizer:
    """
    Build our tokenizer from an official checkpoint with [`official_to_hf`].

    Configs default to the checkpoint's own entries, then to the full-size release of `version`. Shared codebooks,
    stored once per depth in the official state, are merged after checking that the copies are equal.

    Raises:
        KeyError: an official key the model needs is missing (named), or a known module holds keys it does not have.
        ValueError: the configs and the state disagree (e.g. shared codebook copies differ).
    """
    official_config = official_config or checkpoint.configs.get("rqvaesiglip_config")
    siglip_vision_config = siglip_vision_config or checkpoint.configs.get("siglip_vision_config")
    known, unused = split_unused_keys(checkpoint.state_dict, version)
    try:
        config, state_dict = official_to_hf(known, version, official_config, siglip_vision_config)
        model = DualTokenVisionModel(config)
        _load_exactly(model, state_dict, _official_name)
    except KeyError as error:
        if official_config is not None and siglip_vision_config is not None:
            raise
        absent = "official" if official_config is None else "SigLIP vision"
        raise KeyError(
            f"{error.args[0]} (no {absent} config was given or stored in the checkpoint, so the full-size "
            f"{version!r} layout was assumed)"
        ) from error
    return ConvertedTokenizer(model.eval(), unused)


def save_text_tower(
    checkpoint: OfficialCheckpoint, folder: str | os.PathLike, text_config: dict | None = None
) -> Path:
    """
    Save the SigLIP text tower of an official checkpoint as a `SiglipTextModel` folder, and its contrastive
    `logit_scale` / `logit_bias` in `contrastive_head.safetensors` beside it. Returns the folder.

    `text_config` defaults to the checkpoint's `siglip_text_config` entry; one of the two is required.
    """
    text_config = text_config or checkpoint.configs.get("siglip_text_config")
    if text_config is None:
        raise ValueError(
            f"{str(checkpoint.path)!r} carries no siglip_text_config: give the SigLIP text config dict to keep the "
            "text tower (command line: --siglip-text-config JSON_FILE)"
        )
    state = checkpoint.state_dict
    tower_state = {
        key[len(TEXT_TOWER_PREFIX) :]: value for key, value in state.items() if key.startswith(TEXT_TOWER_PREFIX)
    }
    if not tower_state:
        raise KeyError(f"the checkpoint has no text tower keys ({TEXT_TOWER_PREFIX}*)")
    missing = [key for key in CONTRASTIVE_KEYS if key not in state]
    if missing:
        raise KeyError(f"the checkpoint lacks {', '.join(missing)}")
    text_model = SiglipTextModel(SiglipTextConfig(**text_config))
    _load_exactly(text_model, tower_state, lambda key: TEXT_TOWER_PREFIX + key)
    folder = Path(folder)
    text_model.save_pretrained(folder)
    save_file({key.rsplit(".", 1)[-1]: state[key].contiguous() for key in CONTRASTIVE_KEYS},
              folder / "contrastive_head.safetensors")
    return folder


def convert_official_folder(
    checkpoint: OfficialCheckpoint,
    output_dir: str | os.PathLike,
    version: str,
    official_config: dict | None = None,
    siglip_vision_config: dict | None = None,
    keep_text_tower: bool = False,
    siglip_text_config: dict | None = None,
    license: str = "apache-2.0",
) -> ConvertedTokenizer:
    """
    Convert an official checkpoint (see [`convert_official_checkpoint`]) into a Hub-ready tokenizer folder: config,
    safetensors, remote code, the image processor for its image size and a model card. With `keep_text_tower`, the
    SigLIP text tower also goes to `siglip_text/` (see [`save_text_tower`]); otherwise it is dropped.
    """
    converted = convert_official_checkpoint(checkpoint, version, official_config, siglip_vision_config)
    card = CardDetails(
        origin="Converted from an official DualToken tokenizer checkpoint with `dualtoken convert-official`.",
        facts={
            "source": f"`{checkpoint.path.name}` (official `{version}` layout)",
            "epoch": checkpoint.epoch,
            "official keys not used": len(converted.unused_keys),
            "SigLIP text tower": f"kept in `{TEXT_TOWER_FOLDER}/`" if keep_text_tower else "dropped",
        },
        license=license,
    )
    save_tokenizer_folder(converted.model, output_dir, card=card)
    if keep_text_tower:
        save_text_tower(checkpoint, Path(output_dir) / TEXT_TOWER_FOLDER, siglip_text_config)
    return converted


__all__ = [
    "ConvertedTokenizer",
    "convert_official_folder",
    "OfficialCheckpoint",
    "PickleRequiredError",
    "convert_official_checkpoint",
    "official_module_prefixes",
    "read_official_checkpoint",
    "save_text_tower",
    "split_unused_keys",
]
