"""The `dualtoken` command line: every subcommand on tiny models and real photos, and its error paths."""

import argparse
import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib.metadata import entry_points
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModel,
    AutoProcessor,
    AutoTokenizer,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipTextModel,
    SiglipVisionModel,
)

from conftest import REFERENCE_DIR
from dualtoken_hf import (
    DualTokenForConditionalGeneration,
    DualTokenImageProcessor,
    DualTokenVisionConfig,
    DualTokenVisionModel,
)
from dualtoken_hf.cli import SUBCOMMANDS, build_parser, main
from dualtoken_hf.cli.files import load_codes, save_codes
from dualtoken_hf.cli.fingerprint import tokenizer_fingerprint
from dualtoken_hf.convert import load_official_checkpoint, official_to_hf
from dualtoken_hf.convert.checkpoint import convert_official_checkpoint
from dualtoken_hf.hub import export as hub_export
from dualtoken_hf.hub.export import EXPORT_CHECK_FILE
from dualtoken_hf.testing import build_tiny_unified


# ---------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos from scikit-image as PNG and JPEG files, and a file that is not an image."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(data.chelsea()).save(folder / "chelsea.jpg", quality=95)
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


@pytest.fixture(scope="module")
def unified_folder(tmp_path_factory):
    return build_tiny_unified(tmp_path_factory.mktemp("unified"))


