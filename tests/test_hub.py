"""Tokenizer Hub folders: the folder writer, reload (with and without the package installed), Auto classes, the
standalone pixel decoder, and the model card templates."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from dualtoken_hf import (
    DualTokenImageProcessor,
    DualTokenPixelDecoder,
    DualTokenVisionConfig,
    DualTokenVisionModel,
)
from dualtoken_hf.hub import CardDetails, cards, save_tokenizer_folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).eval()
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    card = CardDetails(origin="Random weights for the tests.", facts={"seed": 0, "epoch": None}, repo_id="me/tiny")
    save_tokenizer_folder(model, folder, card=card)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    torch.save(images, folder / "images.pt")
    with torch.no_grad():
        encoded = model.encode(images)
        decoded = model.decode(encoded.pixel_codes)
    return folder, model, images, encoded, decoded


def test_saved_folder_is_self_contained_remote_code(tiny_folder):
    folder = tiny_folder[0]
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_dualtoken_vision.DualTokenVisionModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_dualtoken.DualTokenVisionConfig"
    for module in (
        "configuration_dualtoken.py",
        "modeling_dualtoken_vision.py",
        "modeling_dualtoken_decoder.py",
        "modeling_dualtoken_projection.py",
        "quantization_dualtoken.py",
        "image_processing_dualtoken.py",
    ):
        assert (folder / module).is_file(), module
    assert (folder / "model.safetensors").is_file()


def test_reload_gives_identical_codes_and_images(tiny_folder):
    folder, _, images, encoded, decoded = tiny_folder
    reloaded = DualTokenVisionModel.from_pretrained(folder).eval()
    with torch.no_grad():
        again = reloaded.encode(images)
        assert torch.equal(again.pixel_codes, encoded.pixel_codes)
        assert torch.equal(again.semantic_codes, encoded.semantic_codes)
        assert torch.equal(reloaded.decode(again.pixel_codes), decoded)


def test_auto_classes_resolve_to_package_classes_without_remote_code(tiny_folder):
    folder = tiny_folder[0]
    assert isinstance(AutoConfig.from_pretrained(folder), DualTokenVisionConfig)
    assert isinstance(AutoModel.from_pretrained(folder), DualTokenVisionModel)
    assert isinstance(AutoImageProcessor.from_pretrained(folder), DualTokenImageProcessor)


@pytest.mark.slow
def test_remote_code_loads_without_the_package(tiny_folder, tmp_path):
    folder, _, _, encoded, decoded = tiny_folder
    torch.save({"pixel_codes": encoded.pixel_codes, "semantic_codes": encoded.semantic_codes, "decoded": decoded},
               tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["dualtoken_hf"] = None  # makes `import dualtoken_hf` fail, as where it is not installed
        try:
            import dualtoken_hf
            raise SystemExit("the package must not be importable here")
        except ImportError:
            pass
        from transformers import AutoImageProcessor, AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        processor = AutoImageProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        images = torch.load({str(folder / "images.pt")!r}, weights_only=True)
        with torch.no_grad():
            encoded = model.encode(images)
            assert torch.equal(encoded.pixel_codes, expected["pixel_codes"])
            assert torch.equal(encoded.semantic_codes, expected["semantic_codes"])
            assert torch.equal(model.decode(encoded.pixel_codes), expected["decoded"])
        assert processor.crop_size["height"] == 64, processor.crop_size
        print("REMOTE-OK")
        """
    )
    env = dict(os.environ)
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300,
    )
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]


def test_pixel_decoder_saves_and_loads_as_a_diffusers_subfolder(tiny_folder, tmp_path):
    _, model, _, encoded, decoded = tiny_folder
    model.pixel_decoder.save_pretrained(tmp_path / "pixel_decoder")
    decoder = DualTokenPixelDecoder.from_pretrained(tmp_path, subfolder="pixel_decoder").eval()
    with torch.no_grad():
        images = decoder(model.embed_codes(encoded.pixel_codes)).sample
    assert torch.equal(images, decoded)


def test_writer_gives_a_folder_whose_remote_code_and_image_processor_reproduce_the_codes(tiny_folder):
    folder, _, _, encoded, _ = tiny_folder
    photo = Image.new("RGB", (96, 80), (200, 30, 60))
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    pixel_values = image_processor(photo, return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 64, 64)
    reference = DualTokenImageProcessor.from_preset("tiny")(photo, return_tensors="pt").pixel_values
    assert torch.equal(pixel_values, reference)
    images = torch.load(folder / "images.pt", weights_only=True)
    with torch.no_grad():
        again = model.encode(images)
    assert torch.equal(again.pixel_codes, encoded.pixel_codes)
    assert torch.equal(again.semantic_codes, encoded.semantic_codes)


def test_writer_refuses_an_image_processor_of_another_size(tmp_path):
    model = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny"))
    with pytest.raises(ValueError, match="crops to 384x384 but the tokenizer reads 64x64"):
        save_tokenizer_folder(model, tmp_path, DualTokenImageProcessor.from_preset("paper"))
    assert not (tmp_path / "config.json").exists()


def test_tokenizer_card_is_filled_from_the_config_and_the_details(tiny_folder):
    card = ModelCard.load(tiny_folder[0] / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-feature-extraction"
    assert card.data.license == "apache-2.0" and "vision-tokenizer" in card.data.tags
    text = " ".join(card.text.split())
    assert "tokenizer (`dualtoken_vision`)" in text and "Random weights for the tests." in text
    # the tiny preset: layers 2 and 5, 64 px, 8x8 positions, 4 codes from 256 per branch
    assert "whose layer 2 feeds a **pixel**" in text and "whose layer 5 feeds a **semantic**" in text
    assert "A 64x64 image becomes 8x8 positions, each with 4 pixel codes (vocabulary 256) and 4 semantic codes" in text
    assert 'AutoModel.from_pretrained("me/tiny"' in text
    assert "- **seed**: 0" in card.text and "epoch" not in card.text
    assert not re.search(r"{{|{%", card.content)


def test_card_usage_snippet_runs_on_the_folder(tiny_folder, tmp_path, monkeypatch):
    folder = tiny_folder[0]
    code = ModelCard.load(folder / "README.md").text.split("```python\n")[1].split("```")[0]
    Image.new("RGB", (80, 64), (10, 120, 240)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    exec(code.replace('"me/tiny"', repr(str(folder))), {})
    assert Image.open(tmp_path / "reconstruction.png").size == (64, 64)


def test_card_templates_come_from_the_top_level_model_cards_folder():
    repository_templates = Path(__file__).resolve().parents[1] / "model_cards"
    for name in (cards.TOKENIZER_TEMPLATE, cards.UNIFIED_TEMPLATE, cards.LORA_TEMPLATE):
        assert cards.template_path(name) == repository_templates / name


def test_installed_card_templates_are_found_under_the_prefix(tmp_path, monkeypatch):
    installed = tmp_path / "share" / "dualtoken_hf" / "model_cards"
    installed.mkdir(parents=True)
    (installed / "tokenizer.md").write_text("---\n{{ card_data }}\n---\nInstalled template for {{ repo_id }}\n")
    monkeypatch.setattr(cards, "TEMPLATE_DIRS", (tmp_path / "checkout" / "model_cards", installed))
    model = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny"))
    card = cards.write_tokenizer_card(tmp_path, model.config, CardDetails(repo_id="me/tiny"))
    assert card.text.strip() == "Installed template for me/tiny"
    with pytest.raises(FileNotFoundError, match="'unified.md' not found; searched .*checkout"):
        cards.template_path("unified.md")
