"""examples/train_tokenizer.py end to end on the tiny preset: skipping bad images, the saved Hub folder, pushing
with a fake Hub, exact resumption, and a 2-process DDP run whose codebooks stay identical."""

import importlib.util
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from accelerate.utils import set_seed
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.hf_api import future_compatible
from transformers import AutoImageProcessor, AutoModel, SiglipVisionModel

from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionConfig, DualTokenVisionModel
from dualtoken_hf.training import hub, read_jsonl, warmup_warning

from conftest import launch_on_two_cpu_processes, load_example


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_tokenizer.py"
train_tokenizer = load_example(SCRIPT)


def write_photos(folder: Path, count: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        array = (rng.random((56 + 4 * index, 72, 3)) * 255).astype(np.uint8)
        PIL.Image.fromarray(array).save(folder / f"photo_{index}.png")
    return folder


def tiny_args(data_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--preset", "tiny", "--train_data_dir", str(data_dir), "--output_dir", str(output_dir),
        "--cache_dir", str(output_dir.parent / "datasets_cache"), "--perceptual_loss", "none",
        "--learning_rate", "1e-3", "--lr_warmup_steps", "0", "--gan_start_step", "1",
        "--validation_steps", "1", "--num_validation_images", "2", *extra,
    ]


class FakeHfApi(HfApi):
    """A real `HfApi` (background queue included) that records uploads (and which files the folder held at that
    moment) instead of sending them; the first upload fails."""

    uploads: list[dict] = []
    failures_left = 0

    def create_repo(self, repo_id, private=None, exist_ok=False):
        return types.SimpleNamespace(repo_id=repo_id)

    @future_compatible
    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, ignore_patterns=None,
                      run_as_future=False):
        if FakeHfApi.failures_left:
            FakeHfApi.failures_left -= 1
            raise ConnectionError("hub unreachable")
        files = sorted(str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file())
        FakeHfApi.uploads.append({"repo_id": repo_id, "folder": folder_path, "path_in_repo": path_in_repo,
                                  "ignore_patterns": ignore_patterns, "files": files})


