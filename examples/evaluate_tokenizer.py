#!/usr/bin/env python
"""Evaluate a DualToken tokenizer on a folder of images (paper Table 1 metrics).

Reconstruction: PSNR, SSIM, LPIPS and rFID, computed in memory on the reconstructions (no JPEG round trip).
Codebooks: usage, perplexity and dead codes per depth for the pixel and semantic branches.
Semantic fidelity (with `--teacher`): cosine / MSE of `semantic_features` and `pooler_output` to a frozen SigLIP tower.
Zero-shot top-1 (with `--text_model` and class sub-folders): the tokenizer's `pooler_output` against SigLIP
text-tower embeddings of class-name prompts.

    python examples/evaluate_tokenizer.py --model dualtoken-tokenizer --data_dir imagenet/val \
        --output eval.json --teacher siglip-so400m-patch14-384 --text_model siglip-so400m-patch14-384 \
        --class_names imagenet_classes.txt --templates imagenet_templates.txt

Writes the JSON report (top-level numeric keys such as `psnr`, `ssim`, `rfid`, `zero_shot_top1`) and a markdown table
(`--output_markdown`, default: next to the JSON). LPIPS needs the `lpips` package (and torchvision), rFID the standard
Inception TorchScript file; without them those entries are null and the report says why, unless a pluggable network is
given (`--perceptual_network` / `--fid_feature_extractor`, reported as non-standard).
"""

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionModel
from dualtoken_hf.evaluation import (
    PERCEPTUAL_LOSS_HELP,
    ImageFolder,
    TokenizerEvaluator,
    class_text_embeddings,
    load_class_names,
    load_teacher,
    load_templates,
    load_text_tower,
    report_to_markdown,
    resolve_fid_network,
    resolve_perceptual_network,
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="tokenizer folder (config, weights, preprocessor_config.json)")
    parser.add_argument("--data_dir", required=True, help="image folder; one sub-folder per class gives labels")
    parser.add_argument("--output", required=True, help="JSON report path")
    parser.add_argument("--output_markdown", default=None, help="markdown table path (default: OUTPUT with .md)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_images", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--teacher", default=None, help="frozen teacher: a tokenizer or SigLIP (vision) model folder")
    parser.add_argument("--text_model", default=None, help="SigLIP text tower + tokenizer folder for zero-shot top-1")
    parser.add_argument("--class_names", default=None, help="class names: JSON {folder: name} / list, or one per line")
    parser.add_argument("--templates", default=None, help="prompt templates with '{}', one per line")
    parser.add_argument("--fid_inception_weights", default=None, help="standard FID Inception TorchScript file")
    parser.add_argument(
        "--fid_feature_extractor", default=None, help="'package.module:factory' for a non-standard rFID extractor"
    )
    parser.add_argument(
        "--perceptual_network",
        default=None,
        help=f"LPIPS' network: {PERCEPTUAL_LOSS_HELP}. Default: lpips, skipped with a note where the package cannot be "
        "used; anything else is reported as non-standard",
    )
    parser.add_argument("--lpips_net", default="alex", choices=["alex", "vgg", "squeeze"])
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_images is not None and args.max_images < 1:
        parser.error(f"--max_images must be >= 1, got {args.max_images}")
    if (args.class_names or args.templates) and not args.text_model:
        parser.error("--class_names and --templates need --text_model")
    return args


def main(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = DualTokenVisionModel.from_pretrained(args.model, use_safetensors=True).to(device).eval()
    processor = DualTokenImageProcessor.from_pretrained(args.model)
    images = ImageFolder(args.data_dir, max_images=args.max_images)

    teacher = load_teacher(args.teacher).to(device) if args.teacher else None
    text_embeddings = None
    if args.text_model:
        text_model, text_tokenizer = load_text_tower(args.text_model)
        class_names = load_class_names(args.class_names, images.class_folders)
        text_embeddings = class_text_embeddings(
            text_model.to(device), text_tokenizer, class_names, load_templates(args.templates)
        )

    evaluator = TokenizerEvaluator(
        model,
        fid_network=resolve_fid_network(args.fid_feature_extractor, args.fid_inception_weights),
        perceptual_network=resolve_perceptual_network(args.perceptual_network, args.lpips_net),
        teacher=teacher,
        text_embeddings=text_embeddings,
    )
    num_batches = -(-len(images) // args.batch_size)
    for pixel_values, labels in tqdm(images.batches(processor, args.batch_size), total=num_batches, desc="evaluate"):
        evaluator.update(pixel_values, labels)

    report = {"model": args.model, "data_dir": args.data_dir, **evaluator.report()}
    report["num_unreadable"] = len(images.unreadable)
    report["unreadable_files"] = images.unreadable
    write_report(report, Path(args.output), Path(args.output_markdown or Path(args.output).with_suffix(".md")))
    return report


def write_report(report: dict, json_path: Path, markdown_path: Path):
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    markdown_path.write_text(report_to_markdown(report, title=f"Tokenizer evaluation: {report['model']}"))
    print(f"wrote {json_path} and {markdown_path}")


if __name__ == "__main__":
    main(parse_args())
