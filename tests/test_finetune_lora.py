"""examples/finetune_lora.py on a tiny random unified model: the adapter it saves reloads with
`PeftModel.from_pretrained` to the outputs of the model it trained, the base model is untouched, and the folder with
its card is pushed through huggingface_hub (a recording `HfApi` here, offline)."""

import json
import re
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import HfApi
from huggingface_hub.hf_api import future_compatible
from peft import PeftModel

from dualtoken_hf.hub.folders import load_processor, load_unified
from dualtoken_hf.testing import build_tiny_unified
from dualtoken_hf.training import hub
from dualtoken_hf.training.unified import SequenceBuilder, collate_sequences, lora_target_modules

from conftest import load_example


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "finetune_lora.py"


finetune_lora = load_example(SCRIPT)


class RecordingApi(HfApi):
    """A real `HfApi` (its background queue included) that records its Hub calls and the files it would upload."""

    def __init__(self):
        super().__init__(token="hf_test")
        self.calls = []

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    @future_compatible
    def upload_folder(self, *, repo_id, folder_path, path_in_repo=None, commit_message=None, ignore_patterns=None,
                      run_as_future=False):
        files = sorted(str(path.relative_to(folder_path)) for path in Path(folder_path).rglob("*") if path.is_file())
        self.calls.append(("upload_folder", repo_id, folder_path, files, ignore_patterns))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return Path(build_tiny_unified(tmp_path_factory.mktemp("unified")))


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    """Four striped images (a "style") with captions, as JSON Lines with image paths relative to the file."""
    folder = tmp_path_factory.mktemp("pairs")
    with open(folder / "pairs.jsonl", "w") as pairs:
        for index, caption in enumerate(["a striped fox", "a striped cat", "a striped cup", "a striped rocket"]):
            stripes = np.zeros((64, 64, 3), dtype=np.uint8)
            stripes[index::4] = (255, 40 * index, 0)
            PIL.Image.fromarray(stripes).save(folder / f"{index}.png")
            pairs.write(json.dumps({"image": f"{index}.png", "text": caption}) + "\n")
    return folder / "pairs.jsonl"


def script_args(base_dir: Path, pairs_file: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path", str(base_dir), "--data_files", str(pairs_file), "--output_dir", str(output_dir),
        "--cache_dir", str(output_dir.parent / "cache"), "--total_batch_size", "4", "--max_train_steps", "3",
        "--learning_rate", "1e-2", *extra,
    ]


@pytest.fixture(scope="module")
def run(tmp_path_factory, base_dir, pairs_file):
    """One LoRA run on both tasks with adapters on the heads too, pushed to a recording Hub API."""
    output_dir = tmp_path_factory.mktemp("lora") / "style-lora"
    base_weights = {name: value.clone() for name, value in load_unified(base_dir).state_dict().items()}
    api = RecordingApi()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub, "HfApi", lambda token=None: api)
        args = finetune_lora.parse_args(script_args(
            base_dir, pairs_file, output_dir, "--tasks", "generate", "caption", "--lora_heads",
            "--push_to_hub", "--hub_model_id", "me/style-lora",
        ))
        model, summary = finetune_lora.main(args)
    return {"model": model.eval(), "summary": summary, "output_dir": output_dir, "api": api,
            "base_weights": base_weights}


def batch(base_dir: Path) -> dict:
    """A text-to-image and a captioning sequence of one image, as the training data builds them."""
    processor = load_processor(base_dir)
    image = load_unified(base_dir).encode_images(processor.image_processor(
        PIL.Image.new("RGB", (64, 64), (200, 30, 30)), return_tensors="pt")["pixel_values"])
    builder = SequenceBuilder(processor)
    examples = [dict(zip(("input_ids", "labels"), builder.generate("a striped fox")), skipped_images=0),
                dict(zip(("input_ids", "labels"), builder.caption("a striped fox")), skipped_images=0)]
    inputs = collate_sequences(examples, processor.tokenizer.pad_token_id)
    inputs.pop("skipped_images")
    return {**inputs, "pixel_codes": image[0].repeat(2, 1, 1, 1), "semantic_codes": image[1].repeat(2, 1, 1, 1)}


@torch.no_grad()
def outputs(model, inputs: dict) -> dict[str, torch.Tensor]:
    result = model(**inputs)
    return {name: getattr(result, name) for name in ("logits", "loss", "text_loss", "pixel_loss", "semantic_loss")}


def test_the_saved_adapter_reloads_to_the_outputs_of_the_trained_model(run, base_dir):
    inputs = batch(base_dir)
    reloaded = PeftModel.from_pretrained(load_unified(base_dir), run["output_dir"]).eval()
    trained, again = outputs(run["model"], inputs), outputs(reloaded, inputs)
    for name in trained:
        torch.testing.assert_close(again[name], trained[name], rtol=0, atol=1e-6, msg=name)
    base = outputs(load_unified(base_dir).eval(), inputs)
    for name in ("logits", "pixel_loss", "text_loss"):
        assert not torch.allclose(base[name], trained[name]), f"the adapter left {name} unchanged"


def test_the_base_model_is_unchanged_and_only_adapters_trained(run, base_dir):
    after = load_unified(base_dir).state_dict()
    assert after.keys() == run["base_weights"].keys()
    for name, value in run["base_weights"].items():
        assert torch.equal(after[name], value), name
    adapted = run["model"]
    for name, parameter in adapted.named_parameters():
        if "lora_" in name:
            continue
        original = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(parameter, run["base_weights"][original]), name
    lora_names = [name for name, _ in adapted.named_parameters() if "lora_" in name]
    assert {name.split(".")[2] for name in lora_names} == {"language_model", "pixel_head", "semantic_head"}
    assert run["summary"]["global_step"] == 3 and run["summary"]["trained_parameters"] == sum(
        parameter.numel() for name, parameter in adapted.named_parameters() if "lora_" in name)


def test_the_adapter_folder_has_its_card_and_is_pushed(run, base_dir):
    output_dir = run["output_dir"]
    card = (output_dir / "README.md").read_text()
    assert "library_name: peft" in card and f"base_model: {base_dir}" in card
    assert 'PeftModel.from_pretrained(base, "me/style-lora")' in card
    create, upload = run["api"].calls
    assert create == ("create_repo", "me/style-lora", None, True)
    assert upload[:3] == ("upload_folder", "me/style-lora", str(output_dir))
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(upload[3])
    assert {"train_summary.json", "logs/**", "checkpoint-*", ".dualtoken.lock"} <= set(upload[4])


def test_lora_targets_every_linear_layer_of_the_llm_and_optionally_the_heads(base_dir):
    model = load_unified(base_dir)
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]

    def targeted(groups):
        pattern = lora_target_modules(model, groups)
        return {name for name in linear if re.fullmatch(pattern, name)}

    assert targeted(("language_model",)) == {name for name in linear if name.startswith("language_model.")}
    assert targeted(("language_model", "pixel_head", "semantic_head")) == {
        name for name in linear if name.startswith(("language_model.", "pixel_head.", "semantic_head."))}
    assert "lm_head" in linear and "image_projector.linear_1" in linear  # left out


def test_head_adapters_need_text_to_image_and_a_push_needs_a_repository(tmp_path, base_dir, pairs_file):
    for extra in (("--tasks", "caption", "--lora_heads"), ("--push_to_hub",)):
        with pytest.raises(SystemExit):
            finetune_lora.parse_args(script_args(base_dir, pairs_file, tmp_path / "out", *extra))