@pytest.fixture(scope="module")
def pushed_run(tmp_path_factory):
    """One 2-step run with a corrupt image in the data, a GAN from step 1, checkpoints every step (keeping one),
    and --push_to_hub --hub_strategy checkpoint against a fake Hub whose first upload fails."""
    root = tmp_path_factory.mktemp("pushed_run")
    data_dir = write_photos(root / "photos", 4)
    (data_dir / "broken.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    output_dir = root / "out"
    FakeHfApi.uploads, FakeHfApi.failures_left = [], 1
    handler = logging.StreamHandler(io.StringIO())
    root_logger = logging.getLogger()
    previous_level = root_logger.level
    root_logger.addHandler(handler)
    root_logger.setLevel(logging.INFO)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(hub, "HfApi", FakeHfApi)
            args = train_tokenizer.parse_args(tiny_args(
                data_dir, output_dir, "--train_batch_size", "5", "--max_train_steps", "2",
                "--checkpointing_steps", "1", "--checkpoints_total_limit", "1",
                "--push_to_hub", "--hub_model_id", "me/tiny-dualtoken", "--hub_strategy", "checkpoint",
            ))
            summary = train_tokenizer.main(args)
    finally:
        root_logger.removeHandler(handler)
        root_logger.setLevel(previous_level)
    return types.SimpleNamespace(output_dir=output_dir, summary=summary, log=handler.stream.getvalue(),
                                 uploads=list(FakeHfApi.uploads))


def test_corrupt_image_is_skipped_and_counted(pushed_run):
    # One batch per epoch holds all 5 files: the corrupt one is met once per epoch, so twice in 2 steps.
    assert pushed_run.summary["skipped_images"] == 2
    records = read_jsonl(pushed_run.output_dir / "logs" / "train_tokenizer.jsonl")
    assert [record["data/skipped_images"] for record in records] == [1, 2]
    assert "skipping unreadable image" in pushed_run.log and "broken.jpg" in pushed_run.log


def test_every_loss_term_and_codebook_statistic_is_logged(pushed_run):
    records = read_jsonl(pushed_run.output_dir / "logs" / "train_tokenizer.jsonl")
    assert [record["step"] for record in records] == [1, 2]
    expected = {
        "loss/total", "loss/reconstruction", "loss/perceptual", "loss/generator", "loss/adaptive_weight",
        "loss/semantic", "loss/semantic_features", "loss/semantic_pooled", "loss/pixel_commitment",
        "loss/semantic_commitment", "train/psnr", "lr", "codebook/pixel_usage", "codebook/pixel_perplexity",
        "codebook/semantic_usage", "codebook/semantic_perplexity", "validation/psnr", "validation/ssim",
    }
    assert expected <= set(records[0])
    assert {"discriminator/discriminator", "discriminator/logits_real"} <= set(records[1])  # the GAN starts at 1
    assert records[0]["loss/adaptive_weight"] == 0.0 and 0.3 <= records[1]["loss/adaptive_weight"] <= 10.0
    assert "perceptual loss: none" in pushed_run.log


def test_validation_grids_are_saved_as_png(pushed_run):
    grid = PIL.Image.open(pushed_run.output_dir / "validation" / "step-0000002.png")
    assert grid.width > 2 * 64 and grid.height > 2 * 64  # 2 images x (original | reconstruction)


def test_final_folder_loads_with_auto_classes_and_has_a_model_card(pushed_run):
    folder = pushed_run.output_dir
    assert isinstance(AutoModel.from_pretrained(folder), DualTokenVisionModel)
    assert isinstance(AutoImageProcessor.from_pretrained(folder), DualTokenImageProcessor)
    assert (folder / "modeling_dualtoken_vision.py").is_file()  # remote code for hosts without the package
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers"
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "image-feature-extraction"
    assert "dualtoken" in card.data.tags
    assert "perceptual loss" in card.text


def test_checkpoints_total_limit_keeps_the_newest(pushed_run):
    assert sorted(path.name for path in pushed_run.output_dir.glob("checkpoint-*")) == ["checkpoint-2"]


def test_push_to_hub_logs_a_failed_upload_and_pushes_checkpoints_and_the_final_folder(pushed_run):
    assert "to me/tiny-dualtoken/last-checkpoint failed: ConnectionError: hub unreachable" in pushed_run.log
    checkpoint_uploads = [upload for upload in pushed_run.uploads if upload["path_in_repo"] == "last-checkpoint"]
    assert [Path(upload["folder"]).name for upload in checkpoint_uploads] == ["checkpoint-2"]
    assert "training_state.json" in checkpoint_uploads[0]["files"]
    final = pushed_run.uploads[-1]
    assert Path(final["folder"]) == pushed_run.output_dir and final["path_in_repo"] is None
    assert {"config.json", "model.safetensors", "README.md", "preprocessor_config.json"} <= set(final["files"])
    assert "checkpoint-*" in final["ignore_patterns"]
    assert all(upload["repo_id"] == "me/tiny-dualtoken" for upload in pushed_run.uploads)


def test_resuming_gives_the_same_next_step_losses_as_an_uninterrupted_run(tmp_path):
    # Gradient accumulation 2 over 3 batches per epoch: step 1 = batches 1-2, step 2 = batch 3 (end of epoch),
    # step 3 = batches 1-2 of epoch 1. Resuming after step 1 restarts mid-epoch with the GAN running.
    data_dir = write_photos(tmp_path / "photos", 6)
    common = ("--train_batch_size", "2", "--gradient_accumulation_steps", "2", "--max_train_steps", "3",
              "--checkpointing_steps", "1", "--validation_steps", "100")
    uninterrupted = tmp_path / "uninterrupted"
    train_tokenizer.main(train_tokenizer.parse_args(tiny_args(data_dir, uninterrupted, *common)))
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted / "checkpoint-1", resumed / "checkpoint-1")
    train_tokenizer.main(train_tokenizer.parse_args(
        tiny_args(data_dir, resumed, *common, "--resume_from_checkpoint", "latest")
    ))
    expected = read_jsonl(uninterrupted / "logs" / "train_tokenizer.jsonl")[1:]
    actual = read_jsonl(resumed / "logs" / "train_tokenizer.jsonl")
    assert [record["step"] for record in actual] == [2, 3]
    assert actual == expected


