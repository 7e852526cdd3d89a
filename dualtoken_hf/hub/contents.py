"""What an exported Hub folder may hold: the package's own modules and data files, nothing that runs or unpickles.

Who loads a folder with `trust_remote_code=True` runs its `.py` files, and a pickle (`.pt`, `.bin`, ...) runs code
when loaded, so `dualtoken push` uploads a folder only if every file it would upload is

- a regular file (no symbolic link, no device or pipe), without exec bits and not a script (`#!`);
- one of the package's own modules (a top-level `*.py` file of `dualtoken_hf`, e.g. `modeling_dualtoken.py`), at
  the top of the folder and byte for byte the package's copy;
- or a data file: weights in safetensors, JSON configs, the card, tokenizer files, templates, images.

Not a Hub module (it reads the package's files).
"""

import os
import stat
from pathlib import Path

from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects


DATA_SUFFIXES = (".json", ".safetensors", ".md", ".txt", ".jinja", ".model", ".png", ".jpg", ".jpeg", ".gif", ".webp")
DATA_NAMES = (".gitattributes",)
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
SHOWN_PROBLEMS = 10


def package_modules() -> dict[str, Path]:
    """The package's own modules, by file name: its top-level `*.py` files but `__init__.py` and `__main__.py`,
    which are exactly the modules a saved folder carries as remote code."""
    package = Path(__file__).resolve().parents[1]
    return {path.name: path for path in package.glob("*.py") if not path.name.startswith("__")}


def _uploaded_entries(folder: Path, ignored: tuple[str, ...]) -> dict[str, Path]:
    """Every file, folder and link under `folder` that `HfApi.upload_folder` would consider, by its path relative to
    `folder`; links are listed, not followed."""
    entries = {}
    for root, folders, files in os.walk(folder):
        for name in folders + files:
            path = Path(root, name)
            entries[path.relative_to(folder).as_posix()] = path
    kept = filter_repo_objects(entries, ignore_patterns=[*ignored, *DEFAULT_IGNORE_PATTERNS])
    return {name: entries[name] for name in kept}


def _refusal(name: str, path: Path, modules: dict[str, Path]) -> str | None:
    """Why an export folder may not hold `path` (`name` in the folder), or `None` when it may."""
    if path.is_symlink():
        return f"is a symbolic link (to {os.readlink(path)!r})"
    if path.is_dir():
        return None
    if not path.is_file():
        return "is not a regular file"
    mode = path.stat().st_mode
    if mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
        return f"is executable (mode {stat.filemode(mode)})"
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return f"is a pickle ({suffix}), which runs code when loaded: weights belong in .safetensors files"
    if suffix == ".py":
        if name not in modules:
            return "is not one of the package's modules (an export holds only those, at its top level)"
        if path.read_bytes() != modules[name].read_bytes():
            return f"differs from the package's {name} (export the folder again with this version of the package)"
        return None
    with open(path, "rb") as handle:
        if handle.read(2) == b"#!":
            return "is a script (it starts with #!)"
    if suffix not in DATA_SUFFIXES and path.name not in DATA_NAMES:
        return f"is not a data file of an export ({', '.join(DATA_SUFFIXES)}) nor one of the package's modules"
    return None


def check_hub_files(folder: str | os.PathLike, ignored: tuple[str, ...] = ()) -> None:
    """
    Raise `ValueError` naming each file of `folder` that an export may not hold, and why (see the module docstring).

    Args:
        folder: The folder to upload.
        ignored: Upload ignore patterns (`fnmatch`, relative to `folder`) besides the Hub client's own (`.git/`,
            `.cache/huggingface/`): what matches is not uploaded, hence not checked.
    """
    folder = Path(folder)
    modules = package_modules()
    problems = []
    for name, path in sorted(_uploaded_entries(folder, ignored).items()):
        reason = _refusal(name, path, modules)
        if reason is not None:
            problems.append(f"{name} {reason}")
    if problems:
        more = f"; and {len(problems) - SHOWN_PROBLEMS} more" if len(problems) > SHOWN_PROBLEMS else ""
        raise ValueError(
            f"{str(folder)!r} holds what a DualToken export must not: {'; '.join(problems[:SHOWN_PROBLEMS])}{more}. "
            "Remove it, or export the model again with `dualtoken export` into a new folder"
        )


__all__ = ["DATA_SUFFIXES", "PICKLE_SUFFIXES", "check_hub_files", "package_modules"]
