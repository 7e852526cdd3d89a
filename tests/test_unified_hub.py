"""The unified model's Hub folder: remote code, Auto classes, pipelines, device_map loading, model card, PEFT LoRA
and the LoRA adapter's card."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline

from dualtoken_hf import DualTokenForConditionalGeneration, DualTokenProcessor
from dualtoken_hf.hub import CardDetails
from dualtoken_hf.hub.cards import write_lora_card
from dualtoken_hf.testing import build_tiny_unified


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_tiny_unified(tmp_path_factory.mktemp("tiny_unified"))


@pytest.fixture(scope="module")
def photo():
    from skimage import data

    return Image.fromarray(data.chelsea())


def test_folder_is_hub_ready(folder):
    config = json.loads(open(os.path.join(folder, "config.json")).read())
    auto_map = config["auto_map"]
    for auto_class in ("AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText",
                       "AutoModelForMultimodalLM"):
        assert auto_class in auto_map, auto_class
    assert set(config["custom_pipelines"]) == {"text-to-image", "any-to-any"}
    processor_config = json.loads(open(os.path.join(folder, "processor_config.json")).read())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_dualtoken.DualTokenProcessor"
    generation = json.loads(open(os.path.join(folder, "generation_config.json")).read())
    assert generation["guidance_scale"] == 3.0
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))  # sharded
    assert os.path.isfile(os.path.join(folder, "pipeline_dualtoken.py"))


def test_unified_card_is_filled_from_the_config_and_its_usage_snippet_runs(folder, photo, tmp_path, monkeypatch):
    card = ModelCard.load(os.path.join(folder, "README.md"))
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "any-to-any"
    assert {"text-to-image", "image-text-to-text"} <= set(card.data.tags)
    text = " ".join(card.text.split())
    assert "build_tiny_unified" in text
    # the tiny preset: a 2-layer qwen2 of width 64 and the tiny tokenizer (64 px, 8x8 positions, 4 codes from 256)
    assert "model (`dualtoken`): a `qwen2` language model (2 layers, width 64)" in text
    assert "A 64x64 image becomes 8x8 positions, each with 4 pixel codes (vocabulary 256) and 4 semantic codes" in text
    assert f'pipeline("text-to-image", model="{os.path.basename(folder)}"' in text

    code = card.text.split("```python\n")[1].split("```")[0]
    photo.save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(code.replace(f'"{os.path.basename(folder)}"', repr(str(folder))), {})
    assert Image.open(tmp_path / "fox.png").size == (64, 64)


def test_auto_classes_work_without_remote_code_when_the_package_is_imported(folder):
    for auto_class in (AutoModel, AutoModelForCausalLM, AutoModelForImageTextToText):
        assert isinstance(auto_class.from_pretrained(folder), DualTokenForConditionalGeneration)
    assert isinstance(AutoProcessor.from_pretrained(folder), DualTokenProcessor)


def test_from_pretrained_returns_the_loading_info_when_asked(folder):
    model, info = DualTokenForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert isinstance(model, DualTokenForConditionalGeneration)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()


def test_text_to_image_pipeline_returns_images_and_is_seeded(folder):
    pipe = pipeline("text-to-image", model=folder, trust_remote_code=True)
    first = pipe("a red fox", guidance_scale=3.0, seed=0, num_images_per_prompt=2)
    again = pipe("a red fox", guidance_scale=3.0, seed=0, num_images_per_prompt=2)
    assert [record["input_text"] for record in first] == ["a red fox"] * 2
    assert all(record["generated_image"].size == (64, 64) for record in first)
    for a, b in zip(first, again):
        assert np.array_equal(np.asarray(a["generated_image"]), np.asarray(b["generated_image"]))


def test_text_to_image_pipeline_rejects_unknown_arguments(folder):
    pipe = pipeline("text-to-image", model=folder, trust_remote_code=True)
    with pytest.raises(TypeError, match="unexpected"):
        pipe("a red fox", guidance=3)
    with pytest.raises(ValueError, match="prompt"):
        pipe("")


def test_processor_prompts_generate_images_that_postprocess_to_pil(folder):
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    inputs = processor(text=["a red fox", "a cat"], generation_mode="image", return_tensors="pt")
    codes = model.generate(**inputs, generation_mode="image", generator=torch.Generator().manual_seed(0))
    images = processor.postprocess(model.decode_image_tokens(codes))
    assert len(images) == 2 and images[0].size == (64, 64) and images[0].mode == "RGB"


def test_understanding_generate_through_the_processor(folder, photo):
    model = AutoModel.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": "Describe"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    texts = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_device_map_auto_loading(folder):
    model = AutoModel.from_pretrained(folder, device_map="auto")
    assert {parameter.device.type for parameter in model.parameters()} == {"cpu"}


@pytest.mark.slow
def test_model_processor_and_three_pipelines_work_without_the_package(folder, tmp_path, photo):
    photo_path = tmp_path / "photo.png"
    photo.save(photo_path)
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["dualtoken_hf"] = None  # as where the package is not installed
        from PIL import Image
        from transformers import AutoModel, AutoProcessor, pipeline
        folder = {str(folder)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules")
        images = pipeline("text-to-image", model=folder, trust_remote_code=True)("a red fox", seed=0)
        assert images[0]["generated_image"].size == (64, 64)
        any_to_any = pipeline("any-to-any", model=folder, trust_remote_code=True)
        generated = any_to_any(text="a red fox", generation_mode="image")
        assert generated[0]["generated_image"].size == (64, 64)
        photo = Image.open({str(photo_path)!r})
        messages = [{{"role": "user", "content": [{{"type": "image", "image": photo}}, {{"type": "text", "text": "Hi"}}]}}]
        described = pipeline("image-text-to-text", model=folder, trust_remote_code=True)(
            text=messages, max_new_tokens=3
        )
        assert described[0]["generated_text"][-1]["role"] == "assistant"
        answered = any_to_any(text=messages, max_new_tokens=3)
        assert answered[0]["generated_text"][-1]["role"] == "assistant"
        print("REMOTE-OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert "REMOTE-OK" in result.stdout, result.stderr[-4000:]


def test_lora_adapter_saves_reloads_and_merges_to_the_same_outputs(folder, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    model = AutoModel.from_pretrained(folder).eval()
    lora = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        modules_to_save=["pixel_head", "semantic_head", "image_projector"],
        init_lora_weights=False,  # random adapters so the outputs really change
    )
    peft_model = get_peft_model(model, lora)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name and "language_model" in name for name in trainable)
    assert any("pixel_head" in name for name in trainable)
    assert not any("vision_tokenizer" in name for name in trainable)

    input_ids = torch.tensor([[11, 12, 13, 14, 15]])
    with torch.no_grad():
        base_logits = AutoModel.from_pretrained(folder)(input_ids=input_ids).logits
        adapted_logits = peft_model(input_ids=input_ids).logits
    assert not torch.allclose(base_logits, adapted_logits)

    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModel.from_pretrained(folder), tmp_path / "adapter").eval()
    merged = reloaded.merge_and_unload().eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=input_ids).logits, adapted_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=input_ids).logits, adapted_logits, rtol=1e-4, atol=1e-4)
    assert isinstance(merged, DualTokenForConditionalGeneration)


def test_lora_card_describes_the_adapter_and_its_usage_snippet_runs(folder, tmp_path, monkeypatch):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"],
                      modules_to_save=["pixel_head"], init_lora_weights=False)
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModel.from_pretrained(folder), lora).save_pretrained(adapter)
    details = CardDetails(origin="A test adapter.", facts={"steps": 3}, repo_id="me/adapter", base_model="org/tiny")
    card = write_lora_card(adapter, lora, details)

    assert ModelCard.load(adapter / "README.md").data.to_dict() == card.data.to_dict()
    assert card.data.library_name == "peft" and card.data.base_model == "org/tiny"
    assert {"lora", "peft", "dualtoken"} <= set(card.data.tags)
    text = " ".join(card.text.split())
    assert "model `org/tiny`: rank 4, alpha 8, dropout 0.05, on the modules matching `q_proj`, `v_proj`." in text
    assert "saved with the adapter: `pixel_head`." in text and "- **steps**: 3" in text
    with pytest.raises(ValueError, match="base_model"):
        write_lora_card(adapter, lora, CardDetails())

    code = card.text.split("```python\n")[1].split("```")[0]
    monkeypatch.chdir(tmp_path)
    exec(code.replace('"org/tiny"', repr(str(folder))).replace('"me/adapter"', repr(str(adapter))), {})
    assert Image.open(tmp_path / "fox.png").size == (64, 64)