def test_resuming_a_streamed_tar_shard_run_is_exact(tmp_path):
    shard_dir = tmp_path / "shards"
    shard_dir.mkdir()
    rng = np.random.default_rng(0)
    for shard in range(2):
        with tarfile.open(shard_dir / f"train-{shard:04d}.tar", "w") as archive:
            for index in range(4):
                buffer = io.BytesIO()
                PIL.Image.fromarray((rng.random((60, 70, 3)) * 255).astype(np.uint8)).save(buffer, "JPEG")
                member = tarfile.TarInfo(f"{shard}{index:04d}.jpg")
                member.size = buffer.tell()
                archive.addfile(member, io.BytesIO(buffer.getvalue()))
    common = ["--preset", "tiny", "--train_shards", str(shard_dir / "train-{0000..0001}.tar"), "--perceptual_loss",
              "none", "--train_batch_size", "2", "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--validation_steps", "100", "--gan_start_step", "1", "--shuffle_buffer_size", "4"]
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    train_tokenizer.main(train_tokenizer.parse_args([*common, "--output_dir", str(uninterrupted)]))
    shutil.copytree(uninterrupted / "checkpoint-2", resumed / "checkpoint-2")
    train_tokenizer.main(train_tokenizer.parse_args(
        [*common, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]
    ))
    expected = read_jsonl(uninterrupted / "logs" / "train_tokenizer.jsonl")[2:]
    assert read_jsonl(resumed / "logs" / "train_tokenizer.jsonl") == expected


@pytest.mark.slow
def test_two_process_ddp_run_keeps_codebooks_identical(tmp_path):
    data_dir = write_photos(tmp_path / "photos", 8)
    output_dir = tmp_path / "out"
    args = tiny_args(data_dir, output_dir, "--train_batch_size", "2", "--gradient_accumulation_steps", "2",
                     "--max_train_steps", "2", "--gan_start_step", "0", "--checkpointing_steps", "100",
                     "--validation_steps", "100")
    launch_on_two_cpu_processes(SCRIPT, args, timeout=180)
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 2
    assert summary["out_of_sync"] == []  # codebook buffers and discriminator weights (GAN on from step 0)
    # The codebooks did move (EMA updates ran), so the comparison is not between two untouched copies.
    set_seed(0)
    initial = train_tokenizer.build_tokenizer(train_tokenizer.parse_args(tiny_args(data_dir, output_dir)))
    trained = DualTokenVisionModel.from_pretrained(output_dir)
    assert not torch.equal(trained.pixel_quantizer.codebook, initial.pixel_quantizer.codebook)
    assert not torch.equal(trained.semantic_quantizer.codebook, initial.semantic_quantizer.codebook)


# The teacher of eq. 4 and the recipe's semantic features


def save_siglip(folder: Path, seed: int) -> Path:
    """A random tiny SigLIP vision tower (the tiny preset's) saved as a pretrained checkpoint."""
    torch.manual_seed(seed)
    SiglipVisionModel(DualTokenVisionConfig.from_preset("tiny").siglip_config).save_pretrained(folder)
    return folder


def save_continued_tokenizer(folder: Path, siglip: Path | None) -> Path:
    """A tokenizer started from `siglip` (or from scratch) whose tower then moved away from it, as training does."""
    torch.manual_seed(3)
    if siglip is None:
        model = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny"))
    else:
        model = DualTokenVisionModel.from_siglip(siglip, preset="tiny")
    with torch.no_grad():
        for parameter in model.siglip.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    model.save_pretrained(folder)
    return folder


def assert_same_weights(module: torch.nn.Module, other: torch.nn.Module):
    other_state = other.state_dict()
    for key, value in module.state_dict().items():
        assert torch.equal(value, other_state[key]), key


def test_continuing_a_tokenizer_takes_the_recorded_siglip_as_teacher(tmp_path):
    siglip = save_siglip(tmp_path / "siglip", seed=1)
    continued = save_continued_tokenizer(tmp_path / "tokenizer", siglip)
    assert DualTokenVisionModel.from_pretrained(continued).config.siglip_name_or_path == str(siglip)
    args = train_tokenizer.parse_args(tiny_args(tmp_path, tmp_path / "out", "--pretrained_model_name_or_path",
                                                str(continued)))
    model = train_tokenizer.build_tokenizer(args)
    teacher = train_tokenizer.build_teacher(args, model)
    assert_same_weights(teacher, SiglipVisionModel.from_pretrained(siglip))
    assert not torch.equal(teacher.post_layernorm.weight, model.siglip.post_layernorm.weight)
    assert not teacher.training and not any(parameter.requires_grad for parameter in teacher.parameters())


