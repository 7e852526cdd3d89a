"""Official tokenizer checkpoint files -> a `DualTokenVisionModel`, reporting what the conversion did not use.

An official training checkpoint (`epoch_N.pt`) is a `torch.save`d dict whose `"state_dict"` (or `"model"`) entry holds
the `RQVAESiglipModel` state, possibly with DDP's `module.` prefixes; a plain state dict of tensors works too. The
reference state files (safetensors) hold the state directly. Config dicts are read from the entries
`rqvaesiglip_config`, `siglip_vision_config` and `siglip_text_config` (safetensors metadata as JSON strings, or dict
or JSON-string entries of a `.pt` checkpoint) when present; explicit arguments take precedence.

The format is told by the file's first bytes, not its name; a file that is neither kind (an image, a text file) is
refused in one line. `torch.save`'s zip or legacy pickle files are loaded with `torch.load(..., weights_only=True)`,
which refuses pickled Python objects: a checkpoint that holds any (e.g. an `argparse.Namespace` of training
arguments) needs `allow_pickle=True`, which runs the pickled code, so only for files from a trusted source.
"""

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
from .contents import CONFIG_ENTRIES, DDP_PREFIX, config_entry, state_entry, unpack_checkpoint
from .official import SIGLIP_PREFIX, check_layout, config_hint, official_module_prefixes, official_to_hf


TEXT_TOWER_PREFIX = "siglip_model.text_model."
TEXT_TOWER_FOLDER = "siglip_text"
CONTRASTIVE_KEYS = ("siglip_model.logit_scale", "siglip_model.logit_bias")
# torch.save writes a zip archive (since PyTorch 1.6) or, in the legacy format, a pickle (protocol 2 to 5).
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_MAGICS = tuple(b"\x80" + bytes([protocol]) for protocol in range(2, 6))
# What a file that is not a checkpoint often is, by its first bytes, to say so in the error.
OTHER_FORMATS = (
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"\x89PNG", "a PNG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
)


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


def _looks_like(head: bytes) -> str:
    """What a file that is not a checkpoint seems to be, from its first bytes (`""` when nothing is recognised)."""
    if not head:
        return "it is empty"
    for magic, name in OTHER_FORMATS:
        if head.startswith(magic):
            return f"it looks like {name}"
    text = head.decode("utf-8", "replace")
    if "\ufffd" not in text and all(character.isprintable() or character.isspace() for character in text):
        return "it looks like a text file"
    return ""


def checkpoint_format(path: Path) -> str:
    """`"torch"` (a zip or pickle file of `torch.save`) or `"safetensors"`, from the file's first bytes; `ValueError`
    in one line for anything else (an image, a text file, an empty file ...)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_MAGICS):
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"  # an 8-byte header length, then the JSON header
    looks_like = _looks_like(head)
    raise ValueError(
        f"{str(path)!r} is not a checkpoint: neither a PyTorch file (zip or pickle) nor a safetensors file"
        + (f" ({looks_like})" if looks_like else "")
    )


def _read_safetensors(path: Path) -> OfficialCheckpoint:
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
        state_dict = load_file(path)
    except SafetensorError as error:
        raise ValueError(f"cannot read {str(path)!r} as a safetensors file: {error}") from error
    configs = {name: config_entry(metadata[name], name, repr(str(path))) for name in CONFIG_ENTRIES if name in metadata}
    return OfficialCheckpoint(path, {key.removeprefix(DDP_PREFIX): value for key, value in state_dict.items()}, configs)


def _first_sentence(error: BaseException) -> str:
    """torch's load errors continue with advice about `weights_only` that is wrong for a file that is no checkpoint."""
    return str(error).strip().split("\n")[0].split(". ")[0]


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
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n|$)", str(error))
        message = reason[1] if reason else _first_sentence(error)
        raise ValueError(f"cannot read {str(path)!r} as a PyTorch checkpoint: {message}") from error
    except (EOFError, KeyError, RuntimeError, ImportError, AttributeError) as error:
        message = f"cannot read {str(path)!r} as a PyTorch checkpoint: {type(error).__name__}: {_first_sentence(error)}"
        raise ValueError(message) from error


def _read_torch(path: Path, allow_pickle: bool) -> OfficialCheckpoint:
    checkpoint = _torch_load(path, allow_pickle)
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{str(path)!r} holds a {type(checkpoint).__name__}, expected a checkpoint dict")
    state_dict, configs = unpack_checkpoint(checkpoint, repr(str(path)))
    epoch = checkpoint.get("epoch") if state_entry(checkpoint) else None
    return OfficialCheckpoint(path, state_dict, configs, epoch if isinstance(epoch, int) else None)


