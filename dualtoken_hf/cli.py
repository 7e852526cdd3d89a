"""The `dualtoken` command line (also `python -m dualtoken_hf`): convert official checkpoints, initialise from SigLIP
and an LLM, tokenize, detokenize, reconstruct, generate, describe, export and push, without writing Python.

On a missing file, an unreadable image, a wrong model folder or a bad value a subcommand prints one line,
`dualtoken <command>: error: <what went wrong>`, and exits with status 2; `--debug` shows the traceback instead.
"""

import argparse
import json
import math
import sys

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from . import __version__
from .convert.checkpoint import convert_official_folder, read_official_checkpoint
from .file_io import (
    check_image_output,
    load_codes,
    numbered_outputs,
    open_image,
    open_images,
    save_codes,
    side_by_side,
)
from .hub_export import ExportCheckError, check_output_folder, export_folder, push_folder
from .initialize import initialize_unified_folder
from .model_folders import load_image_processor, load_processor, load_tokenizer, load_unified


ERROR_STATUS = 2
INTERRUPTED_STATUS = 130
# Failures a user can fix (paths, files, folders, values); anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (OSError, ValueError, KeyError, SafetensorError, ExportCheckError)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_DESCRIBE_PROMPT = "Describe this image."


# ---------------------------------------------------------------------------------------------- argument types


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
    return value