def test_an_explicit_teacher_replaces_the_recorded_one(tmp_path):
    continued = save_continued_tokenizer(tmp_path / "tokenizer", save_siglip(tmp_path / "siglip", seed=1))
    other = save_siglip(tmp_path / "other", seed=2)
    args = train_tokenizer.parse_args(tiny_args(tmp_path, tmp_path / "out", "--pretrained_model_name_or_path",
                                                str(continued), "--teacher_model_name_or_path", str(other)))
    teacher = train_tokenizer.build_teacher(args, train_tokenizer.build_tokenizer(args))
    assert_same_weights(teacher, SiglipVisionModel.from_pretrained(other))


def test_continuing_a_tokenizer_without_a_recorded_siglip_needs_an_explicit_teacher(tmp_path):
    continued = save_continued_tokenizer(tmp_path / "tokenizer", siglip=None)
    args = train_tokenizer.parse_args(tiny_args(tmp_path, tmp_path / "out", "--pretrained_model_name_or_path",
                                                str(continued)))
    with pytest.raises(ValueError, match="does not record the SigLIP.*--teacher_model_name_or_path"):
        train_tokenizer.build_teacher(args, train_tokenizer.build_tokenizer(args))


def test_a_teacher_of_another_shape_is_rejected(tmp_path):
    small = DualTokenVisionConfig.from_preset("tiny").siglip_config
    small.num_hidden_layers = 3
    SiglipVisionModel(small).save_pretrained(tmp_path / "small")
    args = train_tokenizer.parse_args(tiny_args(tmp_path, tmp_path / "out", "--teacher_model_name_or_path",
                                                str(tmp_path / "small")))
    with pytest.raises(ValueError, match="num_hidden_layers 3 vs 6"):
        train_tokenizer.build_teacher(args, train_tokenizer.build_tokenizer(args))


def first_step_semantic_feature_loss(tmp_path: Path, *model_args: str) -> float:
    data_dir = write_photos(tmp_path / "photos", 2)
    output_dir = tmp_path / "out"
    train_tokenizer.main(train_tokenizer.parse_args(tiny_args(
        data_dir, output_dir, *model_args, "--train_batch_size", "2", "--max_train_steps", "1",
        "--validation_steps", "100", "--checkpointing_steps", "100",
    )))
    return read_jsonl(output_dir / "logs" / "train_tokenizer.jsonl")[0]["loss/semantic_features"]


def test_a_continued_run_distils_to_the_original_siglip_from_its_first_step(tmp_path):
    # A copy of the continued tower would match its semantic layer exactly at the first forward (loss 0).
    continued = save_continued_tokenizer(tmp_path / "tokenizer", save_siglip(tmp_path / "siglip", seed=1))
    assert first_step_semantic_feature_loss(tmp_path, "--pretrained_model_name_or_path", str(continued)) > 1e-4


@pytest.mark.parametrize("recipe, starts_at_zero", [("paper", True), ("v2", False)])
def test_the_recipe_chooses_the_student_features_of_the_semantic_loss(tmp_path, recipe, starts_at_zero):
    """From a SigLIP, the semantic layer equals the teacher's at the first forward (`paper`: loss 0); `v2` compares
    the quantized, projected-back semantic features, which do not."""
    siglip = save_siglip(tmp_path / "siglip", seed=1)
    loss = first_step_semantic_feature_loss(tmp_path, "--siglip_model_name_or_path", str(siglip), "--recipe", recipe)
    assert (loss == 0.0) == starts_at_zero


# Arguments checked before anything heavy, and a schedule that can actually train


