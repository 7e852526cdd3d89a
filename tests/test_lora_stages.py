"""The LLM trained through a LoRA adapter across the unified stages (`examples/train_unified.py --lora_rank`), and
folders that hold only the trained parts, completed with their base LLM at load time."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from dualtoken_hf import DualTokenConfig, DualTokenVisionConfig, DualTokenVisionModel
from dualtoken_hf.hub.assemble import assemble_unified
from dualtoken_hf.hub.folders import load_processor, load_unified
from dualtoken_hf.hub.writing import save_tokenizer_folder, save_unified_folder
from dualtoken_hf.modeling_dualtoken import EXTRA_EMBEDDINGS_KEY, LANGUAGE_MODEL_ADAPTER
from dualtoken_hf.testing import build_tiny_text_tokenizer

from test_train_unified import run, train_unified


BASE_VOCAB_SIZE = 509  # the tiny tokenizer's image tokens (509..511) are new to the base LLM
INPUT_IDS = torch.tensor([[3, 40, 200, 7, 510, 511, 99, 507, 12]])  # 510, 511: begin/end of image


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / LANGUAGE_MODEL_ADAPTER / "adapter_model.safetensors")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=INPUT_IDS).logits


def peft_merged(folder: Path):
    """The model of a folder with an LLM adapter, merged by PEFT itself (the reference of the hand-written merge)."""
    base = load_unified(folder, merge_adapter=False)
    return PeftModel.from_pretrained(base, folder / LANGUAGE_MODEL_ADAPTER).merge_and_unload()


@pytest.fixture(scope="module")
def understood(tmp_path_factory, unified_dir, pairs_file) -> Path:  # noqa: F811
    """`understand` with a rank-4 LoRA adapter on the LLM."""
    output_dir = tmp_path_factory.mktemp("understand") / "out"
    summary = run("understand", unified_dir, pairs_file, output_dir, "--lora_rank", "4", "--learning_rate", "1e-2")
    assert summary["global_step"] == 2
    return output_dir


def test_a_lora_stage_trains_the_adapter_and_the_stages_other_groups_only(unified_dir, understood):  # noqa: F811
    before = load_unified(unified_dir).state_dict()
    after = load_unified(understood, merge_adapter=False).state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.startswith("image_projector.")}
    config = json.loads((understood / LANGUAGE_MODEL_ADAPTER / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.0)
    weights = adapter_weights(understood)
    # 2 layers x 7 linear layers (q, k, v, o, gate, up, down), each an A and a B; B starts at zero and trained
    assert len(weights) == 28 and all(name.startswith("base_model.model.language_model.layers.") for name in weights)
    assert all(value.abs().max() > 0 for name, value in weights.items() if ".lora_B." in name)
    trained = json.loads((understood / "train_summary.json").read_text())["trained_parameters"]
    assert sum(".lora_" in name for name in trained) == 28
    assert {name for name in trained if ".lora_" not in name} == {n for n in before if n.startswith("image_projector.")}


def test_a_lora_folder_loads_with_the_adapter_merged(understood):
    expected = logits(peft_merged(understood))
    torch.testing.assert_close(logits(load_unified(understood)), expected, rtol=0, atol=1e-5)
    remote = AutoModel.from_pretrained(understood, trust_remote_code=True)
    torch.testing.assert_close(logits(remote), expected, rtol=0, atol=1e-5)
    assert (logits(load_unified(understood, merge_adapter=False)) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("stage", ["generate", "joint"])
def test_a_following_stage_continues_the_saved_adapter(tmp_path, understood, pairs_file, monkeypatch,  # noqa: F811
                                                       stage):
    started = []
    train = train_unified.PairsTrainer.train

    def recording_train(self, model, *args, **kwargs):
        started.append({name.replace(".default.", "."): parameter.detach().clone()
                        for name, parameter in model.named_parameters() if ".lora_" in name})
        return train(self, model, *args, **kwargs)

    monkeypatch.setattr(train_unified.PairsTrainer, "train", recording_train)
    run(stage, understood, pairs_file, tmp_path / "out", "--total_batch_size", "4", "--learning_rate", "1e-2")
    saved, continued = adapter_weights(understood), adapter_weights(tmp_path / "out")
    assert started[0].keys() == saved.keys()
    for name, value in saved.items():
        assert torch.equal(started[0][name], value), name
    adapter_changed = any(not torch.equal(continued[name], value) for name, value in saved.items())
    assert adapter_changed == (stage == "joint")  # `generate` keeps the LLM, and so its adapter, frozen
    before = load_unified(understood, merge_adapter=False).state_dict()
    after = load_unified(tmp_path / "out", merge_adapter=False).state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before if name.startswith("language_model."))
    assert any(not torch.equal(after[name], before[name]) for name in before if name.startswith("pixel_head."))


def test_lora_arguments_are_checked(tmp_path, understood, pairs_file):  # noqa: F811
    for stage, extra in [("generate", ("--lora_rank", "4")), ("understand", ("--lora_alpha", "8"))]:
        with pytest.raises(SystemExit):
            train_unified.parse_args(["--stage", stage, "--model_name_or_path", str(understood), "--data_files",
                                      str(pairs_file), "--output_dir", str(tmp_path / "out"), *extra])
    with pytest.raises(ValueError, match="adapter of rank 4"):
        run("understand", understood, pairs_file, tmp_path / "out", "--lora_rank", "8")


# ------------------------------------------------------------------------------------ folders of trained parts only


@pytest.fixture(scope="module")
def parts(tmp_path_factory, pairs_file) -> dict[str, Path]:  # noqa: F811
    """A tiny base LLM (a safetensors folder, 509 token embeddings), a unified model assembled on it saved complete
    and as trained parts only, and the trained-parts folder after `understand` with a LoRA adapter."""
    folder = tmp_path_factory.mktemp("parts")
    build_tiny_text_tokenizer(folder / "llm")
    text_config = DualTokenConfig.from_preset("tiny").text_config
    text_config.vocab_size, text_config.intermediate_size = BASE_VOCAB_SIZE, 1024
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(text_config).save_pretrained(folder / "llm")
    torch.manual_seed(0)
    model, processor = assemble_unified(DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")),
                                        folder / "llm", "tiny")
    save_unified_folder(model, processor, folder / "complete")
    save_unified_folder(model, processor, folder / "assembled",
                        base_language_model={"name_or_path": str(folder / "llm")})
    run("understand", folder / "assembled", pairs_file, folder / "understood", "--lora_rank", "4",
        "--learning_rate", "1e-2")
    return {name: folder / name for name in ("llm", "complete", "assembled", "understood")}


def completed_by_hand(parts: dict[str, Path]):
    """The complete model the `understood` folder stands for: the complete assembled model, with the trained parts
    of `understood` and its adapter merged by PEFT."""
    model = load_unified(parts["complete"])
    trained = load_file(parts["understood"] / "model.safetensors")
    trained.pop(EXTRA_EMBEDDINGS_KEY)
    assert not model.load_state_dict(trained, strict=False).unexpected_keys
    return PeftModel.from_pretrained(model, parts["understood"] / LANGUAGE_MODEL_ADAPTER).merge_and_unload()


def test_a_trained_parts_folder_holds_no_base_llm_tensors(parts):
    complete = load_unified(parts["complete"])
    llm_bytes = sum(value.nbytes for name, value in complete.state_dict().items() if name.startswith("language_model."))
    for name in ("assembled", "understood"):
        with safe_open(parts[name] / "model.safetensors", "pt") as weights:
            keys = set(weights.keys())
            extra = weights.get_tensor(EXTRA_EMBEDDINGS_KEY)
        assert not any(key.startswith(("language_model.", "lm_head.")) for key in keys), name
        assert torch.equal(extra, complete.get_input_embeddings().weight[BASE_VOCAB_SIZE:].detach())
        size = os.path.getsize(parts[name] / "model.safetensors")
        assert size < os.path.getsize(parts["complete"] / "model.safetensors") - 0.95 * llm_bytes, name
        config = json.loads((parts[name] / "config.json").read_text())["base_language_model"]
        assert config == {"name_or_path": str(parts["llm"]), "vocab_size": BASE_VOCAB_SIZE}


def test_a_trained_parts_folder_loads_to_the_complete_model(parts):
    torch.testing.assert_close(logits(load_unified(parts["assembled"])), logits(load_unified(parts["complete"])),
                               rtol=0, atol=0)
    expected = completed_by_hand(parts)
    loaded = load_unified(parts["understood"])
    assert loaded.config.base_language_model is None  # complete in memory: save_pretrained writes it all
    torch.testing.assert_close(logits(loaded), logits(expected), rtol=0, atol=1e-5)
    remote = AutoModel.from_pretrained(parts["understood"], trust_remote_code=True)
    torch.testing.assert_close(logits(remote), logits(expected), rtol=0, atol=1e-5)


def test_a_stage_assembled_from_an_llm_saves_its_trained_parts_only(parts, pairs_file, tmp_path):  # noqa: F811
    save_tokenizer_folder(DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")), tmp_path / "tokenizer")
    run("align", None, pairs_file, tmp_path / "out", "--llm_model_name_or_path", str(parts["llm"]),
        "--tokenizer_model_name_or_path", str(tmp_path / "tokenizer"), "--preset", "tiny", "--trained_parts_only")
    config = json.loads((tmp_path / "out" / "config.json").read_text())["base_language_model"]
    assert config == {"name_or_path": str(parts["llm"]), "gguf_file": None, "vocab_size": BASE_VOCAB_SIZE}
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as weights:
        assert not any(key.startswith(("language_model.", "lm_head.")) for key in weights.keys())
    loaded = load_unified(tmp_path / "out").language_model.state_dict()
    for name, value in AutoModelForCausalLM.from_pretrained(parts["llm"]).model.state_dict().items():
        assert torch.equal(loaded[name][: len(value)], value), name


@pytest.fixture
def moved_base(parts, tmp_path) -> Path:
    """The `understood` folder whose base LLM is no longer where its config says."""
    folder = Path(shutil.copytree(parts["understood"], tmp_path / "understood"))
    config = json.loads((folder / "config.json").read_text())
    config["base_language_model"]["name_or_path"] = str(tmp_path / "moved-llm")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_trained_parts_folder_takes_its_base_llm_from_the_given_path(parts, moved_base):
    with pytest.raises(OSError, match="cannot load the base LLM .*moved-llm.*base_language_model_path"):
        load_unified(moved_base)
    processor = load_processor(moved_base)
    inputs = processor(text=["a red fox"], generation_mode="image", return_tensors="pt")
    codes = []
    for model in (completed_by_hand(parts),
                  AutoModel.from_pretrained(moved_base, trust_remote_code=True, base_language_model_path=parts["llm"])):
        torch.testing.assert_close(logits(model), logits(completed_by_hand(parts)), rtol=0, atol=1e-5)
        codes.append(model.generate(**inputs, generation_mode="image", generator=torch.Generator().manual_seed(0)))
    assert torch.equal(codes[0], codes[1])


@pytest.mark.slow
def test_a_trained_parts_folder_generates_without_the_package(parts, moved_base, tmp_path):
    model = AutoModel.from_pretrained(moved_base, base_language_model_path=parts["llm"]).eval()
    inputs = load_processor(moved_base)(text=["a red fox"], generation_mode="image", return_tensors="pt")
    expected = model.generate(**inputs, generation_mode="image", generator=torch.Generator().manual_seed(0))
    torch.save(expected, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["dualtoken_hf"] = None  # as where the package is not installed
        from transformers import AutoModel, AutoProcessor
        model = AutoModel.from_pretrained({str(moved_base)!r}, trust_remote_code=True,
                                          base_language_model_path={str(parts["llm"])!r}).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        processor = AutoProcessor.from_pretrained({str(moved_base)!r}, trust_remote_code=True)
        inputs = processor(text=["a red fox"], generation_mode="image", return_tensors="pt")
        codes = model.generate(**inputs, generation_mode="image", generator=torch.Generator().manual_seed(0))
        assert torch.equal(codes, torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True))
        images = processor.postprocess(model.decode_image_tokens(codes))
        assert images[0].size == (64, 64)
        print("REMOTE-OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert "REMOTE-OK" in result.stdout, result.stderr[-4000:]
