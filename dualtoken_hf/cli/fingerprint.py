"""Which tokenizer a code file belongs to. Codes are indices into one tokenizer's codebooks: decoded by another
tokenizer they give an unrelated image, without any error. `dualtoken tokenize` stores the tokenizer's fingerprint in
the code file (metadata `fingerprint`, JSON) and `dualtoken detokenize` checks it against the tokenizer it decodes with.
"""

import hashlib
import json

import torch

from ..configuration_dualtoken import BRANCHES


def tokenizer_fingerprint(tokenizer) -> dict:
    """`{"grid_size": g, "pixel": {...}, "semantic": {...}}`: per branch the codebook size, the depth and the SHA-256
    of the codebooks (as float32, so the same weights give the same fingerprint on any device)."""
    fingerprint = {"grid_size": tokenizer.config.grid_size}
    for branch in BRANCHES:
        quantizer = tokenizer.quantizer(branch)
        codebooks = quantizer.codebook.detach().to("cpu", torch.float32).contiguous()
        fingerprint[branch] = {
            "codebook_size": quantizer.codebook_size,
            "depth": quantizer.depth,
            "codebooks_sha256": hashlib.sha256(codebooks.numpy().tobytes()).hexdigest(),
        }
    return fingerprint


def check_pixel_codes_fit(pixel_codes: torch.Tensor, tokenizer, codes_name: str, model_name: str) -> None:
    """Raise `ValueError` unless `pixel_codes` `(B, h, w, D)` has the tokenizer's grid and depth and every code lies
    in `[0, codebook_size)`: codes that do not fit cannot be decoded at all."""
    side, quantizer = tokenizer.config.grid_size, tokenizer.quantizer("pixel")
    _, height, width, depth = pixel_codes.shape
    if (height, width, depth) != (side, side, quantizer.depth):
        raise ValueError(
            f"{codes_name} holds {height}x{width} positions of {depth} pixel codes each, but the tokenizer "
            f"{model_name} reads {side}x{side} positions of {quantizer.depth}: the codes come from another model"
        )
    if pixel_codes.numel() == 0:
        raise ValueError(f"{codes_name} holds the codes of no image")
    low, high = int(pixel_codes.min()), int(pixel_codes.max())
    if low < 0 or high >= quantizer.codebook_size:
        raise ValueError(
            f"pixel_codes in {codes_name} must be in [0, {quantizer.codebook_size}) for the tokenizer {model_name}, "
            f"got min {low} and max {high}"
        )


def pixel_fingerprint_mismatch(metadata: dict[str, str], tokenizer, codes_name: str, model_name: str) -> str | None:
    """Why the code file's recorded pixel codebooks are not the tokenizer's (or cannot be checked), else `None`."""
    try:
        recorded = json.loads(metadata["fingerprint"])["pixel"]
    except (KeyError, TypeError, json.JSONDecodeError):
        return f"{codes_name} records no tokenizer fingerprint, so its codes cannot be checked against {model_name}"
    if recorded == tokenizer_fingerprint(tokenizer)["pixel"]:
        return None
    return (
        f"{codes_name} was written by another tokenizer ({metadata.get('model', 'unknown')!r}): its pixel codebooks "
        f"differ from those of {model_name}, so the codes would decode to unrelated images"
    )


__all__ = ["check_pixel_codes_fit", "pixel_fingerprint_mismatch", "tokenizer_fingerprint"]
