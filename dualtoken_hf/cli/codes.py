"""`dualtoken tokenize`, `detokenize` and `reconstruct`: images <-> code files through a tokenizer."""

import sys

import PIL.Image
import torch
from tqdm.auto import tqdm

from ..configuration_dualtoken import BRANCHES
from ..hub.folders import load_image_processor, load_tokenizer
from ..image_processing_dualtoken import open_image
from .fingerprint import check_pixel_codes_fit, pixel_fingerprint_mismatch, tokenizer_fingerprint
from .files import check_image_output, image_files, load_codes, numbered_outputs, open_images, side_by_side
from .partial_codes import PartialCodes


def _encoded_batches(tokenizer, image_processor, images: list, batch_size: int):
    """`(pixel_values, encoded)` per batch of `images`, with a progress bar over images."""
    with tqdm(total=len(images), unit="image", desc="tokenizing") as progress:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pixel_values = image_processor(batch, return_tensors="pt").pixel_values
            yield pixel_values, tokenizer.encode(pixel_values.to(tokenizer.device))
            progress.update(len(batch))


def _readable_images(paths: list[str]) -> tuple[list[PIL.Image.Image], list[str]]:
    """The images of the files `paths` that can be read (`open_image`), and the files that cannot, each reported on
    stderr: among many files, an unreadable one is skipped and counted rather than the end of the run."""
    images, skipped = [], []
    for path in paths:
        try:
            images.append(open_image(path))
        except ValueError as error:
            tqdm.write(f"dualtoken tokenize: warning: {error}; skipped", file=sys.stderr)  # a line of its own
            skipped.append(path)
    return images, skipped


def _encode(tokenizer, image_processor, images: list) -> tuple[torch.LongTensor, torch.LongTensor]:
    """The pixel and semantic codes of `images` on the CPU; empty `(0, h, w, D)` tensors for no image."""
    if not images:
        side = tokenizer.config.grid_size
        return tuple(
            torch.empty(0, side, side, tokenizer.quantizer(branch).depth, dtype=torch.long) for branch in BRANCHES
        )
    pixel_values = image_processor(images, return_tensors="pt").pixel_values
    encoded = tokenizer.encode(pixel_values.to(tokenizer.device))
    return encoded.pixel_codes.cpu(), encoded.semantic_codes.cpu()


def _tokenizer_and_image_processor(folder: str, device: torch.device):
    tokenizer = load_tokenizer(folder).to(device)
    return tokenizer, load_image_processor(folder, tokenizer.config)


def write_images(images: list, output: str) -> None:
    """Save `images` as `output` (one image) or numbered files next to it, and say where."""
    outputs = numbered_outputs(output, len(images))
    for path, image in zip(outputs, images):
        image.save(path)
    print(f"wrote {', '.join(map(str, outputs))}")


def run_tokenize(args) -> None:
    # One batch of images in memory at a time; each batch's codes are saved as they come (see `partial_codes`).
    sources = image_files(args.images)
    partial = PartialCodes.start(args.output, sources, str(args.model), args.resume)
    if partial.done:
        print(f"resuming: {partial.done} of {len(sources)} images already tokenized in {partial.folder}")
    tokenizer, image_processor = _tokenizer_and_image_processor(args.model, args.device)
    partial.fingerprint = tokenizer_fingerprint(tokenizer)
    try:
        with tqdm(total=len(sources), initial=partial.done, unit="image", desc="tokenizing") as progress:
            for start in range(partial.done, len(sources), args.batch_size):
                batch = sources[start : start + args.batch_size]
                images, skipped = _readable_images(batch)
                partial.add(*_encode(tokenizer, image_processor, images), skipped=skipped)
                progress.update(len(batch))
    except BaseException:
        if partial.done:
            print(
                f"dualtoken tokenize: the codes of {partial.done} of {len(sources)} images are saved in "
                f"{partial.folder}; run the same command with --resume to tokenize only the rest",
                file=sys.stderr,
            )
        raise
    shape = partial.finish(args.output)
    if partial.skipped:
        print(f"dualtoken tokenize: skipped {len(partial.skipped)} of {len(sources)} images", file=sys.stderr)
    print(f"wrote {args.output}: pixel and semantic codes of shape {shape}")


def run_detokenize(args) -> None:
    check_image_output(args.output)
    codes, metadata = load_codes(args.codes)
    pixel_codes = codes["pixel_codes"]
    tokenizer, image_processor = _tokenizer_and_image_processor(args.model, args.device)
    codes_name, model_name = repr(str(args.codes)), repr(str(args.model))
    check_pixel_codes_fit(pixel_codes, tokenizer, codes_name, model_name)
    mismatch = pixel_fingerprint_mismatch(metadata, tokenizer, codes_name, model_name)
    if mismatch and not args.force:
        raise ValueError(f"{mismatch}; pass --force to decode them anyway")
    if mismatch:
        print(f"dualtoken detokenize: warning: {mismatch}; decoding anyway (--force)", file=sys.stderr)
    images = []
    with tqdm(total=pixel_codes.shape[0], unit="image", desc="decoding") as progress:
        for batch in pixel_codes.split(args.batch_size):
            images += image_processor.postprocess(tokenizer.decode(batch.to(args.device)))
            progress.update(len(batch))
    write_images(images, args.output)


def run_reconstruct(args) -> None:
    check_image_output(args.output)
    images = open_images(args.images)
    tokenizer, image_processor = _tokenizer_and_image_processor(args.model, args.device)
    results = []
    for pixel_values, encoded in _encoded_batches(tokenizer, image_processor, images, args.batch_size):
        reconstructions = image_processor.postprocess(tokenizer.decode(encoded.pixel_codes))
        if args.side_by_side:
            reconstructions = map(side_by_side, image_processor.postprocess(pixel_values), reconstructions)
        results += reconstructions
    write_images(results, args.output)
