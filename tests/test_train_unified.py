"""examples/train_unified.py on a tiny random unified model: each stage trains exactly its modules, the sequences
of its two tasks are those of inference, and a resumed run continues with the same losses."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from dualtoken_hf.hub.folders import load_unified
from dualtoken_hf.testing import build_tiny_processor, build_tiny_unified
from dualtoken_hf.training import read_jsonl
from dualtoken_hf.training.unified import IGNORE_INDEX, MODULE_GROUPS, STAGES, CaptionPairsDataset, SequenceBuilder


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_unified.py"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_unified = load_script(SCRIPT)


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


def script_args(stage: str, model_dir: Path, pairs_file: Path | None, output_dir: Path, *extra: str) -> list[str]:
    data = ["--data_files", str(pairs_file)] if pairs_file is not None else []
    return [
        "--stage", stage, "--model_name_or_path", str(model_dir), *data, "--output_dir", str(output_dir),
        "--cache_dir", str(output_dir.parent / "cache"), "--total_batch_size", "2", "--max_train_steps", "2",
        "--learning_rate", "1e-3", *extra,
    ]


def run(stage: str, model_dir: Path, pairs_file: Path | None, output_dir: Path, *extra: str) -> dict:
    return train_unified.main(train_unified.parse_args(script_args(stage, model_dir, pairs_file, output_dir, *extra)))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_unified(folder).state_dict()


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_changes_its_modules_and_nothing_else(tmp_path, unified_dir, pairs_file, stage):
    # Every pair gives each task of the stage once: 4 examples per task, so 2 steps of 2 see both tasks in `joint`.
    extra = ("--total_batch_size", "4") if stage == "joint" else ()
    summary = run(stage, unified_dir, pairs_file, tmp_path / "out", *extra)
    before, after = weights(unified_dir), weights(tmp_path / "out")
    trained_prefixes = tuple(f"{prefix}." for group in STAGES[stage].trains for prefix in MODULE_GROUPS[group])
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trained = {name for name in before if name.startswith(trained_prefixes)}
    if "language_model" in STAGES[stage].trains:
        trained.add("lm_head.weight")  # tied to the input embeddings
    assert changed <= trained, sorted(changed - trained)
    assert changed == trained, sorted(trained - changed)
    assert not any(name.startswith("vision_tokenizer.") for name in changed)
    logs = read_jsonl(tmp_path / "out" / "logs" / "train_unified.jsonl")
    assert [record["step"] for record in logs] == [1, 2] and summary["global_step"] == 2
    # Both tasks have text targets (the reply; end-of-image), only text-to-image has image targets.
    generates = "generate" in STAGES[stage].tasks
    assert logs[0]["loss/text_loss"] > 0
    assert (logs[0]["loss/pixel_loss"] > 0) == generates and (logs[0]["loss/semantic_loss"] > 0) == generates


def test_a_resumed_run_continues_with_the_same_losses(tmp_path, unified_dir, pairs_file):
    uninterrupted = tmp_path / "uninterrupted"
    run("understand", unified_dir, pairs_file, uninterrupted, "--max_train_steps", "3", "--checkpointing_steps", "1")
    resumed = tmp_path / "resumed"
    run("understand", unified_dir, pairs_file, resumed, "--max_train_steps", "3",
        "--resume_from_checkpoint", str(uninterrupted / "checkpoint-1"))
    expected = read_jsonl(uninterrupted / "logs" / "train_unified.jsonl")
    continued = read_jsonl(resumed / "logs" / "train_unified.jsonl")
    assert [record["step"] for record in continued] == [2, 3]
    assert continued == expected[1:]
    resumed_weights = weights(resumed)
    for name, value in weights(uninterrupted).items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=0, msg=name)


def test_the_text_to_image_sequence_is_the_inference_prompt_then_image_targets():
    processor = build_tiny_processor()
    input_ids, labels = SequenceBuilder(processor).generate("a red fox")
    prompt = processor(text=["a red fox"], generation_mode="image")["input_ids"][0]
    assert input_ids[: len(prompt)] == prompt and prompt[-1] == processor.boi_token_id
    image = [processor.image_token_id] * processor.num_image_tokens + [processor.eoi_token_id]
    assert input_ids[len(prompt) :] == image
    assert labels == [IGNORE_INDEX] * len(prompt) + image


def test_the_caption_sequence_has_its_loss_on_the_reply_only():
    processor = build_tiny_processor()
    input_ids, labels = SequenceBuilder(processor).caption("a red fox")
    targets = [token for token, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(targets) == "a red fox<|im_end|>\n"
    assert input_ids.count(processor.image_token_id) == processor.num_image_tokens
    assert all(label == IGNORE_INDEX for token, label in zip(input_ids, labels) if token == processor.image_token_id)


def test_pretokenized_codes_train_exactly_like_the_images_they_come_from(tmp_path, unified_dir, pairs_file):
    pretokenize = load_script(ROOT / "examples" / "pretokenize.py")
    pretokenize.main(pretokenize.parse_args([
        "--tokenizer_model_name_or_path", str(unified_dir), "--data_files", str(pairs_file),
        "--output_dir", str(tmp_path / "codes"), "--cache_dir", str(tmp_path / "cache"),
    ]))
    run("generate", unified_dir, pairs_file, tmp_path / "from_images")
    run("generate", unified_dir, None, tmp_path / "from_codes", "--pretokenized_dir", str(tmp_path / "codes"))
    from_images = read_jsonl(tmp_path / "from_images" / "logs" / "train_unified.jsonl")
    from_codes = read_jsonl(tmp_path / "from_codes" / "logs" / "train_unified.jsonl")
    assert len(from_codes) == len(from_images) == 2
    for images_record, codes_record in zip(from_images, from_codes):
        assert codes_record == pytest.approx(images_record, rel=1e-5)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_two_process_ddp_run_of_a_stage_trains_its_modules(tmp_path, unified_dir, pairs_file):
    output_dir = tmp_path / "out"
    # As in test_train_tokenizer: `--multi_gpu` with ACCELERATE_USE_CPU starts 2 CPU processes through torchrun.
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(SCRIPT),
        *script_args("align", unified_dir, pairs_file, output_dir, "--total_batch_size", "4"),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    launcher = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
    try:
        _, stderr = launcher.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        _, stderr = launcher.communicate()
    assert launcher.returncode == 0, stderr[-4000:]
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 2
    before, after = weights(unified_dir), weights(output_dir)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.startswith("image_projector.")}


def test_an_unreadable_image_gives_the_next_pair_and_is_counted(tmp_path, pairs_file):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    pairs = datasets.Dataset.from_list([{"image": str(broken), "text": "broken"},
                                        {"image": str(pairs_file.parent / "1.png"), "text": "a small grey cat"}])
    builder = SequenceBuilder(build_tiny_processor())
    dataset = CaptionPairsDataset(pairs, ("caption", "generate"), builder)
    assert len(dataset) == 4
    first, second = dataset[0], dataset[1]
    assert first["skipped_images"] == second["skipped_images"] == 1
    assert (first["input_ids"], first["labels"]) == builder.caption("a small grey cat")
    assert (second["input_ids"], second["labels"]) == builder.generate("a small grey cat")
    expected = builder.processor.image_processor(PIL.Image.open(pairs_file.parent / "1.png"), return_tensors="pt")
    torch.testing.assert_close(first["pixel_values"], expected["pixel_values"][0])


def test_the_stage_table_is_the_papers():
    table = {name: (stage.trains, stage.tasks, stage.learning_rate, stage.batch_size) for name, stage in STAGES.items()}
    assert table == {
        "align": (("image_projector",), ("caption",), 1e-3, 64),
        "understand": (("image_projector", "language_model"), ("caption",), 2e-5, 256),
        "generate": (("pixel_head", "semantic_head"), ("generate",), 1e-4, 128),
        "joint": (("image_projector", "language_model", "pixel_head", "semantic_head"), ("caption", "generate"), 1e-5,
                  256),
    }
