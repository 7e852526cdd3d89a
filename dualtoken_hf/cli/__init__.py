"""The `dualtoken` command line (also `python -m dualtoken_hf`); `dualtoken --help` lists the subcommands.

`parser.py` defines the arguments and imports nothing heavy; each subcommand lives in a module of its group
(`create`: convert-official, init; `codes`: tokenize, detokenize, reconstruct; `unified`: generate, describe;
`publish`: export, push), imported only when that subcommand runs, so help and usage errors answer at once.
"""

import importlib
import sys

from safetensors import SafetensorError

from .parser import SUBCOMMANDS, build_parser, torch_device


ERROR_STATUS = 2
INTERRUPTED_STATUS = 130
# Failures a user can fix (paths, files, folders, values); anything else is a bug and keeps its traceback. A group
# module adds its own with an `EXPECTED_ERRORS` tuple.
EXPECTED_ERRORS = (OSError, ValueError, KeyError, SafetensorError)


def _one_line(error: BaseException) -> str:
    message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
    return " ".join(str(message).split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run `dualtoken` with `argv` (default: the process arguments); returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, --version and argparse's own usage errors
        return exit_request.code if isinstance(exit_request.code, int) else 0
    subcommand = SUBCOMMANDS[args.command]
    expected_errors = EXPECTED_ERRORS
    try:
        import torch

        group = importlib.import_module(f".{subcommand.module}", __name__)
        expected_errors += getattr(group, "EXPECTED_ERRORS", ())
        if "device" in vars(args) and args.device is None:
            args.device = torch_device("auto")
        with torch.no_grad():
            getattr(group, subcommand.function)(args)
    except KeyboardInterrupt:
        print(f"dualtoken {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED_STATUS
    except expected_errors as error:
        if args.debug:
            raise
        print(f"dualtoken {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return ERROR_STATUS
    return 0


__all__ = ["SUBCOMMANDS", "build_parser", "main"]
