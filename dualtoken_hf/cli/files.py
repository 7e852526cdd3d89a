"""Files the command line reads and writes: image files (read with the package's one opener, `open_image`), numbered
image outputs and code files.

A code file (`dualtoken tokenize`) is a safetensors file with `pixel_codes` and `semantic_codes`, int64 tensors of
shape `(B, h, w, D)`, and string metadata: `format` (`"dualtoken-codes"`), `sources` (a JSON list of the image file
names, in batch order) and `model` (the folder that tokenized them).
"""

import json
import os
from pathlib import Path

import PIL.Image
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..image_processing_dualtoken import open_image


CODES_FORMAT = "dualtoken-codes"
CODE_NAMES = ("pixel_codes", "semantic_codes")


def open_images(paths: list[str | os.PathLike]) -> list[PIL.Image.Image]:
    """The image files of the command line, upright and RGB (`open_image`), read in order before any model work
    starts; a missing file raises `FileNotFoundError` (as a missing code file does), an unreadable one `ValueError`,
    each naming the file."""
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no such image file: {str(path)!r}")
    return [open_image(path) for path in paths]


def check_image_output(output: str | os.PathLike) -> Path:
    """`output` as a path whose extension PIL can write (e.g. `.png`, `.jpg`); its folder is created."""
    output = Path(output)
    extensions = PIL.Image.registered_extensions()
    if output.suffix.lower() not in extensions or extensions[output.suffix.lower()] not in PIL.Image.SAVE:
        raise ValueError(f"the output {str(output)!r} needs an image extension PIL can write, such as .png or .jpg")
    output.parent.mkdir(parents=True, exist_ok=True)
    return output


def numbered_outputs(output: str | os.PathLike, count: int) -> list[Path]:
    """Where `count` images go: `output` itself for one image, else `NAME-0.EXT`, `NAME-1.EXT`, ... beside it."""
    output = check_image_output(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{index}{output.suffix}") for index in range(count)]


def side_by_side(*images: PIL.Image.Image) -> PIL.Image.Image:
    """The images pasted left to right on one RGB canvas (top aligned)."""
    canvas = PIL.Image.new("RGB", (sum(image.width for image in images), max(image.height for image in images)))
    left = 0
    for image in images:
        canvas.paste(image.convert("RGB"), (left, 0))
        left += image.width
    return canvas


def save_codes(
    path: str | os.PathLike,
    pixel_codes: torch.LongTensor,
    semantic_codes: torch.LongTensor,
    sources: list[str],
    model: str,
) -> None:
    """Write a code file (see the module docstring); `sources` names the images in batch order."""
    if len(sources) != pixel_codes.shape[0]:
        raise ValueError(f"{len(sources)} source names for {pixel_codes.shape[0]} images")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": CODES_FORMAT, "sources": json.dumps(sources), "model": model}
    tensors = {"pixel_codes": pixel_codes.long().contiguous(), "semantic_codes": semantic_codes.long().contiguous()}
    save_file(tensors, path, metadata=metadata)


def load_codes(path: str | os.PathLike) -> tuple[dict[str, torch.LongTensor], dict[str, str]]:
    """Read a code file: `({"pixel_codes": ..., "semantic_codes": ...}, metadata)`; each `(B, h, w, D)` int64."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such code file: {str(path)!r}")
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
            missing = [name for name in CODE_NAMES if name not in handle.keys()]
            codes = {name: handle.get_tensor(name) for name in CODE_NAMES if name not in missing}
    except SafetensorError as error:
        raise ValueError(f"cannot read {str(path)!r} as a safetensors code file: {error}") from error
    if missing:
        raise ValueError(f"{str(path)!r} is not a code file of `dualtoken tokenize`: it lacks {', '.join(missing)}")
    for name, tensor in codes.items():
        if tensor.dim() != 4 or tensor.dtype != torch.int64:
            raise ValueError(
                f"{name} in {str(path)!r} must be an int64 (batch, h, w, depth) tensor, got {tensor.dtype} of "
                f"shape {tuple(tensor.shape)}"
            )
    return codes, metadata


__all__ = [
    "CODES_FORMAT",
    "check_image_output",
    "load_codes",
    "numbered_outputs",
    "open_images",
    "save_codes",
    "side_by_side",
]
