"""Interrupted training loses nothing: atomic checkpoints, a real `kill -9` then resume, a full disk while saving,
non-finite losses, and one writer per output folder (training and `dualtoken export`)."""

import errno
import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import accelerate.checkpointing
import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from test_train_tokenizer import SCRIPT, tiny_args, train_tokenizer, write_photos

from dualtoken_hf import DualTokenVisionConfig, DualTokenVisionModel
from dualtoken_hf.cli import main as dualtoken
from dualtoken_hf.hub import save_tokenizer_folder
from dualtoken_hf.hub.export import export_folder
from dualtoken_hf.hub.locking import LOCK_FILE, FolderInUseError, FolderLock
from dualtoken_hf.training import (
    CheckpointSaveError,
    JSONLinesTracker,
    NonFiniteGuard,
    NonFiniteLossError,
    TrainingState,
    claim_output_dir,
    list_checkpoints,
    read_jsonl,
    resolve_checkpoint,
    save_checkpoint,
)


LOCKING_MODULE = Path(train_tokenizer.__file__).parents[1] / "dualtoken_hf" / "hub" / "locking.py"


def log_of(output_dir: Path) -> list[dict]:
    return read_jsonl(output_dir / "logs" / "train_tokenizer.jsonl")


def last_logged_step(output_dir: Path) -> int:
    records = log_of(output_dir) if (output_dir / "logs" / "train_tokenizer.jsonl").is_file() else []
    return records[-1]["step"] if records else 0


