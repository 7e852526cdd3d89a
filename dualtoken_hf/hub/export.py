"""Complete, checked Hub folders: export a saved model, check it loads where this package is absent, push it.

`export_folder` rewrites a tokenizer or unified model folder as a complete Hub folder (remote code, processor,
generation config, model card, optionally the pixel decoder as a diffusers `pixel_decoder/` subfolder).
`check_folder` loads it in a fresh Python process in which `import dualtoken_hf` fails, with
`trust_remote_code=True`, and runs it once; success writes `EXPORT_CHECK_FILE`, which `push_folder` requires (and
does not upload). Not a Hub module (it may import the package).
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
import transformers
from huggingface_hub import HfApi
from huggingface_hub.utils import validate_repo_id

from ..convert.checkpoint import TEXT_TOWER_FOLDER
from .cards import CardDetails
from .contents import check_hub_files
from .folders import UNIFIED, folder_model_type, load_image_processor, load_model, load_processor, tokenizer_of
from .locking import LOCK_FILE, FolderLock
from .writing import save_tokenizer_folder, save_unified_folder


EXPORT_CHECK_FILE = ".dualtoken_export_check.json"
PIXEL_DECODER_FOLDER = "pixel_decoder"
CARD_FILE = "README.md"
# Copied as they are from the model folder: its card and the SigLIP text tower kept by `dualtoken convert-official`.
COPIED_ENTRIES = (CARD_FILE, TEXT_TOWER_FOLDER)
# Files a user may still edit after the check without invalidating it.
EDITABLE_AFTER_CHECK = (CARD_FILE, EXPORT_CHECK_FILE)
# Kept in the folder but never uploaded.
NOT_UPLOADED = (EXPORT_CHECK_FILE, LOCK_FILE)
CHECK_TIMEOUT_S = 3600

# Runs in a fresh interpreter: loads the folder through its remote code only and runs it once on a gray image.
CHECK_SCRIPT = r"""
import json, sys
sys.modules["dualtoken_hf"] = None  # as where the package is not installed: `import dualtoken_hf` fails
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, AutoProcessor

folder, kind = sys.argv[1], sys.argv[2]
model = AutoModel.from_pretrained(folder, trust_remote_code=True, use_safetensors=True).eval()
if not type(model).__module__.startswith("transformers_modules"):
    raise SystemExit(f"the model class came from {type(model).__module__}, not from the folder's remote code")
tokenizer = model.vision_tokenizer if kind == "dualtoken" else model
size = tokenizer.config.siglip_config.image_size
image = Image.new("RGB", (size, size), (128, 128, 128))
report = {"model_class": type(model).__name__}
with torch.no_grad():
    if kind == "dualtoken":
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        inputs = processor(text=["Describe this image."], images=[image], return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=1, do_sample=False)
        report["generated_tokens"] = generated.shape[1] - inputs["input_ids"].shape[1]
    else:
        image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
        encoded = tokenizer.encode(image_processor(image, return_tensors="pt").pixel_values)
        report["pixel_codes_shape"] = list(encoded.pixel_codes.shape)
        report["decoded_shape"] = list(tokenizer.decode(encoded.pixel_codes).shape)
    if "pixel_decoder" in sys.argv[3:]:
        decoder = type(tokenizer.pixel_decoder).from_pretrained(folder, subfolder="pixel_decoder",
                                                                use_safetensors=True)
        same = all(torch.equal(a, b) for a, b in zip(decoder.state_dict().values(),
                                                     tokenizer.pixel_decoder.state_dict().values()))
        if not same:
            raise SystemExit("pixel_decoder/ differs from the model's pixel decoder")
        report["pixel_decoder"] = type(decoder).__name__
print("DUALTOKEN-CHECK " + json.dumps(report))
"""


class ExportCheckError(RuntimeError):
    """The exported folder did not load or run without the package; `log` holds the check's output."""

    def __init__(self, message: str, log: str):
        super().__init__(message)
        self.log = log


@dataclass
class ExportResult:
    """What `export_folder` wrote: the folder, the model kind and the check's report."""

    folder: Path
    kind: str
    report: dict


def _write_hub_files(model_dir: Path, output_dir: Path, pixel_decoder: bool, license: str) -> str:
    kind = folder_model_type(model_dir)
    model = load_model(model_dir)
    card = CardDetails(origin=f"Exported from `{model_dir.name}` with `dualtoken export`.", license=license)
    if kind == UNIFIED:
        save_unified_folder(model, load_processor(model_dir), output_dir, card=card)
    else:
        save_tokenizer_folder(model, output_dir, load_image_processor(model_dir, model.config), card=card)
    if pixel_decoder:
        tokenizer_of(model).pixel_decoder.save_pretrained(output_dir / PIXEL_DECODER_FOLDER)
    # The model folder's own card, when it has one, replaces the new one.
    for name in COPIED_ENTRIES:
        source = model_dir / name
        if source.is_dir():
            shutil.copytree(source, output_dir / name, dirs_exist_ok=True)
        elif source.is_file():
            shutil.copy2(source, output_dir / name)
    return kind


def _fingerprint(folder: Path) -> dict[str, int]:
    """Size of every file the check vouches for (paths relative to `folder`)."""
    return {
        str(path.relative_to(folder)): path.stat().st_size
        for path in sorted(folder.rglob("*"))
        if path.is_file() and str(path.relative_to(folder)) not in (*EDITABLE_AFTER_CHECK, LOCK_FILE)
    }