def torch_device(text: str) -> torch.device:
    """`auto` (the GPU when there is one, else the CPU) or a torch device name such as `cpu`, `cuda`, `cuda:1`."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(text)
    except (RuntimeError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"must be auto or a torch device such as cpu or cuda, got {text!r}") from error
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} was asked for but no CUDA GPU is available")
    return chosen


def json_file(text: str) -> dict:
    """A JSON file holding one object (a config dict)."""
    try:
        with open(text) as handle:
            value = json.load(handle)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read a JSON config from {text!r}: {error}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} must hold a JSON object, got {type(value).__name__}")
    return value


# ------------------------------------------------------------------------------------------------ subcommands


def run_convert_official(args) -> None:
    check_output_folder(args.output_dir, args.overwrite)
    checkpoint = read_official_checkpoint(args.checkpoint, allow_pickle=args.allow_pickle)
    converted = convert_official_folder(
        checkpoint,
        args.output_dir,
        args.version,
        official_config=args.official_config,
        siglip_vision_config=args.siglip_config,
        keep_text_tower=args.keep_text_tower,
        siglip_text_config=args.siglip_text_config,
        license=args.license,
    )
    print(f"converted {args.checkpoint} ({args.version}) into {args.output_dir}")
    print(f"{len(converted.unused_keys)} official key(s) not used" + (":" if converted.unused_keys else ""))
    for key in converted.unused_keys:
        print(f"  {key}")


def run_init(args) -> None:
    check_output_folder(args.output_dir, args.overwrite)
    initialize_unified_folder(
        args.siglip, args.llm, args.output_dir, args.preset, args.seed, DTYPES[args.dtype], args.license
    )
    print(f"wrote an untrained {args.preset} model to {args.output_dir}")


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


def _write_images(images: list, output: str) -> None:
    outputs = numbered_outputs(output, len(images))
    for path, image in zip(outputs, images):
        image.save(path)
    print(f"wrote {', '.join(map(str, outputs))}")


def run_detokenize(args) -> None:
    check_image_output(args.output)
    pixel_codes = load_codes(args.codes)[0]["pixel_codes"]
    tokenizer, image_processor = _tokenizer_and_image_processor(args.model, args.device)
    images = []
    with tqdm(total=pixel_codes.shape[0], unit="image", desc="decoding") as progress:
        for batch in pixel_codes.split(args.batch_size):
            images += image_processor.postprocess(tokenizer.decode(batch.to(args.device)))
            progress.update(len(batch))
    _write_images(images, args.output)


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
    _write_images(results, args.output)


def run_generate(args) -> None:
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    check_image_output(args.output)
    model, processor = load_unified(args.model).to(args.device), load_processor(args.model)
    inputs = processor(text=[args.prompt], generation_mode="image", return_tensors="pt").to(args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed) if args.seed is not None else None
    pixel_codes = model.generate(
        **inputs,
        generation_mode="image",
        guidance_scale=args.guidance_scale,
        num_images_per_prompt=args.num_images,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
        progress_bar=True,
    )
    _write_images(processor.postprocess(model.decode_image_tokens(pixel_codes)), args.output)


def run_describe(args) -> None:
    image = open_image(args.image)
    model, processor = load_unified(args.model).to(args.device), load_processor(args.model)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.prompt}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(args.device)
    generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])[0].strip())


def run_export(args) -> None:
    print(f"exporting {args.model_dir} to {args.output_dir}, then loading it without dualtoken_hf to check it")
    result = export_folder(args.model_dir, args.output_dir, args.pixel_decoder, args.license, args.overwrite)
    print(f"{result.folder} is a complete Hub folder ({result.kind}); it loads with trust_remote_code=True")


def run_push(args) -> None:
    url = push_folder(args.folder, args.repo_id, args.private, args.revision, args.token, args.commit_message)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")


# ------------------------------------------------------------------------------------------------------ parser

TOKENIZER_OR_UNIFIED = "a DualToken tokenizer folder, or a unified model folder (its vision tokenizer is used)"
UNIFIED_ONLY = "a unified DualToken model folder (model_type 'dualtoken')"
NUMBERED_OUTPUTS = "OUT.png for one image, OUT-0.png, OUT-1.png, ... for several"


def _add_output_folder(parser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    parser.add_argument(
        "--license", default="apache-2.0", help="Hub license id for the model card; match the weights you start from"
    )


def _add_device(parser) -> None:
    parser.add_argument(
        "--device", type=torch_device, default="auto", help="where the model runs: auto (the GPU if any), cpu, cuda"
    )


def _add_tokenizer(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help=TOKENIZER_OR_UNIFIED)
    _add_device(parser)
    parser.add_argument(
        "--batch-size", type=positive_int, default=8, metavar="N", help="images per forward pass (default: 8)"
    )


def _add_images(parser) -> None:
    _add_tokenizer(parser)
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")


def _convert_official_arguments(parser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="official checkpoint: .pt/.pth/.ckpt or .safetensors")
    _add_output_folder(parser)
    parser.add_argument(
        "--version", required=True, choices=("paper", "v2"), help="'paper' (2025 release) or 'v2' (later code)"
    )
    parser.add_argument(
        "--official-config",
        type=json_file,
        metavar="JSON_FILE",
        help="official config dict (v2: the rqvaesiglip dict; paper: the quantizer dict); default: the checkpoint's "
        "rqvaesiglip_config entry, else the full-size release",
    )
    parser.add_argument(
        "--siglip-config",
        type=json_file,
        metavar="JSON_FILE",
        help="SigLIP vision config dict; default: the checkpoint's siglip_vision_config entry, else so400m-patch14-384",
    )
    parser.add_argument(
        "--keep-text-tower",
        action="store_true",
        help="also save the SigLIP text tower (a SiglipTextModel) and its logit scale/bias in siglip_text/",
    )
    parser.add_argument(
        "--siglip-text-config",
        type=json_file,
        metavar="JSON_FILE",
        help="SigLIP text config dict for --keep-text-tower; default: the checkpoint's siglip_text_config entry",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a .pt checkpoint that holds Python objects (this runs pickled code: trusted files only)",
    )


def _init_arguments(parser) -> None:
    parser.add_argument("--siglip", required=True, metavar="PATH", help="SigLIP (or SigLIP vision) checkpoint")
    parser.add_argument("--llm", required=True, metavar="PATH", help="causal LM checkpoint with its text tokenizer")
    parser.add_argument(
        "--preset",
        default="dualtoken-3b",
        choices=("dualtoken-3b", "tiny"),
        help="tokenizer layout and depth-head sizes (default: dualtoken-3b, the paper's)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the new weights (default: 0)")
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="dtype of the saved weights")
    _add_output_folder(parser)


def _tokenize_arguments(parser) -> None:
    _add_images(parser)
    parser.add_argument("--output", required=True, metavar="CODES", help="code file to write (.safetensors)")


def _detokenize_arguments(parser) -> None:
    _add_tokenizer(parser)
    parser.add_argument("codes", metavar="CODES", help="code file written by `dualtoken tokenize`")
    parser.add_argument("--output", required=True, metavar="OUT.png", help=f"where to write: {NUMBERED_OUTPUTS}")


def _reconstruct_arguments(parser) -> None:
    _add_images(parser)
    parser.add_argument("--output", required=True, metavar="OUT.png", help=f"where to write: {NUMBERED_OUTPUTS}")
    parser.add_argument(
        "--side-by-side", action="store_true", help="write the model's input crop and its reconstruction side by side"
    )


def _generate_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help=UNIFIED_ONLY)
    _add_device(parser)
    parser.add_argument("prompt", metavar="PROMPT", help="what to draw")
    parser.add_argument("--output", required=True, metavar="OUT.png", help=f"where to write: {NUMBERED_OUTPUTS}")
    parser.add_argument(
        "--guidance-scale",
        type=non_negative_float,
        metavar="SCALE",
        help="classifier-free guidance scale; 0 disables it (default: the model's, 3 in the paper)",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", help="random seed; the same seed on the same device gives the same images"
    )
    parser.add_argument("--num-images", type=positive_int, default=1, metavar="N", help="images (default: 1)")
    parser.add_argument("--temperature", type=positive_float, metavar="T", help="sampling temperature (default: 1)")
    parser.add_argument("--top-k", type=positive_int, metavar="K", help="sample among the k most likely codes")
    parser.add_argument("--top-p", type=probability, metavar="P", help="nucleus sampling probability mass")


def _describe_arguments(parser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help=UNIFIED_ONLY)
    _add_device(parser)
    parser.add_argument("image", metavar="IMAGE", help="image file")
    parser.add_argument(
        "--prompt", default=DEFAULT_DESCRIBE_PROMPT, metavar="TEXT", help=f"default: {DEFAULT_DESCRIBE_PROMPT!r}"
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=128, metavar="N", help="answer length limit (default: 128)"
    )


def _export_arguments(parser) -> None:
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="a saved tokenizer or unified model folder")
    _add_output_folder(parser)
    parser.add_argument(
        "--pixel-decoder", action="store_true", help="also write pixel_decoder/: the pixel decoder as a diffusers model"
    )


def _push_arguments(parser) -> None:
    parser.add_argument("folder", metavar="OUTPUT_DIR", help="a folder written by `dualtoken export`")
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="Hub model repository")
    parser.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    parser.add_argument("--revision", metavar="BRANCH", help="branch to push to (created if needed; default: main)")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    parser.add_argument("--commit-message", default="Upload DualToken model", metavar="TEXT", help="commit message")


# name: (handler, add_arguments, help, example)
SUBCOMMANDS = {
    "convert-official": (
        run_convert_official,
        _convert_official_arguments,
        "convert an official DualToken tokenizer checkpoint (epoch_N.pt or .safetensors) into a Hub-ready folder; "
        "lists the checkpoint keys it did not use",
        "dualtoken convert-official --version v2 epoch_20.pt dualtoken-tokenizer-v2",
    ),
    "init": (
        run_init,
        _init_arguments,
        "assemble an untrained unified model as the paper does: tokenizer tower from SigLIP, LLM from a causal LM, "
        "new projector and depth heads, text tokenizer extended with the image tokens",
        "dualtoken init --siglip google/siglip-so400m-patch14-384 --llm Qwen/Qwen2.5-3B dualtoken-3b-init",
    ),
    "tokenize": (
        run_tokenize,
        _tokenize_arguments,
        "encode images into pixel and semantic codes, saved as a safetensors file (pixel_codes, semantic_codes: "
        "int64 (B, h, w, D); metadata: the source files and the model)",
        "dualtoken tokenize --model dualtoken-tokenizer-v2 cat.jpg dog.png --output codes.safetensors",
    ),
    "detokenize": (
        run_detokenize,
        _detokenize_arguments,
        f"decode the pixel codes of a code file into images ({NUMBERED_OUTPUTS})",
        "dualtoken detokenize --model dualtoken-tokenizer-v2 codes.safetensors --output decoded.png",
    ),
    "reconstruct": (
        run_reconstruct,
        _reconstruct_arguments,
        f"tokenize images and decode their pixel codes ({NUMBERED_OUTPUTS})",
        "dualtoken reconstruct --model dualtoken-tokenizer-v2 cat.jpg --output cat-reconstructed.png --side-by-side",
    ),
    "generate": (
        run_generate,
        _generate_arguments,
        f"text to image with a unified model ({NUMBERED_OUTPUTS})",
        'dualtoken generate --model dualtoken-3b "a red fox in the snow" --output fox.png --seed 0',
    ),
    "describe": (
        run_describe,
        _describe_arguments,
        "answer a prompt about an image with a unified model (greedy decoding) and print the answer",
        'dualtoken describe --model dualtoken-3b photo.jpg --prompt "What is the cat doing?"',
    ),
    "export": (
        run_export,
        _export_arguments,
        "write a complete Hub folder (remote code, processor, generation config, model card) and check that it loads "
        "with trust_remote_code=True where dualtoken_hf is not installed; `push` requires that check",
        "dualtoken export dualtoken-3b-trained hub/dualtoken-3b --pixel-decoder",
    ),
    "push": (
        run_push,
        _push_arguments,
        "upload a folder that passed `dualtoken export` to a Hub model repository (created if needed)",
        "dualtoken push hub/dualtoken-3b --repo-id my-org/dualtoken-3b --private",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The `dualtoken` argument parser, one subparser per entry of `SUBCOMMANDS`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    parser = argparse.ArgumentParser(
        prog="dualtoken", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"dualtoken_hf {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, (handler, add_arguments, help, example) in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {example}",
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        add_arguments(subparser)
        subparser.set_defaults(handler=handler, command=name)
    return parser


def _one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run `dualtoken` with `argv` (default: the process arguments); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version and argparse's own usage errors
        return exit_request.code if isinstance(exit_request.code, int) else 0
    try:
        with torch.no_grad():
            args.handler(args)
    except KeyboardInterrupt:
        print(f"dualtoken {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    except EXPECTED_ERRORS as error:
        if args.debug:
            if isinstance(error, ExportCheckError):
                print(error.log, file=sys.stderr)
            raise
        print(f"dualtoken {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return ERROR_STATUS
    return 0


__all__ = ["build_parser", "main"]