@pytest.mark.parametrize("flag, value, message", [
    ("--max_train_steps", "-5", "must be a positive integer, got '-5'"),
    ("--max_train_steps", "0", "must be a positive integer, got '0'"),
    ("--train_batch_size", "0", "must be a positive integer"),
    ("--gradient_accumulation_steps", "1.5", "must be a positive integer, got '1.5'"),
    ("--checkpointing_steps", "0", "must be a positive integer"),
    ("--checkpoints_total_limit", "0", "must be a positive integer"),
    ("--validation_steps", "-1", "must be a positive integer"),
    ("--num_validation_images", "0", "must be a positive integer"),
    ("--max_consecutive_nonfinite", "0", "must be a positive integer"),
    ("--learning_rate", "-0.0001", "must be > 0, got '-0.0001'"),
    ("--learning_rate", "nan", "must be a number, got 'nan'"),
    ("--discriminator_learning_rate", "0", "must be > 0"),
    ("--max_grad_norm", "0", "must be > 0"),
    ("--lr_warmup_steps", "-1", "must be an integer >= 0, got '-1'"),
    ("--gan_start_step", "-3", "must be an integer >= 0"),
    ("--commitment_weight", "-1", "must be >= 0, got '-1'"),
    ("--adam_beta2", "1", "must be in [0, 1), got '1'"),
    ("--adam_weight_decay", "-0.1", "must be >= 0"),
    ("--dataloader_num_workers", "-1", "must be an integer >= 0"),
    ("--lr_scheduler", "cosinus", "invalid choice: 'cosinus'"),
    ("--adaptive_weight_min", "20", "--adaptive_weight_min 20.0 is above --adaptive_weight_max 10.0"),
])
def test_bad_numbers_are_argument_errors(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exit_request:
        train_tokenizer.parse_args(tiny_args(tmp_path, tmp_path / "out", flag, value))
    assert exit_request.value.code == 2
    error = capsys.readouterr().err
    assert message in error and flag in error


def test_a_missing_lpips_package_is_a_one_line_error_before_anything_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(train_tokenizer, "find_spec", lambda name: None)  # neither lpips nor torchvision
    with pytest.raises(SystemExit) as exit_request:
        train_tokenizer.parse_args(["--train_data_dir", str(tmp_path)])  # --perceptual_loss lpips by default
    message = str(exit_request.value.code)
    assert "error: --perceptual_loss lpips (the default) needs lpips and torchvision: pip install lpips" in message
    assert "--perceptual_loss none" in message and "\n" not in message


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("lpips") is not None, reason="lpips is installed here")
def test_without_lpips_the_first_line_the_script_prints_is_the_fix(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), "--train_data_dir", str(tmp_path)], capture_output=True,
                            text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert result.returncode == 1
    first_line = result.stderr.strip().splitlines()[0]
    assert first_line.startswith("train_tokenizer.py: error: --perceptual_loss lpips (the default) needs lpips")
    assert "pip install lpips" in first_line and "--perceptual_loss none" in first_line


def test_warmup_over_half_the_run_is_a_warning_that_says_what_to_pass():
    # The recipes' 10k warmup steps on a 300-step run: the learning rate never reaches its peak.
    message = warmup_warning(10_000, 300)
    assert message.startswith("--lr_warmup_steps 10000 covers 100% of this 300-step run: the learning rate never "
                              "reaches its peak")
    assert "pass --lr_warmup_steps 30" in message
    assert "stays below its peak" in warmup_warning(151, 300)
    assert warmup_warning(150, 300) is None and warmup_warning(50, 400) is None


def test_a_long_warmup_is_logged_as_a_warning_and_each_step_logs_the_learning_rate_it_applied(tmp_path, caplog):
    data_dir = write_photos(tmp_path / "photos", 2)
    output_dir = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        train_tokenizer.main(train_tokenizer.parse_args(tiny_args(
            data_dir, output_dir, "--train_batch_size", "2", "--max_train_steps", "2", "--lr_warmup_steps", "4",
            "--validation_steps", "100", "--checkpointing_steps", "100",
        )))
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("--lr_warmup_steps 4 covers 100% of this 2-step run" in message for message in warnings)
    # Linear warmup from 0 to the peak 1e-3 over 4 steps: step 1 applies 0, step 2 applies 1e-3 / 4.
    records = read_jsonl(output_dir / "logs" / "train_tokenizer.jsonl")
    assert [record["lr"] for record in records] == pytest.approx([0.0, 2.5e-4], abs=1e-12)