def complete_checkpoint(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    TrainingState(global_step=step).save(folder)
    return folder


# ------------------------------------------------------------------------------------------ checkpoint folders


def test_latest_skips_partial_and_unmarked_checkpoint_folders(tmp_path):
    complete_checkpoint(tmp_path / "checkpoint-2", 2)
    (tmp_path / "checkpoint-3").mkdir()  # no training_state.json: its save never finished
    complete_checkpoint(tmp_path / "checkpoint-4.tmp-123", 4)  # finished writing but never renamed
    assert [folder.name for folder in list_checkpoints(tmp_path)] == ["checkpoint-2"]
    assert resolve_checkpoint(tmp_path, "latest") == tmp_path / "checkpoint-2"


def test_claiming_an_output_folder_locks_it_and_removes_partial_checkpoints(tmp_path):
    complete_checkpoint(tmp_path / "checkpoint-2", 2)
    complete_checkpoint(tmp_path / "checkpoint-4.tmp-123", 4)
    accelerator = Accelerator()
    lock = claim_output_dir(accelerator, tmp_path)
    try:
        assert sorted(path.name for path in tmp_path.iterdir()) == [LOCK_FILE, "checkpoint-2"]
        with pytest.raises(FolderInUseError, match=f"pid {os.getpid()}"):
            claim_output_dir(accelerator, tmp_path)
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_saving_a_step_again_replaces_its_checkpoint_whole(tmp_path):
    # As a run resumed from an earlier checkpoint does when it reaches the step of a later one.
    accelerator = Accelerator()
    save_checkpoint(accelerator, tmp_path, TrainingState(global_step=3, epoch=0))
    (tmp_path / "checkpoint-3" / "stale.txt").write_text("from the first save")
    path = save_checkpoint(accelerator, tmp_path, TrainingState(global_step=3, epoch=1))
    assert path == tmp_path / "checkpoint-3"
    assert TrainingState.load(path).epoch == 1 and not (path / "stale.txt").exists()
    assert sorted(folder.name for folder in tmp_path.iterdir()) == ["checkpoint-3"]


def test_jsonl_truncate_keeps_the_steps_up_to_the_checkpoint_and_drops_a_cut_off_line(tmp_path):
    tracker = JSONLinesTracker("run", tmp_path)
    for step in range(1, 5):
        tracker.log({"loss": float(step)}, step=step)
    with tracker.path.open("a") as handle:
        handle.write('{"step": 5, "lo')  # a write cut off by SIGKILL
    assert [record["step"] for record in read_jsonl(tracker.path)] == [1, 2, 3, 4]
    tracker.truncate(2)
    assert read_jsonl(tracker.path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    tracker.log({"loss": 3.5}, step=3)
    assert [record["loss"] for record in read_jsonl(tracker.path)] == [1.0, 2.0, 3.5]


# ----------------------------------------------------------------------------------------- crashes and disks


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_and_logs_what_an_uninterrupted_run_logs(tmp_path):
    data_dir = write_photos(tmp_path / "photos", 6)
    common = ("--train_batch_size", "2", "--max_train_steps", "6", "--checkpointing_steps", "2",
              "--validation_steps", "100")
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    train_tokenizer.main(train_tokenizer.parse_args(tiny_args(data_dir, uninterrupted, *common)))

    # One thread, as in this process (conftest), so both runs compute bit for bit the same.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with (tmp_path / "killed.log").open("w") as output:
        run = subprocess.Popen([sys.executable, str(SCRIPT), *tiny_args(data_dir, killed, *common)], stdout=output,
                               stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 150
        # After the first checkpoint, once a later step is logged: the run is in the middle of the next one.
        while not ((killed / "checkpoint-2").is_dir() and last_logged_step(killed) >= 3):
            assert run.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach step 3"
            time.sleep(0.02)
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == -signal.SIGKILL
    assert not (killed / "train_summary.json").exists()
    checkpoint = resolve_checkpoint(killed, "latest")
    resumed_step = TrainingState.load(checkpoint).global_step
    lost = [record["step"] for record in log_of(killed) if record["step"] > resumed_step]
    assert lost  # steps after the checkpoint were logged, then lost with the process

    train_tokenizer.main(train_tokenizer.parse_args(
        tiny_args(data_dir, killed, *common, "--resume_from_checkpoint", "latest")
    ))
    actual, expected = log_of(killed), log_of(uninterrupted)
    assert [record["step"] for record in actual] == [1, 2, 3, 4, 5, 6]
    assert actual[resumed_step:] == expected[resumed_step:]
    assert actual == expected  # the steps before the kill too: the file reads as the uninterrupted run's
    assert not list(killed.glob("checkpoint-*.tmp-*"))


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    data_dir = write_photos(tmp_path / "photos", 4)
    output_dir = tmp_path / "out"
    args = tiny_args(data_dir, output_dir, "--train_batch_size", "2", "--max_train_steps", "2",
                     "--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--validation_steps", "100")
    save = accelerate.checkpointing.save

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        if "checkpoint-2" in str(path) and "optimizer" in str(path):  # after the model weights were written
            Path(path).write_bytes(b"half an optimiser")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return save(obj, path, *args, **kwargs)

    monkeypatch.setattr(accelerate.checkpointing, "save", save_until_the_disk_is_full)
    with pytest.raises(CheckpointSaveError, match=r"could not save checkpoint-2 .*No space left on device.* "
                                                  r"newest complete checkpoint is checkpoint-1\. Free disk space"):
        train_tokenizer.main(train_tokenizer.parse_args(args))
    assert sorted(path.name for path in output_dir.glob("checkpoint*")) == ["checkpoint-1"]

    monkeypatch.undo()
    # checkpoint-1 loads, and the failed run released the folder.
    summary = train_tokenizer.main(train_tokenizer.parse_args([*args, "--resume_from_checkpoint", "latest"]))
    assert summary["global_step"] == 2
    assert [record["step"] for record in log_of(output_dir)] == [1, 2]
    assert sorted(path.name for path in output_dir.glob("checkpoint*")) == ["checkpoint-2"]


# ----------------------------------------------------------------------------------------- non-finite losses


def poison_losses(monkeypatch, forwards):
    """Make the tokenizer's total loss NaN in the given training forwards (counted from 1)."""
    losses = train_tokenizer.tokenizer_losses
    count = itertools.count(1)

    def poisoned(*args, **kwargs):
        terms = losses(*args, **kwargs)
        if next(count) in forwards:
            terms["total"] = terms["total"] * math.nan
        return terms

    monkeypatch.setattr(train_tokenizer, "tokenizer_losses", poisoned)


def test_a_nonfinite_loss_skips_the_step_and_leaves_weights_codebooks_and_discriminator_as_they_were(
    tmp_path, monkeypatch
):
    poison_losses(monkeypatch, {2})
    data_dir = write_photos(tmp_path / "photos", 4)
    output_dir = tmp_path / "out"
    summary = train_tokenizer.main(train_tokenizer.parse_args(tiny_args(
        data_dir, output_dir, "--train_batch_size", "2", "--max_train_steps", "3", "--checkpointing_steps", "1",
        "--validation_steps", "100",
    )))
    records = log_of(output_dir)
    assert [record["train/nonfinite_steps"] for record in records] == [0, 1, 1]
    assert math.isnan(records[1]["loss/total"]) and math.isfinite(records[2]["loss/total"])
    assert summary["nonfinite_steps"] == 1
    before, after = output_dir / "checkpoint-1", output_dir / "checkpoint-2"
    # The model's state holds the codebooks and their EMA: the forward of step 2 moved them, the skip put them back.
    weights_before, weights_after = load_file(before / "model.safetensors"), load_file(after / "model.safetensors")
    assert weights_before.keys() == weights_after.keys()
    assert all(torch.equal(weights_before[name], weights_after[name]) for name in weights_before)
    assert any("embed_ema" in name for name in weights_before)
    # The discriminator (GAN on from step 1): weights and BatchNorm statistics.
    discriminator_before = torch.load(before / "custom_checkpoint_0.pkl", weights_only=True)
    discriminator_after = torch.load(after / "custom_checkpoint_0.pkl", weights_only=True)
    assert all(torch.equal(discriminator_before[name], discriminator_after[name]) for name in discriminator_before)
    final = DualTokenVisionModel.from_pretrained(output_dir)
    assert all(torch.isfinite(tensor).all() for tensor in final.state_dict().values())
    assert not torch.equal(final.pixel_quantizer.embed_ema, weights_after["pixel_quantizer.embed_ema"])  # step 3 ran


def test_consecutive_nonfinite_losses_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    poison_losses(monkeypatch, range(2, 100))
    data_dir = write_photos(tmp_path / "photos", 4)
    output_dir = tmp_path / "out"
    with pytest.raises(NonFiniteLossError, match=r"^3 optimiser steps in a row had a non-finite loss \(the last at "
                                                 r"step 4\); stopping, as --max_consecutive_nonfinite 3 asks"):
        train_tokenizer.main(train_tokenizer.parse_args(tiny_args(
            data_dir, output_dir, "--train_batch_size", "2", "--max_train_steps", "10",
            "--max_consecutive_nonfinite", "3", "--checkpointing_steps", "100", "--validation_steps", "100",
        )))
    assert [record["train/nonfinite_steps"] for record in log_of(output_dir)] == [0, 1, 2]
    assert not (output_dir / "train_summary.json").exists()


def test_the_count_of_nonfinite_steps_in_a_row_restarts_after_a_finite_one():
    accelerator = Accelerator()
    codebook = torch.nn.Module()
    codebook.values = torch.nn.Buffer(torch.zeros(3))
    guard = NonFiniteGuard([codebook], max_consecutive=3)
    state = TrainingState()
    skipped = []
    for loss in [math.nan, math.inf, 1.0, math.nan, math.nan]:
        guard.before_forward()
        codebook.values += 1  # the forward's EMA update
        guard.observe(torch.tensor(loss))
        state.global_step += 1
        skipped.append(guard.skip_step(accelerator, state))
    assert skipped == [True, True, False, True, True]
    assert state.nonfinite_steps == 4 and guard.consecutive == 2
    assert codebook.values.tolist() == [1.0, 1.0, 1.0]  # only the finite step's update stayed
    guard.before_forward()
    guard.observe(torch.tensor(math.nan))
    with pytest.raises(NonFiniteLossError, match="3 optimiser steps in a row"):
        guard.skip_step(accelerator, state)


# ------------------------------------------------------------------------------------ one writer per folder


def test_a_second_lock_on_a_folder_fails_naming_the_folder_and_the_holder(tmp_path):
    with FolderLock(tmp_path / "out"):
        with pytest.raises(FolderInUseError, match=rf"'{tmp_path / 'out'}' is in use by another process "
                                                   rf"\(pid {os.getpid()}, which holds {LOCK_FILE}\)"):
            FolderLock(tmp_path / "out")
    assert not (tmp_path / "out" / LOCK_FILE).exists()
    FolderLock(tmp_path / "out").release()  # free again


def test_a_lock_held_by_another_process_blocks_until_that_process_dies(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import importlib.util, sys, time\n"
         f"spec = importlib.util.spec_from_file_location('locking', {str(LOCKING_MODULE)!r})\n"
         "locking = importlib.util.module_from_spec(spec); spec.loader.exec_module(locking)\n"
         "lock = locking.FolderLock(sys.argv[1]); print('locked', flush=True); time.sleep(120)",
         str(tmp_path)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError, match=f"pid {holder.pid}"):
            FolderLock(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    FolderLock(tmp_path).release()  # the system released the dead holder's lock; its stale lock file is reused


def test_a_training_run_into_a_folder_in_use_fails_before_writing_checkpoints(tmp_path):
    data_dir = write_photos(tmp_path / "photos", 4)
    output_dir = tmp_path / "out"
    with FolderLock(output_dir):
        with pytest.raises(FolderInUseError, match=rf"'{output_dir}' is in use by another process \(pid {os.getpid()}"):
            train_tokenizer.main(train_tokenizer.parse_args(tiny_args(
                data_dir, output_dir, "--train_batch_size", "2", "--max_train_steps", "1",
            )))
    assert not list(output_dir.glob("checkpoint*")) and not (output_dir / "config.json").exists()


def test_an_export_into_a_folder_in_use_fails_with_one_line(tmp_path, capsys):
    model_dir = tmp_path / "tokenizer"
    save_tokenizer_folder(DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")), model_dir)
    output_dir = tmp_path / "export"
    capsys.readouterr()
    with FolderLock(output_dir):
        with pytest.raises(FolderInUseError, match=rf"'{output_dir}' is in use by another process"):
            export_folder(model_dir, output_dir)
        assert dualtoken(["export", str(model_dir), str(output_dir)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"dualtoken export: error: '{output_dir}' is in use by another process (pid {os.getpid()}")
    assert sorted(path.name for path in output_dir.iterdir()) == []