def read_official_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> OfficialCheckpoint:
    """Read an official checkpoint file (`torch.save`'s zip or pickle formats, by `torch.load`, or `.safetensors`,
    told apart by their first bytes); see the module docstring. Raises `ValueError` for a file that is neither, and
    `PickleRequiredError` for a PyTorch file with Python objects unless `allow_pickle`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {str(path)!r}")
    return _read_safetensors(path) if checkpoint_format(path) == "safetensors" else _read_torch(path, allow_pickle)


def load_official_checkpoint(
    path: str | os.PathLike, allow_pickle: bool = False
) -> tuple[dict[str, torch.Tensor], dict | None, dict | None]:
    """
    `(state_dict, official_config, siglip_vision_config)` of an official checkpoint file, ready for
    [`official_to_hf`]: the state without DDP's `module.` prefixes and the configs stored with it (`None` where the
    file has none). Reads as [`read_official_checkpoint`] does (weights only unless `allow_pickle`).
    """
    checkpoint = read_official_checkpoint(path, allow_pickle)
    configs = checkpoint.configs
    return checkpoint.state_dict, configs.get("rqvaesiglip_config"), configs.get("siglip_vision_config")


def split_unused_keys(state_dict: dict, version: str) -> tuple[dict, list[str]]:
    """`(state of the modules the converter knows, sorted keys of everything else)` (e.g. a discriminator's)."""
    prefixes = official_module_prefixes(version)
    known = {key: value for key, value in state_dict.items() if key.startswith(prefixes)}
    return known, sorted(set(state_dict) - set(known))


def _official_name(key: str) -> str:
    """Our state-dict name -> the official one where the mapping is a plain rename (the SigLIP tower)."""
    return SIGLIP_PREFIX + key.removeprefix("siglip.") if key.startswith("siglip.") else key


def _load_exactly(module: torch.nn.Module, state_dict: dict, official_name) -> None:
    """`load_state_dict` that names missing keys by their official names and raises `ValueError` for any mismatch
    (missing or unexpected keys, other shapes)."""
    try:
        missing, unexpected = module.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # shapes that differ
        raise ValueError(" ".join(str(error).split())) from error
    if missing:
        names = sorted(map(official_name, missing))
        raise ValueError(f"the checkpoint lacks {len(names)} expected key(s): {', '.join(names[:10])}")
    if unexpected:
        names = sorted(unexpected)
        raise ValueError(f"the conversion gave {len(names)} key(s) the model lacks: {', '.join(names[:10])}")


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
        ValueError: the checkpoint has the other version's layout; an official key the model needs is missing
            (named), or a known module holds keys or shapes the configs do not give (with what that likely means);
            the configs and the state disagree otherwise (e.g. shared codebook copies differ).
    """
    official_config = official_config or checkpoint.configs.get("rqvaesiglip_config")
    siglip_vision_config = siglip_vision_config or checkpoint.configs.get("siglip_vision_config")
    check_layout(checkpoint.state_dict, version)
    known, unused = split_unused_keys(checkpoint.state_dict, version)
    if not known:
        raise ValueError(
            f"{str(checkpoint.path)!r} holds none of the keys of an official DualToken tokenizer (its keys begin "
            f"{unused[:5]}): is it the right file?"
        )
    config, state_dict = official_to_hf(known, version, official_config, siglip_vision_config)
    model = DualTokenVisionModel(config)
    try:
        _load_exactly(model, state_dict, _official_name)
    except ValueError as error:
        raise ValueError(f"{error}; {config_hint(version, official_config, siglip_vision_config)}") from error
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
        raise ValueError(f"the checkpoint has no text tower keys ({TEXT_TOWER_PREFIX}*) to keep")
    missing = [key for key in CONTRASTIVE_KEYS if key not in state]
    if missing:
        raise ValueError(f"the checkpoint lacks {', '.join(missing)}, which the SigLIP text tower needs")
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
    "OfficialCheckpoint",
    "PickleRequiredError",
    "checkpoint_format",
    "convert_official_checkpoint",
    "convert_official_folder",
    "load_official_checkpoint",
    "official_module_prefixes",
    "read_official_checkpoint",
    "save_text_tower",
    "split_unused_keys",
]
