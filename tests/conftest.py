import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dualtoken_hf.testing import build_tiny_unified


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every model here is tiny: thread hand-offs cost more than they save, and far more when the 2 cores are shared
# (a tiny image generation took 8.2 s with 2 threads and 0.9 s with 1 on a busy machine).
torch.set_num_threads(1)

REFERENCE_DIR = Path(os.environ.get("DUALTOKEN_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))
# CI always has the golden tensors, so a missing folder fails the golden tests; a local checkout without
# ../shared may skip them explicitly with DUALTOKEN_ALLOW_MISSING_REFERENCE=1.
ALLOW_MISSING_REFERENCE = os.environ.get("DUALTOKEN_ALLOW_MISSING_REFERENCE") == "1"


def require_reference_dir() -> Path:
    """The folder of official golden tensors; when it is missing the calling test fails, or skips where
    `DUALTOKEN_ALLOW_MISSING_REFERENCE=1`."""
    if not REFERENCE_DIR.is_dir():
        message = f"official reference tensors not found in {REFERENCE_DIR} (set DUALTOKEN_REFERENCE_DIR)"
        if ALLOW_MISSING_REFERENCE:
            pytest.skip(f"{message}; skipped because DUALTOKEN_ALLOW_MISSING_REFERENCE=1")
        pytest.fail(f"{message}; DUALTOKEN_ALLOW_MISSING_REFERENCE=1 skips the golden tests instead", pytrace=False)
    return REFERENCE_DIR


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected| in float64."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


class OfficialReference:
    """One official tiny run: its state dict (official key names), config dicts and golden tensors."""

    def __init__(self, version: str):
        self.version = version
        state_path = REFERENCE_DIR / f"official_{version}_tiny_state.safetensors"
        with safe_open(state_path, "pt") as handle:
            metadata = handle.metadata()
        self.state = load_file(state_path)
        self.io = load_file(REFERENCE_DIR / f"official_{version}_tiny_io.safetensors")
        self.official_config = json.loads(metadata["rqvaesiglip_config"])
        self.siglip_vision_config = json.loads(metadata["siglip_vision_config"])

    @property
    def preset(self) -> str:
        return "paper" if self.version == "v1" else "v2"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """`require_reference_dir()` as a fixture (for `pytest.mark.usefixtures`)."""
    return require_reference_dir()


@pytest.fixture(scope="session", params=["v1", "v2"])
def official(request, reference_dir) -> OfficialReference:
    return OfficialReference(request.param)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    """A tiny random-weight tokenizer (seed 0) with its image processor, saved as a folder."""
    from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionConfig, DualTokenVisionModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tokenizer")
    DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).save_pretrained(folder)
    DualTokenImageProcessor.from_preset("tiny").save_pretrained(folder)
    return folder


REPO = Path(__file__).resolve().parents[1]


def load_example(path: Path):
    """An example script (`examples/*.py`) imported as a module, so tests can call its `parse_args` and `main`."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch_on_two_cpu_processes(script: Path, args: list[str], timeout: float) -> None:
    """Run `script args` as 2 CPU processes (DDP over gloo) and assert it succeeded.

    `accelerate launch --cpu` starts a single process unless MPI is configured; `--multi_gpu` with ACCELERATE_USE_CPU
    starts 2 CPU processes through torchrun, i.e. DDP exactly as on GPUs. The launcher gets its own process group, so
    on a timeout it AND its workers die (a worker left alone would wait forever).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(script), *args,
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                                start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        _, stderr = launcher.communicate()
    assert launcher.returncode == 0, stderr[-4000:]


# Shared by the unified-training tests (stages, data, LoRA, generation projectors).
@pytest.fixture(scope="module")
def unified_dir(tmp_path_factory) -> Path:
    return Path(build_tiny_unified(tmp_path_factory.mktemp("unified")))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Four image-caption pairs as JSON Lines with image paths relative to the file."""
    folder = tmp_path_factory.mktemp("pairs")
    rng = np.random.default_rng(0)
    with open(folder / "pairs.jsonl", "w") as pairs:
        for index, caption in enumerate(["a red fox", "a small grey cat", "a cup of hot coffee", "a tall rocket"]):
            PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"{index}.png")
            pairs.write(json.dumps({"image": f"{index}.png", "text": caption}) + "\n")
    return folder / "pairs.jsonl"
