"""Side-by-side grids (PNG) of originals and reconstructions, with PIL only."""

from pathlib import Path

import PIL.Image
import torch

from ..image_processing_dualtoken import to_pil_images


def image_grid(rows: list[list[PIL.Image.Image]], scale: int = 1, padding: int = 2) -> PIL.Image.Image:
    """Paste equally sized images row by row on a white canvas, each enlarged `scale` times (nearest neighbour)."""
    width, height = rows[0][0].width * scale, rows[0][0].height * scale
    columns = max(len(row) for row in rows)
    canvas = PIL.Image.new("RGB", (columns * (width + padding) + padding, len(rows) * (height + padding) + padding),
                           "white")
    for row_index, row in enumerate(rows):
        for column_index, image in enumerate(row):
            tile = image.resize((width, height), PIL.Image.Resampling.NEAREST) if scale != 1 else image
            canvas.paste(tile, (padding + column_index * (width + padding), padding + row_index * (height + padding)))
    return canvas


def save_reconstruction_grid(columns: list[torch.Tensor], path: str | Path, scale: int = 1) -> Path:
    """Save a PNG with one row per image and one column per tensor of `columns` (e.g. original | reconstruction);
    every tensor is `(B, 3, H, W)` in [-1, 1]."""
    pil_columns = [to_pil_images(images) for images in columns]
    rows = [list(row) for row in zip(*pil_columns)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(rows, scale=scale).save(path)
    return path
