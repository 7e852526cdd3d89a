"""Evaluation images from a folder: `root/<class>/<image>` gives labelled images (classes sorted, as `datasets`'
imagefolder does), images directly under `root` are unlabelled (-1). Images are read with the package's one opener
(`open_image`); unreadable files are skipped and counted.

`datasets.load_dataset("imagefolder", ...)` is not used because its labels differ: it labels an image by its
immediate parent folder (so `root/<class>/<subfolder>/x.jpg` gets the label `<subfolder>`), puts images directly
under `root` in a class named after `root` instead of leaving them unlabelled, and reads sub-folders named `train`,
`test` or `validation` as splits rather than classes.
"""

from collections.abc import Iterator
from pathlib import Path

import PIL.Image
import torch

from ..image_processing_dualtoken import open_image


IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".ppm", ".tif", ".tiff", ".webp")


class ImageFolder:
    """The images under `root` with their labels, batched through an image processor.

    Args:
        root: The folder; images in its sub-folders are labelled by sub-folder (sorted names -> 0, 1, ...).
        max_images: Keep only the first `max_images` files (sorted paths), for quick runs.
    """

    def __init__(self, root: str, max_images: int | None = None):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"data_dir must be a folder of images, got {root}")
        self.class_folders = sorted(path.name for path in root.iterdir() if path.is_dir())
        label_of = {name: index for index, name in enumerate(self.class_folders)}
        paths = sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())
        self.paths = paths[:max_images] if max_images is not None else paths
        self.labels = [label_of.get(path.relative_to(root).parts[0], -1) for path in self.paths]
        if not self.paths:
            raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
        self.unreadable: list[str] = []

    def __len__(self) -> int:
        return len(self.paths)

    def _open(self, path: Path) -> PIL.Image.Image | None:
        try:
            return open_image(path)
        except ValueError:
            self.unreadable.append(str(path))
            return None

    def batches(self, processor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield `(pixel_values, labels)`; a batch may be short where files were unreadable (see `unreadable`)."""
        for start in range(0, len(self.paths), batch_size):
            chunk = zip(self.paths[start : start + batch_size], self.labels[start : start + batch_size])
            opened = [(self._open(path), label) for path, label in chunk]
            readable = [(image, label) for image, label in opened if image is not None]
            if readable:
                images, labels = zip(*readable)
                pixel_values = processor(list(images), return_tensors="pt").pixel_values
                yield pixel_values, torch.tensor(labels)
