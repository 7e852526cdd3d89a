"""Files the command line reads and writes: image files (read with the package's one opener, `open_image`), numbered
image outputs and code files.

A code file (`dualtoken tokenize`) is a safetensors file with `pixel_codes` and `semantic_codes`, int64 tensors of
shape `(B, h, w, D)`, and string metadata: `format` (`"dualtoken-codes"`), `sources` (a JSON list of the image file
names, in batch order), `model` (the folder that tokenized them) and `fingerprint` (JSON: the tokenizer's code
layout and a hash of its codebooks, see `fingerprint.py`). [`join_code_files`] writes one from several,
reading one at a time, so a long run can save its codes batch by batch.
"""

import json
import os
import struct
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


def image_files(inputs: list[str | os.PathLike]) -> list[str]:
    """The image files named on the command line, in order, a folder standing for the image files under it (by an
    extension PIL reads, sorted by path, hidden files left out). Nothing is opened; a missing path raises
    `FileNotFoundError`, a folder without images `ValueError`."""
    readable = {extension for extension, kind in PIL.Image.registered_extensions().items() if kind in PIL.Image.OPEN}
    files = []
    for path in map(Path, inputs):
        if path.is_file():
            files.append(str(path))
        elif path.is_dir():
            found = sorted(
                found
                for found in path.rglob("*")
                if found.is_file()
                and found.suffix.lower() in readable
                and not any(part.startswith(".") for part in found.relative_to(path).parts)
            )
            if not found:
                raise ValueError(f"the folder {str(path)!r} holds no image files")
            files += map(str, found)
        else:
            raise FileNotFoundError(f"no such image file or folder: {str(path)!r}")
    return files


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
    fingerprint: dict | None = None,
) -> None:
    """Write a code file (see the module docstring); `sources` names the images in batch order, `fingerprint` is the
    tokenizer's (`tokenizer_fingerprint`)."""
    if len(sources) != pixel_codes.shape[0]:
        raise ValueError(f"{len(sources)} source names for {pixel_codes.shape[0]} images")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": CODES_FORMAT, "sources": json.dumps(sources), "model": model}
    if fingerprint is not None:
        metadata["fingerprint"] = json.dumps(fingerprint)
    tensors = {"pixel_codes": pixel_codes.long().contiguous(), "semantic_codes": semantic_codes.long().contiguous()}
    save_file(tensors, path, metadata=metadata)


def join_code_files(parts: list[str | os.PathLike], path: str | os.PathLike) -> tuple[int, ...]:
    """
    Write the code file `path` holding the images of the code files `parts`, in order, and return the shape of its
    `pixel_codes`. The parts are read one at a time, so memory holds one part, not the whole result. Their metadata
    other than `sources` must agree (same model); the joined `sources` are theirs, in order. `path` appears only
    once complete (written beside it, then renamed).
    """
    if not parts:
        raise ValueError("no code files to join")
    metadata, sources, lengths, grids = None, [], [], set()
    for part in parts:
        with safe_open(part, "pt") as handle:
            part_metadata = dict(handle.metadata() or {})
            shapes = {name: handle.get_slice(name).get_shape() for name in CODE_NAMES}
        sources += json.loads(part_metadata.pop("sources"))
        if metadata is not None and part_metadata != metadata:
            raise ValueError(f"{str(part)!r} was written with other metadata than {str(parts[0])!r}: {part_metadata}")
        metadata = part_metadata
        lengths.append(shapes["pixel_codes"][0])
        grids.add(tuple(tuple(shape[1:]) for shape in shapes.values()))
    if len(grids) != 1:
        raise ValueError(f"the code files to join have different grids or depths: {sorted(grids)}")
    (grid,) = grids
    # A safetensors file: header length (u64, little endian), a JSON header padded to 8 bytes, then the raw data.
    header, offset = {"__metadata__": {**metadata, "sources": json.dumps(sources)}}, 0
    for name, trailing in zip(CODE_NAMES, grid):
        shape = [sum(lengths), *trailing]
        size = 8 * shape[0] * int(torch.Size(trailing).numel())
        header[name] = {"dtype": "I64", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    header = json.dumps(header, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.joining")
    with open(partial, "wb") as out:
        out.write(struct.pack("<Q", len(header)) + header)
        for name in CODE_NAMES:
            for part in parts:
                with safe_open(part, "np") as handle:
                    out.write(handle.get_tensor(name).astype("<i8", copy=False).tobytes())
    os.replace(partial, path)
    return (sum(lengths), *grid[0])


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
    "image_files",
    "join_code_files",
    "load_codes",
    "numbered_outputs",
    "open_images",
    "save_codes",
    "side_by_side",
]
