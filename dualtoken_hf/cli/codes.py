"""`dualtoken tokenize`, `detokenize` and `reconstruct`: images <-> code files through a tokenizer."""

import torch
from tqdm.auto import tqdm

from ..hub.folders import load_image_processor, load_tokenizer
from .files import check_image_output, load_codes, numbered_outputs, open_images, save_codes, side_by_side


def _encoded_batches(tokenizer, image_processor, images: list, batch_size: int):
    """`(pixel_values, encoded)` per batch of `images`, with a progress bar over images."""
    with tqdm(total=len(images), unit="image", desc="tokenizing") as progress:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            pixel_values = image_processor(batch, return_tensors="pt").pixel_values
            yield pixel_values, tokenizer.encode(pixel_values.to(tokenizer.device))
            progress.update(len(batch))


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
    images = open_images(args.images)
    tokenizer, image_processor = _tokenizer_and_image_processor(args.model, args.device)
    pixel_codes, semantic_codes = [], []
    for _, encoded in _encoded_batches(tokenizer, image_processor, images, args.batch_size):
        pixel_codes.append(encoded.pixel_codes.cpu())
        semantic_codes.append(encoded.semantic_codes.cpu())
    pixel_codes, semantic_codes = torch.cat(pixel_codes), torch.cat(semantic_codes)
    save_codes(args.output, pixel_codes, semantic_codes, [str(path) for path in args.images], str(args.model))
    print(f"wrote {args.output}: pixel and semantic codes of shape {tuple(pixel_codes.shape)}")


def run_detokenize(args) -> None:
    check_image_output(args.output)
    pixel_codes = load_codes(args.codes)[0]["pixel_codes"]
    tokenizer, image_processor = _tokenizer_and_image_processor(args.model, args.device)
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
