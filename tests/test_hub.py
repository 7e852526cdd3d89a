"""Hub folders: save, reload (with and without the package installed), Auto classes, standalone pixel decoder."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoImageProcessor, AutoModel

from dualtoken_hf import (
    DualTokenImageProcessor,
    DualTokenPixelDecoder,
    DualTokenVisionConfig,
    DualTokenVisionModel,
)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    torch.manual_seed(0)
    model = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).eval()
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    model.save_pretrained(folder)
    DualTokenImageProcessor.from_preset("tiny").save_pretrained(folder)
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
