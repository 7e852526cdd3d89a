"""The `dualtoken` argument parser: every subcommand's arguments, help and example, without importing torch.

Building the parser and rejecting bad values import nothing heavy, so `dualtoken --help` and usage errors answer at
once; a subcommand's implementation (`Subcommand.module`) is imported only when it runs. Values whose valid set lives
in the model code (presets, official versions) are checked through [`LazyChoices`].
"""

import argparse
import functools
import importlib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from .. import __version__


DESCRIPTION = """\
The `dualtoken` command line (also `python -m dualtoken_hf`): convert official checkpoints, initialise from SigLIP
and an LLM, tokenize, detokenize, reconstruct, generate, describe, export and push, without writing Python.

On a missing file, an unreadable image, a wrong model folder or a bad value a subcommand prints one line,
`dualtoken <command>: error: <what went wrong>`, and exits with status 2; `--debug` shows the traceback instead.
"""
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DEFAULT_DESCRIBE_PROMPT = "Describe this image."


# ---------------------------------------------------------------------------------------------- argument types


def _bounded_int(text: str, low: int, high: float, allowed: str) -> int:
    """`text` as an integer in [low, high), else an argparse error saying what is `allowed`."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not low <= value < high:
        raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _bounded_int(text, 1, math.inf, "a positive integer")


def non_negative_int(text: str) -> int:
    return _bounded_int(text, 0, math.inf, "an integer >= 0")


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**64), the range of `torch.Generator.manual_seed`."""
    return _bounded_int(text, 0, 2**64, "an integer in [0, 2**64)")


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


def torch_device(text: str):
    """`auto` (the GPU when there is one, else the CPU) or a torch device name such as `cpu`, `cuda`, `cuda:1`."""
    import torch

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


class LazyChoices:
    """argparse `choices` read from the package only when argparse checks a given value or prints the help of the
    subcommand that has them: the valid names stay defined once, in the model code, and `dualtoken --help` does not
    import it. `attribute` of the module `dualtoken_hf.<module>` is a dict (its keys are the names) or a sequence."""

    def __init__(self, module: str, attribute: str):
        self.module = module
        self.attribute = attribute

    @functools.cached_property
    def names(self) -> tuple[str, ...]:
        return tuple(getattr(importlib.import_module(f"..{self.module}", __package__), self.attribute))

    def __contains__(self, value) -> bool:
        return value in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)


# ------------------------------------------------------------------------------------------------- arguments

TOKENIZER_OR_UNIFIED = "a DualToken tokenizer folder, or a unified model folder (its vision tokenizer is used)"
UNIFIED_ONLY = "a unified DualToken model folder (model_type 'dualtoken')"
UNIFIED_OR_MINI = f"{UNIFIED_ONLY}; default: the mini DualToken shipped with the package (Fashion-MNIST)"
NUMBERED_OUTPUTS = "OUT.png for one image, OUT-0.png, OUT-1.png, ... for several"


def _add_output_folder(parser) -> None:
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="folder to write (new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    parser.add_argument(
        "--license", default="apache-2.0", help="Hub license id for the model card; match the weights you start from"
    )


def _add_device(parser) -> None:
    # No string default: argparse would convert it with `torch_device` (importing torch) before reporting a usage
    # error; `main` resolves a missing --device to `auto` after parsing.
    parser.add_argument(
        "--device", type=torch_device, help="where the model runs: auto (the GPU if any; default), cpu, cuda"
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
        "--version",
        required=True,
        choices=LazyChoices("convert.official", "VERSIONS"),
        metavar="VERSION",
        help="official layout, one of %(choices)s: 'paper' (2025 release) or 'v2' (later code)",
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
        choices=LazyChoices("configuration_dualtoken", "UNIFIED_PRESETS"),
        metavar="PRESET",
        help="DualTokenConfig preset for the tokenizer layout and depth-head sizes, one of %(choices)s "
        "(default: %(default)s, the paper's)",
    )
    parser.add_argument("--seed", type=seed, default=0, metavar="N", help="seed of the new weights (default: 0)")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="dtype of the saved weights")
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickled .bin weights of a checkpoint without safetensors files (this can run code: trusted "
        "checkpoints only)",
    )
    _add_output_folder(parser)


def _tokenize_arguments(parser) -> None:
    _add_tokenizer(parser)
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files, or folders (their image files, sorted)"
    )
    parser.add_argument("--output", required=True, metavar="CODES", help="code file to write (.safetensors)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run over the same images: tokenize only the images whose codes CODES.partial/ "
        "does not hold yet",
    )


def _detokenize_arguments(parser) -> None:
    _add_tokenizer(parser)
    parser.add_argument("codes", metavar="CODES", help="code file written by `dualtoken tokenize`")
    parser.add_argument("--output", required=True, metavar="OUT.png", help=f"where to write: {NUMBERED_OUTPUTS}")
    parser.add_argument(
        "--force",
        action="store_true",
        help="decode codes that another tokenizer (other codebooks) wrote, or that record no tokenizer",
    )


def _reconstruct_arguments(parser) -> None:
    _add_images(parser)
    parser.add_argument("--output", required=True, metavar="OUT.png", help=f"where to write: {NUMBERED_OUTPUTS}")
    parser.add_argument(
        "--side-by-side", action="store_true", help="write the model's input crop and its reconstruction side by side"
    )