@pytest.fixture(scope="module")
def exported_tokenizer(tokenizer_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "tokenizer"
    assert main(["export", str(tokenizer_folder), str(output), "--pixel-decoder"]) == 0
    return output


def run_failing(capsys, argv: list[str], command: str, phrase: str) -> str:
    """Run `dualtoken argv`, expect exit status 2 and a one-line error containing `phrase`; return that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith(f"dualtoken {command}: error:")]
    assert len(errors) == 1, err
    assert phrase in errors[0], errors[0]
    return errors[0]


def processed(folder, *paths) -> torch.Tensor:
    image_processor = DualTokenImageProcessor.from_pretrained(folder)
    return image_processor([Image.open(path) for path in paths], return_tensors="pt").pixel_values


# ------------------------------------------------------------------------------------------ convert-official


def write_official_checkpoint(path, state: dict, ddp: bool = False, **entries) -> None:
    """An `epoch_N.pt`-style training checkpoint around an official state dict."""
    state_dict = {("module." if ddp else "") + key: value for key, value in state.items()}
    torch.save({"state_dict": state_dict, "epoch": 3, **entries}, path)


def write_configs(official, folder) -> list[str]:
    (folder / "official.json").write_text(json.dumps(official.official_config))
    (folder / "siglip.json").write_text(json.dumps(official.siglip_vision_config))
    return ["--official-config", str(folder / "official.json"), "--siglip-config", str(folder / "siglip.json")]


def test_convert_official_checkpoint_reproduces_the_golden_codes(official, tmp_path, capsys):
    checkpoint = tmp_path / "epoch_3.pt"
    write_official_checkpoint(checkpoint, official.state, ddp=official.version == "v2")
    output = tmp_path / "converted"
    argv = ["convert-official", "--version", official.preset, str(checkpoint), str(output)]
    assert main(argv + write_configs(official, tmp_path)) == 0
    assert "0 official key(s) not used" in capsys.readouterr().out

    model = AutoModel.from_pretrained(output).eval()
    with torch.no_grad():
        encoded = model.encode(official.io["input.images"])
    assert torch.equal(encoded.pixel_codes, official.io["encode.pixel.codes"])
    assert torch.equal(encoded.semantic_codes, official.io["encode.semantic.codes"])
    processor = DualTokenImageProcessor.from_pretrained(output)
    assert processor.crop_size.height == model.config.image_size == 56
    card = (output / "README.md").read_text()
    assert "library_name: transformers" in card and "epoch**: 3" in card
    assert (output / "modeling_dualtoken_vision.py").is_file() and not (output / "siglip_text").exists()


def test_convert_official_reads_configs_from_a_state_file_and_keeps_the_text_tower(official, tmp_path):
    state_file = f"official_{official.version}_tiny_state.safetensors"
    output = tmp_path / "converted"
    argv = ["convert-official", "--version", official.preset, str(REFERENCE_DIR / state_file), str(output)]
    assert main(argv + ["--keep-text-tower"]) == 0

    model = AutoModel.from_pretrained(output).eval()
    with torch.no_grad():
        assert torch.equal(model.encode(official.io["input.images"]).pixel_codes, official.io["encode.pixel.codes"])
    text_model = SiglipTextModel.from_pretrained(output / "siglip_text")
    for name, value in text_model.state_dict().items():
        assert torch.equal(value, official.state[f"siglip_model.text_model.{name}"]), name
    with safe_open(output / "siglip_text" / "contrastive_head.safetensors", "pt") as head:
        assert torch.equal(head.get_tensor("logit_scale"), official.state["siglip_model.logit_scale"])
        assert torch.equal(head.get_tensor("logit_bias"), official.state["siglip_model.logit_bias"])


def test_convert_official_lists_every_unused_key(official, tmp_path, capsys):
    extra = {"discriminator.conv.weight": torch.zeros(2), "lpips.net.weight": torch.ones(1)}
    write_official_checkpoint(tmp_path / "epoch_3.pt", {**official.state, **extra})
    argv = ["convert-official", "--version", official.preset, str(tmp_path / "epoch_3.pt"), str(tmp_path / "out")]
    assert main(argv + write_configs(official, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "2 official key(s) not used" in out
    assert all(f"  {key}" in out.splitlines() for key in extra)


def test_convert_official_needs_allow_pickle_for_python_objects(official, tmp_path, capsys):
    checkpoint = tmp_path / "epoch_3.pt"
    write_official_checkpoint(checkpoint, official.state, args=argparse.Namespace(lr=1e-4))
    argv = ["convert-official", "--version", official.preset, str(checkpoint), str(tmp_path / "out")]
    argv += write_configs(official, tmp_path)
    line = run_failing(capsys, argv, "convert-official", "--allow-pickle")
    assert "argparse.Namespace" in line
    assert not (tmp_path / "out").exists()
    assert main(argv + ["--allow-pickle"]) == 0


def test_convert_official_keeps_the_text_tower_only_with_its_config(official, tmp_path, capsys):
    write_official_checkpoint(tmp_path / "epoch_3.pt", official.state)
    argv = ["convert-official", "--version", official.preset, str(tmp_path / "epoch_3.pt"), str(tmp_path / "out")]
    argv += write_configs(official, tmp_path) + ["--keep-text-tower"]
    run_failing(capsys, argv, "convert-official", "--siglip-text-config")
    with safe_open(REFERENCE_DIR / f"official_{official.version}_tiny_state.safetensors", "pt") as handle:
        (tmp_path / "text.json").write_text(handle.metadata()["siglip_text_config"])
    assert main(argv + ["--overwrite", "--siglip-text-config", str(tmp_path / "text.json")]) == 0
    assert (tmp_path / "out" / "siglip_text" / "contrastive_head.safetensors").is_file()


@pytest.mark.parametrize(
    "key",
    ["siglip_model.vision_model.encoder.layers.1.mlp.fc1.weight", "decoder.conv_out.weight"],
)
def test_convert_official_fails_naming_a_missing_key(official, tmp_path, capsys, key):
    write_official_checkpoint(tmp_path / "epoch_3.pt", {k: v for k, v in official.state.items() if k != key})
    argv = ["convert-official", "--version", official.preset, str(tmp_path / "epoch_3.pt"), str(tmp_path / "out")]
    run_failing(capsys, argv + write_configs(official, tmp_path), "convert-official", key)


def test_convert_official_refuses_shared_codebook_copies_that_differ(official, tmp_path, capsys):
    quantizer = "quantizer" if official.version == "v1" else "quantizer_pix"
    key = f"{quantizer}.codebooks.1.weight"
    write_official_checkpoint(tmp_path / "epoch_3.pt", {**official.state, key: official.state[key] + 1})
    argv = ["convert-official", "--version", official.preset, str(tmp_path / "epoch_3.pt"), str(tmp_path / "out")]
    run_failing(capsys, argv + write_configs(official, tmp_path), "convert-official", "differ")


def test_python_api_converts_a_checkpoint_with_its_stored_configs(official, tmp_path):
    checkpoint = tmp_path / "epoch_3.pt"
    configs = {
        "rqvaesiglip_config": json.dumps(official.official_config),
        "siglip_vision_config": json.dumps(official.siglip_vision_config),
    }
    write_official_checkpoint(checkpoint, official.state, ddp=official.version == "v2", **configs)

    state_dict, official_config, siglip_vision_config = load_official_checkpoint(checkpoint)
    assert (official_config, siglip_vision_config) == (official.official_config, official.siglip_vision_config)
    assert set(state_dict) == set(official.state)  # DDP prefixes stripped
    from_file = official_to_hf(state_dict, official.preset, official_config, siglip_vision_config)
    # The whole checkpoint dict, as torch.load gives it, works too: its stored configs are used.
    from_dict = official_to_hf(torch.load(checkpoint, weights_only=True), official.preset)
    for config, converted in (from_file, from_dict):
        model = DualTokenVisionModel(config).eval()
        model.load_state_dict(converted)
        with torch.no_grad():
            assert torch.equal(model.encode(official.io["input.images"]).pixel_codes, official.io["encode.pixel.codes"])


def test_python_api_explains_a_state_without_its_configs(official):
    codebook = f"{'quantizer' if official.version == 'v1' else 'quantizer_pix'}.codebooks.4.weight"
    pattern = f"the checkpoint lacks the official key {codebook}; no official config was given, so the full-size"
    with pytest.raises(ValueError, match=re.escape(pattern)) as raised:
        official_to_hf(official.state, official.preset)
    assert "load_official_checkpoint" in str(raised.value)


def test_python_api_names_the_other_version(official):
    other = "v2" if official.preset == "paper" else "paper"
    with pytest.raises(ValueError, match=f"has the official '{official.preset}' layout, not '{other}'.*--version"):
        official_to_hf(official.state, other, official.official_config, official.siglip_vision_config)


def test_python_api_explains_configs_that_do_not_fit(official):
    siglip = dict(official.siglip_vision_config)
    siglip["intermediate_size"] *= 2
    checkpoint = SimpleNamespace(state_dict=official.state, configs={}, path=Path("epoch_3.pt"))
    with pytest.raises(ValueError, match="size mismatch.*does not match the given configs"):
        convert_official_checkpoint(checkpoint, official.preset, official.official_config, siglip)


NOT_CHECKPOINTS = {
    "notes.txt": (b"remember: convert the epoch 20 checkpoint\n", "(it looks like a text file)"),
    "photo.jpg": (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)), "(it looks like a JPEG image)"),
    "empty.pt": (b"", "(it is empty)"),
    "random.safetensors": (bytes(range(256)) * 4, "is not a checkpoint"),
}


@pytest.mark.parametrize("name", sorted(NOT_CHECKPOINTS))
def test_convert_official_says_in_one_line_that_a_file_is_no_checkpoint(name, tmp_path, capsys):
    data, phrase = NOT_CHECKPOINTS[name]
    (tmp_path / name).write_bytes(data)
    argv = ["convert-official", "--version", "v2", str(tmp_path / name), str(tmp_path / "out")]
    line = run_failing(capsys, argv, "convert-official", f"{str(tmp_path / name)!r} is not a checkpoint: neither")
    assert phrase in line and "weights_only" not in line and "--allow-pickle" not in line
    # --allow-pickle changes nothing for a file that is no pickle: it is never handed to torch.load
    run_failing(capsys, argv + ["--allow-pickle"], "convert-official", "is not a checkpoint")


@pytest.mark.parametrize(
    "data, phrase",
    [
        pytest.param(pickle.dumps({"weights": [1, 2, 3]}, protocol=4), "Unsupported operand", id="plain-pickle"),
        pytest.param(b"PK\x03\x04" + bytes(60), "PytorchStreamReader", id="damaged-zip"),
    ],
)
def test_convert_official_does_not_suggest_allow_pickle_for_a_damaged_checkpoint(data, phrase, tmp_path, capsys):
    (tmp_path / "epoch_3.pt").write_bytes(data)
    argv = ["convert-official", "--version", "v2", str(tmp_path / "epoch_3.pt"), str(tmp_path / "out")]
    line = run_failing(capsys, argv, "convert-official", "as a PyTorch checkpoint")
    assert phrase in line and "--allow-pickle" not in line and "weights_only" not in line


# ------------------------------------------------------------------------------------------------------- init


def build_init_sources(folder):
    """A tiny SigLIP tower and a tiny Qwen2 whose tokenizer lacks the image tokens and fills its vocabulary."""
    siglip = SiglipVisionModel(DualTokenVisionConfig.from_preset("tiny").siglip_config)
    siglip.save_pretrained(folder / "siglip")
    words = "<unk> <|endoftext|> a red fox cat dog the in on describe this image".split()
    backend = Tokenizer(models.WordLevel({word: index for index, word in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<|endoftext|>")
    tokenizer.save_pretrained(folder / "llm")
    text_config = Qwen2Config(
        vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, eos_token_id=1,
    )
    llm = Qwen2ForCausalLM(text_config)
    llm.save_pretrained(folder / "llm")
    return siglip, llm, len(words)


def test_init_assembles_a_unified_model_from_siglip_and_an_llm(tmp_path):
    siglip, llm, vocab_size = build_init_sources(tmp_path)
    output = tmp_path / "init"
    argv = ["init", "--siglip", str(tmp_path / "siglip"), "--llm", str(tmp_path / "llm"), "--preset", "tiny"]
    assert main(argv + [str(output)]) == 0

    model = AutoModel.from_pretrained(output)
    assert isinstance(model, DualTokenForConditionalGeneration)
    for name, value in siglip.state_dict().items():
        assert torch.equal(model.vision_tokenizer.siglip.state_dict()[name], value), name
    source = llm.model.state_dict()
    for name, value in model.language_model.state_dict().items():
        expected = source[name]
        assert torch.equal(value[: expected.shape[0]] if name == "embed_tokens.weight" else value, expected), name

    tokenizer = AutoTokenizer.from_pretrained(output)
    added = tokenizer.get_added_vocab()
    assert [added[token] for token in ("<image>", "<begin_of_image>", "<end_of_image>")] == [
        model.config.image_token_id, model.config.boi_token_id, model.config.eoi_token_id
    ] == [vocab_size, vocab_size + 1, vocab_size + 2]
    assert model.config.text_config.vocab_size == len(tokenizer) == vocab_size + 3
    processor = AutoProcessor.from_pretrained(output)
    assert processor.num_image_tokens == 64 and processor.image_token_id == model.config.image_token_id
    assert "pipeline_tag: any-to-any" in (output / "README.md").read_text()


# ------------------------------------------------------------------------------ tokenize, detokenize, reconstruct


def test_tokenize_then_detokenize_photos(tokenizer_folder, photos, tmp_path):
    images = [photos / "astronaut.png", photos / "chelsea.jpg"]
    codes_file = tmp_path / "codes.safetensors"
    assert main(["tokenize", "--model", str(tokenizer_folder), *map(str, images), "--output", str(codes_file)]) == 0

    model = DualTokenVisionModel.from_pretrained(tokenizer_folder).eval()
    with torch.no_grad():
        expected = model.encode(processed(tokenizer_folder, *images))
        decoded = DualTokenImageProcessor.from_pretrained(tokenizer_folder).postprocess(
            model.decode(expected.pixel_codes)
        )
    with safe_open(codes_file, "pt") as handle:
        assert torch.equal(handle.get_tensor("pixel_codes"), expected.pixel_codes)
        assert torch.equal(handle.get_tensor("semantic_codes"), expected.semantic_codes)
        assert handle.get_tensor("pixel_codes").dtype == torch.int64
        assert json.loads(handle.metadata()["sources"]) == [str(image) for image in images]

    output = tmp_path / "decoded.png"
    assert main(["detokenize", "--model", str(tokenizer_folder), str(codes_file), "--output", str(output)]) == 0
    for index, image in enumerate(decoded):
        assert np.array_equal(np.asarray(Image.open(tmp_path / f"decoded-{index}.png")), np.asarray(image))
    assert not output.exists()


@pytest.fixture(scope="module")
def photo_codes(tokenizer_folder, photos, tmp_path_factory):
    """A code file of two photos written by `dualtoken tokenize` with `tokenizer_folder`."""
    codes_file = tmp_path_factory.mktemp("codes") / "codes.safetensors"
    images = [str(photos / "astronaut.png"), str(photos / "chelsea.jpg")]
    assert main(["tokenize", "--model", str(tokenizer_folder), *images, "--output", str(codes_file)]) == 0
    return codes_file


def saved_tokenizer(folder, seed: int, change=None):
    """A tiny tokenizer folder from `seed`, with `change(model)` applied before saving."""
    torch.manual_seed(seed)
    model = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny"))
    if change is not None:
        change(model)
    model.save_pretrained(folder)
    DualTokenImageProcessor.from_preset("tiny").save_pretrained(folder)
    return folder


def detokenize(model, codes_file, output, *extra) -> int:
    return main(["detokenize", "--model", str(model), str(codes_file), "--output", str(output), *extra])


def test_the_code_file_records_the_fingerprint_of_its_tokenizer(tokenizer_folder, photo_codes):
    with safe_open(photo_codes, "pt") as handle:
        fingerprint = json.loads(handle.metadata()["fingerprint"])
    tokenizer = DualTokenVisionModel.from_pretrained(tokenizer_folder)
    assert fingerprint == tokenizer_fingerprint(tokenizer)
    assert fingerprint["grid_size"] == 8
    assert (fingerprint["pixel"]["codebook_size"], fingerprint["pixel"]["depth"]) == (256, 4)
    codebooks = tokenizer.pixel_quantizer.codebook.float().contiguous().numpy().tobytes()
    assert fingerprint["pixel"]["codebooks_sha256"] == hashlib.sha256(codebooks).hexdigest()


def test_detokenize_refuses_codes_of_another_tokenizer_unless_forced(photo_codes, tmp_path, capsys):
    other = saved_tokenizer(tmp_path / "other", seed=1)
    line = run_failing(capsys, ["detokenize", "--model", str(other), str(photo_codes), "--output",
                                str(tmp_path / "d.png")], "detokenize", "was written by another tokenizer")
    assert "pixel codebooks differ" in line and "--force" in line
    assert not (tmp_path / "d-0.png").exists()

    assert detokenize(other, photo_codes, tmp_path / "d.png", "--force") == 0
    assert "warning:" in capsys.readouterr().err and (tmp_path / "d-1.png").is_file()


def test_detokenize_accepts_a_tokenizer_with_the_same_codebooks(photo_codes, tmp_path):
    # Same seed, so the same codebooks; only the decoder differs (e.g. a decoder fine-tuned on frozen codes).
    def retrain_decoder(model):
        with torch.no_grad():
            model.pixel_decoder.decoder.conv_out.bias.add_(0.5)

    retrained = saved_tokenizer(tmp_path / "retrained", seed=0, change=retrain_decoder)
    assert detokenize(retrained, photo_codes, tmp_path / "d.png") == 0


def test_detokenize_refuses_a_code_file_without_a_fingerprint_unless_forced(tokenizer_folder, photo_codes, tmp_path,
                                                                            capsys):
    codes, metadata = load_codes(photo_codes)
    unrecorded = tmp_path / "unrecorded.safetensors"
    save_codes(unrecorded, codes["pixel_codes"], codes["semantic_codes"], ["a.png", "b.png"], metadata["model"])
    run_failing(capsys, ["detokenize", "--model", str(tokenizer_folder), str(unrecorded), "--output",
                         str(tmp_path / "d.png")], "detokenize", "records no tokenizer fingerprint")
    assert detokenize(tokenizer_folder, unrecorded, tmp_path / "d.png", "--force") == 0


@pytest.mark.parametrize(
    "change, phrase",
    [
        (lambda codes: codes + 1000, "pixel_codes in '{codes}' must be in [0, 256) for the tokenizer"),
        (lambda codes: codes - codes.max() - 1, "must be in [0, 256)"),
        (lambda codes: codes[:, :4, :4], "holds 4x4 positions of 4 pixel codes each, but the tokenizer"),
        (lambda codes: codes[..., :2], "holds 8x8 positions of 2 pixel codes each, but the tokenizer"),
    ],
    ids=["above-codebook", "negative", "other-grid", "other-depth"],
)
def test_detokenize_always_refuses_codes_that_do_not_fit_the_tokenizer(change, phrase, tokenizer_folder,
                                                                       photo_codes, tmp_path, capsys):
    codes, metadata = load_codes(photo_codes)
    bad = tmp_path / "bad.safetensors"
    pixel_codes = change(codes["pixel_codes"])
    fingerprint = json.loads(metadata["fingerprint"])
    save_codes(bad, pixel_codes, pixel_codes.clone(), ["a.png", "b.png"], metadata["model"], fingerprint)
    argv = ["detokenize", "--model", str(tokenizer_folder), str(bad), "--output", str(tmp_path / "d.png")]
    run_failing(capsys, argv + ["--force"], "detokenize", phrase.format(codes=bad))


def test_tokenize_reads_the_vision_tokenizer_of_a_unified_folder(unified_folder, photos, tmp_path):
    codes_file = tmp_path / "codes.safetensors"
    argv = ["tokenize", "--model", str(unified_folder), str(photos / "chelsea.jpg"), "--output", str(codes_file)]
    assert main(argv) == 0
    model = AutoModel.from_pretrained(unified_folder).eval()
    with torch.no_grad():
        expected = model.vision_tokenizer.encode(processed(unified_folder, photos / "chelsea.jpg"))
    with safe_open(codes_file, "pt") as handle:
        assert torch.equal(handle.get_tensor("pixel_codes"), expected.pixel_codes)
        assert torch.equal(handle.get_tensor("semantic_codes"), expected.semantic_codes)


def test_reconstruct_writes_the_input_crop_beside_the_reconstruction(tokenizer_folder, photos, tmp_path):
    output = tmp_path / "astronaut-reconstructed.png"
    argv = ["reconstruct", "--model", str(tokenizer_folder), str(photos / "astronaut.png"), "--output", str(output)]
    assert main(argv + ["--side-by-side"]) == 0
    written = np.asarray(Image.open(output))
    assert written.shape == (64, 128, 3)
    processor = DualTokenImageProcessor.from_pretrained(tokenizer_folder)
    crop = processor.postprocess(processed(tokenizer_folder, photos / "astronaut.png"))[0]
    assert np.array_equal(written[:, :64], np.asarray(crop))

    assert main(argv[:-2] + ["--output", str(tmp_path / "plain.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "plain.png")), written[:, 64:])


# ------------------------------------------------------------------------------------------ generate, describe


def test_generate_writes_the_images_of_the_seeded_model_call(unified_folder, tmp_path):
    output = tmp_path / "fox.png"
    argv = ["generate", "--model", str(unified_folder), "a red fox", "--output", str(output)]
    assert main(argv + ["--seed", "0", "--num-images", "2", "--guidance-scale", "3", "--top-k", "50"]) == 0

    model, processor = AutoModel.from_pretrained(unified_folder).eval(), AutoProcessor.from_pretrained(unified_folder)
    inputs = processor(text=["a red fox"], generation_mode="image", return_tensors="pt")
    codes = model.generate(
        **inputs, generation_mode="image", guidance_scale=3.0, top_k=50, num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(0),
    )
    for index, image in enumerate(processor.postprocess(model.decode_image_tokens(codes))):
        written = Image.open(tmp_path / f"fox-{index}.png")
        assert written.size == (64, 64)
        assert np.array_equal(np.asarray(written), np.asarray(image))


def test_describe_prints_the_greedy_answer(unified_folder, photos, capsys):
    argv = ["describe", "--model", str(unified_folder), str(photos / "chelsea.jpg"), "--prompt", "What is this?"]
    assert main(argv + ["--max-new-tokens", "6", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.strip()

    model, processor = AutoModel.from_pretrained(unified_folder).eval(), AutoProcessor.from_pretrained(unified_folder)
    image = Image.open(photos / "chelsea.jpg")
    content = [{"type": "image", "image": image}, {"type": "text", "text": "What is this?"}]
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert printed == processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])[0].strip()


def test_generate_and_describe_default_to_the_mini_model(unified_folder, photos, tmp_path, capsys, monkeypatch):
    """Without --model both commands load the model `dualtoken_hf.pretrained.mini_dualtoken_path()` names (here
    pointed at the tiny folder): the same output as naming that folder."""
    import dualtoken_hf.cli.unified as unified_cli

    monkeypatch.setattr(unified_cli, "mini_dualtoken_path", lambda: unified_folder)
    answers = []
    for argv in (["--model", str(unified_folder)], []):
        name = "named" if argv else "default"
        assert main(["generate", *argv, "a coat", "--output", str(tmp_path / f"{name}.png"), "--seed", "0"]) == 0
        capsys.readouterr()
        assert main(["describe", *argv, str(photos / "chelsea.jpg"), "--max-new-tokens", "4"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "named.png")), np.asarray(Image.open(tmp_path / "default.png")))


def test_describe_bounds_the_answer_by_the_model_context(unified_folder, photos, capsys):
    argv = ["describe", "--model", str(unified_folder), str(photos / "chelsea.jpg"), "--device", "cpu"]
    line = run_failing(capsys, argv + ["--max-new-tokens", "100000000"], "describe", "--max-new-tokens must be at most")
    left, prompt = map(int, re.search(r"at most (\d+) .* minus the prompt's (\d+)\), got 100000000", line).groups())
    assert left + prompt == 1024  # the tiny LLM's max_position_embeddings
    assert prompt > 64  # the 8 x 8 image positions are part of the prompt
    run_failing(capsys, argv + ["--max-new-tokens", str(left + 1)], "describe", f"at most {left} for this prompt")


def test_describe_refuses_a_prompt_that_fills_the_context(unified_folder, photos, capsys):
    argv = ["describe", "--model", str(unified_folder), str(photos / "chelsea.jpg"), "--device", "cpu"]
    line = run_failing(capsys, argv + ["--prompt", "the cat " * 600], "describe", "leaves none of the model's context")
    assert "1024 (max_position_embeddings)" in line and "shorten --prompt" in line


@pytest.mark.parametrize("command", ["generate", "describe"])
def test_generate_and_describe_refuse_a_tokenizer_folder(tokenizer_folder, photos, tmp_path, capsys, command):
    argv = {
        "generate": ["generate", "--model", str(tokenizer_folder), "a fox", "--output", str(tmp_path / "x.png")],
        "describe": ["describe", "--model", str(tokenizer_folder), str(photos / "chelsea.jpg")],
    }[command]
    run_failing(capsys, argv, command, "holds a vision tokenizer")


# --------------------------------------------------------------------------------------------- export, push


def test_export_writes_a_tokenizer_folder_that_loads_without_the_package(exported_tokenizer):
    check = json.loads((exported_tokenizer / EXPORT_CHECK_FILE).read_text())
    assert check["kind"] == "dualtoken_vision"
    assert check["report"]["pixel_codes_shape"] == [1, 8, 8, 4]
    assert check["report"]["pixel_decoder"] == "DualTokenPixelDecoder"
    assert (exported_tokenizer / "pixel_decoder" / "config.json").is_file()
    assert (exported_tokenizer / "preprocessor_config.json").is_file()
    assert "pipeline_tag: image-feature-extraction" in (exported_tokenizer / "README.md").read_text()


@pytest.mark.slow
def test_export_writes_a_unified_folder_that_loads_without_the_package(unified_folder, tmp_path):
    output = tmp_path / "hub"
    assert main(["export", str(unified_folder), str(output)]) == 0
    check = json.loads((output / EXPORT_CHECK_FILE).read_text())
    assert check["kind"] == "dualtoken" and check["report"]["generated_tokens"] == 1
    card = (output / "README.md").read_text()
    assert "library_name: transformers" in card and "pipeline_tag: any-to-any" in card
    assert (output / "pipeline_dualtoken.py").is_file() and (output / "generation_config.json").is_file()


@pytest.mark.slow
def test_export_reports_a_folder_that_fails_without_the_package(exported_tokenizer, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported_tokenizer, broken)
    with open(broken / "modeling_dualtoken_vision.py", "a") as handle:
        handle.write("\nraise ImportError('this remote code is broken')\n")
    with pytest.raises(hub_export.ExportCheckError, match="this remote code is broken"):
        hub_export.check_folder(broken)
    assert not (broken / EXPORT_CHECK_FILE).exists()


class FakeHfApi:
    """Records the calls `push` makes instead of reaching the Hub."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("token", token))

    def create_repo(self, repo_id, private=None, exist_ok=False):
        self.calls.append(("create_repo", repo_id, private, exist_ok))

    def create_branch(self, repo_id, branch, exist_ok=False):
        self.calls.append(("create_branch", repo_id, branch, exist_ok))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        return SimpleNamespace(commit_url=f"https://huggingface.co/{kwargs['repo_id']}/commit/0123")


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHfApi.calls = []
    monkeypatch.setattr(hub_export, "HfApi", FakeHfApi)
    return FakeHfApi.calls


def test_push_uploads_a_checked_folder_without_its_check_file(exported_tokenizer, fake_hub, capsys):
    argv = ["push", str(exported_tokenizer), "--repo-id", "my-org/tiny", "--private", "--revision", "v1"]
    assert main(argv + ["--token", "hf_x"]) == 0
    assert "https://huggingface.co/my-org/tiny/commit/0123" in capsys.readouterr().out
    assert fake_hub[:3] == [
        ("token", "hf_x"), ("create_repo", "my-org/tiny", True, True), ("create_branch", "my-org/tiny", "v1", True)
    ]
    upload = fake_hub[3][1]
    assert upload["folder_path"] == str(exported_tokenizer) and upload["revision"] == "v1"
    assert EXPORT_CHECK_FILE in upload["ignore_patterns"]


def test_push_refuses_folders_that_did_not_pass_the_check(tokenizer_folder, exported_tokenizer, tmp_path, fake_hub,
                                                         capsys):
    run_failing(capsys, ["push", str(tokenizer_folder), "--repo-id", "my-org/tiny"], "push", "has not passed")
    changed = tmp_path / "changed"
    shutil.copytree(exported_tokenizer, changed)
    (changed / "README.md").write_text("an edited card is fine")
    assert main(["push", str(changed), "--repo-id", "my-org/tiny"]) == 0
    (changed / "config.json").write_text((changed / "config.json").read_text() + "\n")
    run_failing(capsys, ["push", str(changed), "--repo-id", "my-org/tiny"], "push", "changed after its export check")
    run_failing(capsys, ["push", str(exported_tokenizer), "--repo-id", "not a repo id"], "push", "not a repo id")
    assert [call[0] for call in fake_hub].count("upload_folder") == 1


# --------------------------------------------------------------------------------------------- error paths


@pytest.fixture(scope="module")
def not_dualtoken_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    (root / "empty").mkdir()
    (root / "qwen2").mkdir()
    (root / "qwen2" / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    (root / "not-empty").mkdir()
    (root / "not-empty" / "file.txt").write_text("keep me")
    return root


ERROR_CASES = {
    "missing model folder": ("tokenize --model {root}/nowhere {photos}/chelsea.jpg --output {tmp}/c.safetensors",
                             "does not exist"),
    "folder without config": ("reconstruct --model {root}/empty {photos}/chelsea.jpg --output {tmp}/r.png",
                              "no config.json"),
    "another model type": ("tokenize --model {root}/qwen2 {photos}/chelsea.jpg --output {tmp}/c.safetensors",
                           "holds a 'qwen2' model"),
    "missing image": ("tokenize --model {tokenizer} {photos}/missing.png --output {tmp}/c.safetensors",
                      "no such image file"),
    "unreadable image": ("reconstruct --model {tokenizer} {photos}/broken.png --output {tmp}/r.png", "cannot read"),
    "describe unreadable image": ("describe --model {unified} {photos}/broken.png", "broken.png' as an image"),
    "bad output extension": ("reconstruct --model {tokenizer} {photos}/chelsea.jpg --output {tmp}/r.codes",
                             "image extension"),
    "codes file of another kind": ("detokenize --model {tokenizer} {tokenizer}/model.safetensors --output {tmp}/r.png",
                                   "not a code file"),
    "codes file that is not safetensors": ("detokenize --model {tokenizer} {photos}/broken.png --output {tmp}/r.png",
                                           "as a safetensors code file"),
    "missing checkpoint": ("convert-official --version v2 {root}/epoch_1.pt {tmp}/out", "no such checkpoint file"),
    "unreadable checkpoint": ("convert-official --version v2 {root}/garbage.pt {tmp}/out", "is not a checkpoint"),
    "output folder not empty": ("convert-official --version v2 {root}/garbage.pt {root}/not-empty", "not empty"),
    "export into its own folder": ("export {tokenizer} {tokenizer}", "must differ"),
    "init without a SigLIP checkpoint": ("init --siglip {root}/nowhere --llm {root}/nowhere {tmp}/init",
                                         "cannot load the SigLIP checkpoint"),
    "empty prompt": ("generate --model {unified} '' --output {tmp}/g.png", "prompt is empty"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_are_one_clear_line_with_exit_status_2(case, tokenizer_folder, unified_folder, photos,
                                                     not_dualtoken_folders, tmp_path, capsys):
    template, phrase = ERROR_CASES[case]
    argv = shlex.split(template.format(
        root=not_dualtoken_folders, photos=photos, tokenizer=tokenizer_folder, unified=unified_folder, tmp=tmp_path
    ))
    run_failing(capsys, argv, argv[0], phrase)


@pytest.mark.parametrize(
    "argv, phrase",
    [
        (["generate", "--model", "m", "p", "--output", "o.png", "--num-images", "0"], "must be a positive integer"),
        (["generate", "--model", "m", "p", "--output", "o.png", "--top-p", "1.5"], "must be in (0, 1]"),
        (["generate", "--model", "m", "p", "--output", "o.png", "--guidance-scale", "-1"], "must be >= 0"),
        (["generate", "--model", "m", "p", "--output", "o.png", "--temperature", "nan"], "must be a number"),
        (["generate", "--model", "m", "p", "--output", "o.png", "--temperature", "0"], "must be > 0"),
        (["generate", "--model", "m", "p", "--output", "o.png", "--top-k", "-5"], "must be a positive integer"),
        (["generate", "--model", "m", "p", "--output", "o.png", "--seed", "-1"], "must be an integer in [0, 2**64)"),
        (["generate", "--model", "m", "p", "--output", "o.png", "--seed", str(2**64)], "[0, 2**64)"),
        (["init", "--siglip", "s", "--llm", "l", "out", "--seed", "1.5"], "must be an integer in [0, 2**64)"),
        (["describe", "--model", "m", "i.png", "--max-new-tokens", "0"], "must be a positive integer"),
        (["describe", "--model", "m", "i.png", "--max-new-tokens", "-5"], "must be a positive integer"),
        (["detokenize", "--model", "m", "c", "--output", "o.png", "--batch-size", "0"], "must be a positive integer"),
        (["tokenize", "--model", "m", "i.png", "--output", "c", "--batch-size", "x"], "must be a positive integer"),
        (["convert-official", "--version", "v3", "c.pt", "out"], "invalid choice"),
        (["convert-official", "--version", "v2", "c.pt", "out", "--official-config", "nowhere.json"],
         "cannot read a JSON config"),
        (["push", "folder"], "--repo-id"),
        (["describe", "--model", "m", "i.png", "--device", "gpu-please"], "must be auto or a torch device"),
        pytest.param(
            ["tokenize", "--model", "m", "i.png", "--output", "c", "--device", "cuda"], "no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present"),
        ),
    ],
)
def test_bad_values_are_refused_before_any_work(argv, phrase, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert phrase in err and "Traceback" not in err


def test_every_subcommand_has_help(capsys):
    for name in SUBCOMMANDS:
        assert main([name, "--help"]) == 0
        assert "example:" in capsys.readouterr().out


def test_debug_shows_the_traceback(tokenizer_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such image file"):
        main(["tokenize", "--model", str(tokenizer_folder), "nowhere.png", "--output", str(tmp_path / "c"), "--debug"])


def run_dualtoken(*argv: str) -> tuple[subprocess.CompletedProcess, float]:
    """`python -m dualtoken_hf argv` in a fresh process: its result and its wall time in seconds."""
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "dualtoken_hf", *argv], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    return result, time.perf_counter() - start


def test_importing_the_cli_imports_no_model_libraries():
    code = (
        "import sys, dualtoken_hf.cli; "
        "loaded = [name for name in ('torch', 'transformers', 'diffusers') if name in sys.modules]; "
        "assert not loaded, loaded"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# Measured on the 2-core dev box: about 0.2 s each (20-30 s before the parser stopped importing the subcommands);
# the bound leaves room for a loaded CI machine.
@pytest.mark.parametrize(
    "argv, status, phrase",
    [
        (["--help"], 0, "convert-official"),
        (["tokenize", "--model", "m", "i.png", "--output", "c", "--batch-size", "x"], 2, "must be a positive integer"),
        (["generate", "a fox"], 2, "the following arguments are required: --output"),
        (["no-such-command"], 2, "invalid choice: 'no-such-command'"),
    ],
)
def test_help_and_usage_errors_answer_without_loading_a_model(argv, status, phrase):
    result, seconds = run_dualtoken(*argv)
    assert result.returncode == status, result.stderr
    assert phrase in result.stdout + result.stderr
    assert seconds < 5


def test_presets_and_versions_come_from_the_package():
    from dualtoken_hf.configuration_dualtoken import UNIFIED_PRESETS
    from dualtoken_hf.convert.official import VERSIONS

    parser = build_parser()
    assert parser.parse_args(["init", "--siglip", "s", "--llm", "l", "out"]).preset in UNIFIED_PRESETS
    for preset in UNIFIED_PRESETS:
        assert parser.parse_args(["init", "--siglip", "s", "--llm", "l", "--preset", preset, "out"]).preset == preset
    for version in VERSIONS:
        assert parser.parse_args(["convert-official", "--version", version, "c.pt", "out"]).version == version


def test_an_unknown_preset_lists_the_package_presets(capsys):
    from dualtoken_hf.configuration_dualtoken import UNIFIED_PRESETS

    assert main(["init", "--siglip", "s", "--llm", "l", "--preset", "huge", "out"]) == 2
    err = capsys.readouterr().err
    assert f"invalid choice: 'huge' (choose from {', '.join(map(repr, UNIFIED_PRESETS))})" in err


def test_console_script_and_python_m_entry_points():
    (script,) = entry_points(group="console_scripts", name="dualtoken")
    assert script.value == "dualtoken_hf.cli:main"
    result = subprocess.run(
        [sys.executable, "-m", "dualtoken_hf", "--help"], capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert all(name in result.stdout for name in SUBCOMMANDS)