def check_folder(folder: str | os.PathLike, timeout: float = CHECK_TIMEOUT_S) -> dict:
    """
    Load `folder` with `trust_remote_code=True` in a fresh Python process where `dualtoken_hf` cannot be imported
    and run it once (tokenizer: encode + decode; unified: processor + one generated token for an image prompt; the
    `pixel_decoder/` subfolder, when present, through its diffusers class). On success write `EXPORT_CHECK_FILE`
    (versions, time, file sizes) and return its content; otherwise remove it and raise `ExportCheckError`.
    """
    folder = Path(folder)
    marker = folder / EXPORT_CHECK_FILE
    marker.unlink(missing_ok=True)
    kind = folder_model_type(folder)
    extra = [PIXEL_DECODER_FOLDER] if (folder / PIXEL_DECODER_FOLDER).is_dir() else []
    with tempfile.TemporaryDirectory(prefix="dualtoken-check-") as scratch:
        env = {**os.environ, "HF_MODULES_CACHE": scratch, "HF_HUB_OFFLINE": "1"}
        command = [sys.executable, "-c", CHECK_SCRIPT, str(folder.resolve()), kind, *extra]
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=scratch, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            message = f"loading {str(folder)!r} without the package took over {timeout:.0f} s"
            raise ExportCheckError(message, "") from error
    lines = [line for line in result.stdout.splitlines() if line.startswith("DUALTOKEN-CHECK ")]
    if result.returncode != 0 or not lines:
        log = result.stdout + result.stderr
        last = next((line for line in reversed(log.splitlines()) if line.strip()), "no output")
        raise ExportCheckError(f"{str(folder)!r} does not load without the package: {last.strip()}", log)
    record = {
        "kind": kind,
        "checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "report": json.loads(lines[-1].removeprefix("DUALTOKEN-CHECK ")),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "huggingface_hub": huggingface_hub.__version__,
        },
        "files": _fingerprint(folder),
    }
    marker.write_text(json.dumps(record, indent=2) + "\n")
    return record


def export_folder(
    model_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    pixel_decoder: bool = False,
    license: str = "apache-2.0",
    overwrite: bool = False,
) -> ExportResult:
    """
    Write the complete Hub folder of the model in `model_dir` to `output_dir`, then [`check_folder`] it.

    The model card of `model_dir` (`README.md`) is kept; a folder without one gets a new card with Hub metadata.
    `output_dir` is locked while it is written (see [`FolderLock`]): a second export or a training run writing into it
    meanwhile fails with `FolderInUseError`.

    Args:
        model_dir: A saved tokenizer or unified model folder.
        output_dir: Where to write; must differ from `model_dir` and be empty unless `overwrite`.
        pixel_decoder: Also write the pixel decoder as a diffusers model in `pixel_decoder/`.
        license: Hub license id for a new model card.
        overwrite: Write into a non-empty `output_dir`.
    """
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    folder_model_type(model_dir)
    if output_dir.resolve() == model_dir.resolve():
        raise ValueError("the output folder must differ from the model folder")
    # Checked under the lock: another export into the same folder fails instead of mixing its files with ours.
    with FolderLock(output_dir):
        check_output_folder(output_dir, overwrite)
        kind = _write_hub_files(model_dir, output_dir, pixel_decoder, license)
        return ExportResult(output_dir, kind, check_folder(output_dir)["report"])


def check_output_folder(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """`output_dir` as a path, if it is a new or empty folder (or `overwrite`: any folder)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise FileExistsError(f"the output {str(output_dir)!r} is a file, not a folder")
    if output_dir.is_dir() and any(entry.name != LOCK_FILE for entry in output_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"the output folder {str(output_dir)!r} is not empty (pass --overwrite to write into it)")
    return output_dir


def read_check(folder: str | os.PathLike) -> dict:
    """The export check record of `folder`; refuses a folder without one or changed since (other than its card)."""
    folder = Path(folder)
    folder_model_type(folder)
    marker = folder / EXPORT_CHECK_FILE
    if not marker.is_file():
        raise ValueError(
            f"{str(folder)!r} has not passed the export check (no {EXPORT_CHECK_FILE}): write it with "
            "`dualtoken export MODEL_DIR OUTPUT_DIR` first"
        )
    try:
        record = json.loads(marker.read_text())
        recorded = record["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{str(marker)!r} is damaged ({error}); run `dualtoken export` again") from error
    current = _fingerprint(folder)
    changed = sorted(name for name in set(recorded) | set(current) if recorded.get(name) != current.get(name))
    if changed:
        raise ValueError(
            f"{str(folder)!r} changed after its export check ({', '.join(changed[:5])}); run `dualtoken export` again"
        )
    return record


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str = "Upload DualToken model",
) -> str:
    """
    Upload a checked export folder (see [`read_check`]) to the Hub model repository `repo_id`, creating the
    repository (and the branch `revision`) when needed. Returns the commit URL.

    Refuses (`ValueError`, naming each file and why) a folder holding anything but the package's own modules and
    data files: links, executables, scripts, pickles, other code (see `hub.contents`).
    """
    validate_repo_id(repo_id)
    check_hub_files(folder, ignored=NOT_UPLOADED)
    read_check(folder)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        revision=revision,
        commit_message=commit_message,
        ignore_patterns=list(NOT_UPLOADED),
    )
    return commit.commit_url


__all__ = [
    "EXPORT_CHECK_FILE",
    "ExportCheckError",
    "ExportResult",
    "check_folder",
    "check_output_folder",
    "export_folder",
    "push_folder",
    "read_check",
]