def _generate_arguments(parser) -> None:
    parser.add_argument("--model", metavar="DIR", help=UNIFIED_OR_MINI)
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
        "--seed", type=seed, metavar="N", help="random seed; the same seed on the same device gives the same images"
    )
    parser.add_argument("--num-images", type=positive_int, default=1, metavar="N", help="images (default: 1)")
    parser.add_argument("--temperature", type=positive_float, metavar="T", help="sampling temperature (default: 1)")
    parser.add_argument("--top-k", type=positive_int, metavar="K", help="sample among the k most likely codes")
    parser.add_argument("--top-p", type=probability, metavar="P", help="nucleus sampling probability mass")


def _describe_arguments(parser) -> None:
    parser.add_argument("--model", metavar="DIR", help=UNIFIED_OR_MINI)
    _add_device(parser)
    parser.add_argument("image", metavar="IMAGE", help="image file")
    parser.add_argument(
        "--prompt", default=DEFAULT_DESCRIBE_PROMPT, metavar="TEXT", help=f"default: {DEFAULT_DESCRIBE_PROMPT!r}"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=128,
        metavar="N",
        help="answer length limit (default: 128); the prompt and the answer must fit the model's context",
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


# ------------------------------------------------------------------------------------------------ subcommands


@dataclass(frozen=True)
class Subcommand:
    """One `dualtoken` subcommand: `function(args)` of the module `dualtoken_hf.cli.<module>` runs it; that module is
    imported only then."""

    module: str
    function: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    help: str
    example: str


SUBCOMMANDS = {
    "convert-official": Subcommand(
        "create",
        "run_convert_official",
        _convert_official_arguments,
        "convert an official DualToken tokenizer checkpoint (epoch_N.pt or .safetensors) into a Hub-ready folder; "
        "lists the checkpoint keys it did not use",
        "dualtoken convert-official --version v2 epoch_20.pt dualtoken-tokenizer-v2",
    ),
    "init": Subcommand(
        "create",
        "run_init",
        _init_arguments,
        "assemble an untrained unified model as the paper does: tokenizer tower from SigLIP, LLM from a causal LM, "
        "new projector and depth heads, text tokenizer extended with the image tokens",
        "dualtoken init --siglip google/siglip-so400m-patch14-384 --llm Qwen/Qwen2.5-3B dualtoken-3b-init",
    ),
    "tokenize": Subcommand(
        "codes",
        "run_tokenize",
        _tokenize_arguments,
        "encode images into pixel and semantic codes, saved as a safetensors file (pixel_codes, semantic_codes: "
        "int64 (B, h, w, D); metadata: the source files and the model), a batch at a time; an interrupted run "
        "continues with --resume",
        "dualtoken tokenize --model dualtoken-tokenizer-v2 cat.jpg photos/ --output codes.safetensors",
    ),
    "detokenize": Subcommand(
        "codes",
        "run_detokenize",
        _detokenize_arguments,
        f"decode the pixel codes of a code file into images ({NUMBERED_OUTPUTS}); codes must come from the same "
        "tokenizer (the code file records its fingerprint; --force decodes others anyway)",
        "dualtoken detokenize --model dualtoken-tokenizer-v2 codes.safetensors --output decoded.png",
    ),
    "reconstruct": Subcommand(
        "codes",
        "run_reconstruct",
        _reconstruct_arguments,
        f"tokenize images and decode their pixel codes ({NUMBERED_OUTPUTS})",
        "dualtoken reconstruct --model dualtoken-tokenizer-v2 cat.jpg --output cat-reconstructed.png --side-by-side",
    ),
    "generate": Subcommand(
        "unified",
        "run_generate",
        _generate_arguments,
        f"text to image with a unified model ({NUMBERED_OUTPUTS})",
        'dualtoken generate "a close-up picture of a sneaker." --output sneaker.png --seed 0',
    ),
    "describe": Subcommand(
        "unified",
        "run_describe",
        _describe_arguments,
        "answer a prompt about an image with a unified model (greedy decoding) and print the answer",
        'dualtoken describe coat.png --prompt "What is in this image?"',
    ),
    "export": Subcommand(
        "publish",
        "run_export",
        _export_arguments,
        "write a complete Hub folder (remote code, processor, generation config, model card) and check that it loads "
        "with trust_remote_code=True where dualtoken_hf is not installed; `push` requires that check",
        "dualtoken export dualtoken-3b-trained hub/dualtoken-3b --pixel-decoder",
    ),
    "push": Subcommand(
        "publish",
        "run_push",
        _push_arguments,
        "upload a folder that passed `dualtoken export` to a Hub model repository (created if needed)",
        "dualtoken push hub/dualtoken-3b --repo-id my-org/dualtoken-3b --private",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The `dualtoken` argument parser, one subparser per entry of `SUBCOMMANDS`; `args.command` names the one used."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback when something fails")
    parser = argparse.ArgumentParser(
        prog="dualtoken", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"dualtoken_hf {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for name, subcommand in SUBCOMMANDS.items():
        subparser = subparsers.add_parser(
            name,
            help=subcommand.help,
            description=subcommand.help,
            epilog=f"example:\n  {subcommand.example}",
            parents=[common],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        subcommand.add_arguments(subparser)
        subparser.set_defaults(command=name)
    return parser
