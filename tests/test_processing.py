"""DualTokenProcessor: placeholder expansion, text-to-image prompts, padding, chat template, post-processing, Hub."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers.dynamic_module_utils import get_class_from_dynamic_module

import dualtoken_hf.configuration_dualtoken as configuration_module
import dualtoken_hf.image_processing_dualtoken as image_processing_module
import dualtoken_hf.processing_dualtoken as processing_module
from dualtoken_hf.image_processing_dualtoken import DualTokenImageProcessor
from dualtoken_hf.processing_dualtoken import DualTokenProcessor, default_chat_template
from dualtoken_hf.testing import build_tiny_processor, build_tiny_text_tokenizer


GRID = 64  # tiny preset: 64 px / patch 8 = 8 x 8 positions
IM_START, IM_END, PAD, IMAGE, BOI, EOI = 506, 507, 508, 509, 510, 511
EXPANDED_IMAGE = [BOI] + [IMAGE] * GRID + [EOI]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture(scope="module")
def red_image():
    return PIL.Image.new("RGB", (70, 50), (200, 10, 10))


@pytest.fixture(scope="module")
def blue_image():
    return PIL.Image.new("RGB", (64, 80), (0, 0, 255))


def _text_ids(processor, text):
    """Ids of plain text, tokenized alone (added tokens split the text into independently tokenized pieces)."""
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


# --- the tiny tokenizer -----------------------------------------------------------------------------------------


def test_tiny_tokenizer_puts_special_tokens_at_the_end_of_512_ids():
    tokenizer = build_tiny_text_tokenizer()
    assert len(tokenizer) == 512
    assert tokenizer.convert_tokens_to_ids(
        ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<image>", "<begin_of_image>", "<end_of_image>"]
    ) == [IM_START, IM_END, PAD, IMAGE, BOI, EOI]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == PAD
    assert (tokenizer.image_token, tokenizer.boi_token, tokenizer.eoi_token) == (
        "<image>", "<begin_of_image>", "<end_of_image>"
    )
    assert tokenizer("a red fox")["input_ids"] and max(tokenizer("a red fox")["input_ids"]) < IM_START


def test_tiny_tokenizer_build_is_deterministic():
    first, second = build_tiny_text_tokenizer(), build_tiny_text_tokenizer()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_processor_exposes_special_tokens_and_their_ids(processor):
    assert (processor.image_token, processor.boi_token, processor.eoi_token) == (
        "<image>", "<begin_of_image>", "<end_of_image>"
    )
    assert (processor.image_token_id, processor.boi_token_id, processor.eoi_token_id) == (IMAGE, BOI, EOI)
    assert processor.num_image_tokens == GRID
    assert processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]


# --- placeholder expansion --------------------------------------------------------------------------------------


def test_one_placeholder_expands_to_boi_grid_eoi_in_place(processor, red_image):
    inputs = processor(text="Look at <image> and describe it.", images=red_image, return_tensors="pt")
    expected = _text_ids(processor, "Look at ") + EXPANDED_IMAGE + _text_ids(processor, " and describe it.")
    assert inputs["input_ids"].tolist() == [expected]
    assert inputs["attention_mask"].tolist() == [[1] * len(expected)]
    expected_pixels = DualTokenImageProcessor.from_preset("tiny")(red_image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], expected_pixels, rtol=0, atol=0)


def test_two_placeholders_expand_in_order_with_images_in_order(processor, red_image, blue_image):
    inputs = processor(text="<image> versus <image>", images=[red_image, blue_image], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    assert ids == EXPANDED_IMAGE + _text_ids(processor, " versus ") + EXPANDED_IMAGE
    assert ids.count(IMAGE) == 2 * GRID
    boi_positions = [index for index, token in enumerate(ids) if token == BOI]
    eoi_positions = [index for index, token in enumerate(ids) if token == EOI]
    assert [eoi - boi for boi, eoi in zip(boi_positions, eoi_positions)] == [GRID + 1, GRID + 1]
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    assert inputs["pixel_values"][0, 2].mean() < inputs["pixel_values"][1, 2].mean()  # red first, blue second


def test_images_without_placeholders_are_prepended_to_the_single_prompt(processor, red_image, blue_image):
    ids = processor(text="Compare them.", images=[red_image, blue_image])["input_ids"][0]
    assert ids == EXPANDED_IMAGE + EXPANDED_IMAGE + _text_ids(processor, "Compare them.")


def test_one_image_per_prompt_is_prepended_when_counts_match(processor, red_image, blue_image):
    ids = processor(text=["A?", "Bb?"], images=[red_image, blue_image], padding=False)["input_ids"]
    assert ids == [EXPANDED_IMAGE + _text_ids(processor, "A?"), EXPANDED_IMAGE + _text_ids(processor, "Bb?")]


def test_one_list_of_images_per_prompt_is_prepended_per_prompt(processor, red_image, blue_image):
    inputs = processor(text=["two", "one"], images=[[red_image, blue_image], [red_image]], padding=False)
    assert inputs["input_ids"] == [
        EXPANDED_IMAGE + EXPANDED_IMAGE + _text_ids(processor, "two"),
        EXPANDED_IMAGE + _text_ids(processor, "one"),
    ]
    assert len(inputs["pixel_values"]) == 3


def test_ambiguous_images_without_placeholders_raise(processor, red_image):
    with pytest.raises(ValueError, match="2 prompts .* 3 images"):
        processor(text=["a", "b"], images=[red_image] * 3)


@pytest.mark.parametrize(
    ("text", "num_images", "counts"),
    [
        ("<image> and <image>", 1, ("2", "1")),
        ("<image> alone", 0, ("1", "0")),
        (["<image>", "no image"], 2, ("1", "2")),
    ],
)
def test_placeholder_count_mismatch_raises_naming_both_counts(processor, red_image, text, num_images, counts):
    images = [red_image] * num_images if num_images else None
    with pytest.raises(ValueError) as error:
        processor(text=text, images=images)
    message = str(error.value)
    assert f"{counts[0]} <image> placeholder(s)" in message and f"{counts[1]} image(s)" in message


def test_truncation_through_an_image_raises(processor, red_image):
    with pytest.raises(ValueError, match="truncation"):
        processor(text="<image> describe", images=red_image, truncation=True, max_length=10)


@pytest.mark.parametrize("text", [123, [], ["ok", 5], [[1, 2, 3]]])
def test_text_that_is_not_strings_raises(processor, text):
    with pytest.raises(ValueError, match="text must be a string or a non-empty list of strings"):
        processor(text=text)


def test_images_only_give_pixel_values_only(processor, red_image):
    inputs = processor(images=[red_image, red_image], return_tensors="pt")
    assert set(inputs) == {"pixel_values"} and inputs["pixel_values"].shape == (2, 3, 64, 64)


def test_grayscale_arrays_and_mixed_lists_are_accepted_like_the_image_processor(processor, red_image):
    gray = np.full((30, 40), 255, dtype=np.uint8)
    inputs = processor(text="<image><image>", images=[gray, red_image], return_tensors="np")
    expected = processor.image_processor([gray, red_image], return_tensors="np")["pixel_values"]
    np.testing.assert_array_equal(inputs["pixel_values"], expected)
    assert inputs["input_ids"][0].tolist() == EXPANDED_IMAGE + EXPANDED_IMAGE


def test_empty_prompt_in_image_mode_gives_the_unconditional_prompt(processor):
    ids = processor(text="", generation_mode="image")["input_ids"][0]
    assert ids == processor.tokenizer("<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n")["input_ids"] + [BOI]


def test_paper_preset_processor_expands_to_27_by_27_positions():
    processor = build_tiny_processor(image_preset="paper")
    inputs = processor(text="<image>", images=np.zeros((30, 40, 3), dtype=np.uint8), return_tensors="np")
    assert processor.num_image_tokens == 729
    assert inputs["input_ids"][0].tolist() == [BOI] + [IMAGE] * 729 + [EOI]
    assert inputs["pixel_values"].shape == (1, 3, 384, 384)


# --- text-to-image prompts --------------------------------------------------------------------------------------


def test_image_generation_prompt_is_a_chat_turn_ending_with_boi(processor):
    ids = processor(text="a red fox", generation_mode="image")["input_ids"][0]
    rendered = "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"
    assert ids == processor.tokenizer(rendered)["input_ids"] + [BOI]
    assert ids[:1] == [IM_START] and ids[-1] == BOI


def test_image_generation_prompt_without_chat_template_is_raw_prompt_plus_boi(processor):
    ids = processor(text="a red fox", generation_mode="image", use_chat_template=False)["input_ids"][0]
    assert ids == _text_ids(processor, "a red fox") + [BOI]


def test_image_generation_prompt_already_formatted_is_not_wrapped_twice(processor):
    formatted = "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"
    plain = processor(text="a red fox", generation_mode="image")["input_ids"]
    assert processor(text=formatted, generation_mode="image")["input_ids"] == plain
    assert processor(text=formatted + "<begin_of_image>", generation_mode="image")["input_ids"] == plain


def test_image_generation_through_apply_chat_template_matches_plain_prompt(processor):
    conversation = [{"role": "user", "content": [{"type": "text", "text": "a red fox"}]}]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
        processor_kwargs={"generation_mode": "image"},
    )
    assert inputs["input_ids"] == processor(text="a red fox", generation_mode="image")["input_ids"]


def test_image_generation_mode_rejects_images_and_placeholders(processor, red_image):
    with pytest.raises(ValueError, match="takes no images"):
        processor(text="a fox", images=red_image, generation_mode="image")
    with pytest.raises(ValueError, match="text-only prompts"):
        processor(text="a fox like <image>", generation_mode="image")


def test_unknown_generation_mode_raises_listing_valid_modes(processor):
    with pytest.raises(ValueError, match=r"\['text', 'image'\], got 'audio'"):
        processor(text="hi", generation_mode="audio")


# --- padding ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generation_mode", ["text", "image"])
def test_batches_are_padded_on_the_left(processor, generation_mode):
    prompts = ["a fox", "a small grey cat sleeps on a blue chair near the open window"]
    unpadded = [processor(text=prompt, generation_mode=generation_mode)["input_ids"][0] for prompt in prompts]
    inputs = processor(text=prompts, generation_mode=generation_mode, return_tensors="pt")
    short, long = unpadded
    num_pad = len(long) - len(short)
    assert num_pad > 0
    assert inputs["input_ids"].tolist() == [[PAD] * num_pad + short, long]
    assert inputs["attention_mask"].tolist() == [[0] * num_pad + [1] * len(short), [1] * len(long)]


def test_padding_side_right_can_be_asked_per_call(processor):
    inputs = processor(text=["a", "a red fox jumps"], padding_side="right", return_tensors="pt")
    assert inputs["attention_mask"][0, 0] == 1 and inputs["attention_mask"][0, -1] == 0
    assert processor.tokenizer.padding_side == "left"


# --- chat template ----------------------------------------------------------------------------------------------


def test_chat_template_renders_chatml_with_an_image_placeholder(processor, red_image):
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": red_image}, {"type": "text", "text": "What is it?"}]},
    ]
    rendered = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<image>What is it?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_apply_chat_template_with_an_image_gives_expanded_ids_and_pixel_values(processor, red_image):
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": red_image}, {"type": "text", "text": "What is it?"}]}
    ]
    inputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = (
        [IM_START] + _text_ids(processor, "user\n") + EXPANDED_IMAGE + _text_ids(processor, "What is it?")
        + [IM_END] + _text_ids(processor, "\n") + [IM_START] + _text_ids(processor, "assistant\n")
    )
    assert inputs["input_ids"].tolist() == [expected]
    expected_pixels = processor.image_processor(red_image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], expected_pixels, rtol=0, atol=0)


def test_apply_chat_template_loads_an_image_from_a_path(processor, red_image, tmp_path):
    path = tmp_path / "red.png"
    red_image.save(path)
    conversation = [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "?"}]}]
    inputs = processor.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt")
    assert inputs["input_ids"][0].tolist().count(IMAGE) == GRID
    expected_pixels = processor.image_processor(red_image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], expected_pixels, rtol=0, atol=0)


def test_assistant_tokens_mask_covers_the_reply_and_its_end_marker(processor, red_image):
    conversation = [
        {"role": "user", "content": [{"type": "image", "image": red_image}, {"type": "text", "text": "What?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red fox."}]},
    ]
    inputs = processor.apply_chat_template(
        conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = inputs["input_ids"][0], inputs["assistant_masks"][0]
    assert [token for token, keep in zip(ids, mask) if keep] == _text_ids(processor, "A red fox.") + [IM_END]


def test_default_chat_template_follows_a_custom_image_token():
    assert "'<img>'" in default_chat_template("<img>") and "'<image>'" not in default_chat_template("<img>")


# --- post-processing --------------------------------------------------------------------------------------------


def test_post_process_image_text_to_text_decodes_a_batch_without_special_tokens(processor):
    texts = ["a red fox", "the dog"]
    ids = processor(text=texts, return_tensors="pt")["input_ids"]
    generated = torch.cat([ids, torch.tensor([[IM_END], [PAD]])], dim=1)
    assert processor.post_process_image_text_to_text(generated) == texts
    assert processor.post_process_multimodal_output(generated, generation_mode="text") == texts
    assert processor.post_process_image_text_to_text(generated[1]) == ["the dog"]
    with_special = processor.post_process_image_text_to_text(generated, skip_special_tokens=False)
    assert with_special[1].endswith("<|endoftext|>")


def test_post_process_multimodal_output_turns_decoded_images_into_pil(processor):
    images = torch.stack([torch.full((3, 64, 64), -1.0), torch.full((3, 64, 64), 1.0)])
    pil_images = processor.post_process_multimodal_output(images, generation_mode="image")
    assert len(pil_images) == 2
    assert all(isinstance(image, PIL.Image.Image) and image.size == (64, 64) for image in pil_images)
    assert np.asarray(pil_images[0]).max() == 0 and np.asarray(pil_images[1]).min() == 255
    assert [np.asarray(image).tolist() for image in processor.postprocess(images)] == [
        np.asarray(image).tolist() for image in pil_images
    ]


def test_post_process_image_mode_rejects_codes_and_unknown_modes(processor):
    with pytest.raises(ValueError, match="decode_image_tokens"):
        processor.post_process_multimodal_output(torch.zeros(1, 8, 8, 4, dtype=torch.long), generation_mode="image")
    with pytest.raises(ValueError, match="'audio'"):
        processor.post_process_multimodal_output(torch.zeros(1, 3), generation_mode="audio")


def test_decode_and_batch_decode_forward_to_the_tokenizer(processor):
    ids = processor(text=["a red fox"])["input_ids"]
    assert processor.batch_decode(ids) == processor.tokenizer.batch_decode(ids) == ["a red fox"]
    assert processor.decode(ids[0]) == "a red fox"


# --- construction and validation --------------------------------------------------------------------------------


def test_token_missing_from_the_tokenizer_raises_naming_it():
    with pytest.raises(ValueError, match="'<img>' is not an added token"):
        DualTokenProcessor(
            DualTokenImageProcessor.from_preset("tiny"), build_tiny_text_tokenizer(), num_image_tokens=64,
            image_token="<img>",
        )


@pytest.mark.parametrize("num_image_tokens", [0, -1, 2.5, True])
def test_non_positive_int_num_image_tokens_raises(num_image_tokens):
    with pytest.raises(ValueError, match="num_image_tokens must be a positive int"):
        DualTokenProcessor(
            DualTokenImageProcessor.from_preset("tiny"), build_tiny_text_tokenizer(), num_image_tokens=num_image_tokens
        )


# --- serialization and remote code ------------------------------------------------------------------------------


def _saved_inputs(processor, image):
    return processor(text=["<image> what is it?", "a red fox <image>"], images=[image, image], return_tensors="pt")


def test_save_pretrained_writes_the_processor_config(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["num_image_tokens"] == GRID
    assert (config["image_token"], config["boi_token"], config["eoi_token"]) == (
        "<image>", "<begin_of_image>", "<end_of_image>"
    )
    assert config["processor_class"] == "DualTokenProcessor"
    assert config["image_processor"]["crop_size"] == {"height": 64, "width": 64}
    assert (tmp_path / "chat_template.jinja").read_text() == processor.chat_template


def test_from_pretrained_gives_identical_inputs(processor, red_image, tmp_path):
    processor.save_pretrained(tmp_path)
    reloaded = DualTokenProcessor.from_pretrained(tmp_path)
    assert reloaded.chat_template == processor.chat_template
    assert reloaded.num_image_tokens == GRID and reloaded.tokenizer.padding_side == "left"
    expected, actual = _saved_inputs(processor, red_image), _saved_inputs(reloaded, red_image)
    assert actual.keys() == expected.keys()
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    image_prompt = processor(text=["a fox", "a red fox"], generation_mode="image")
    assert reloaded(text=["a fox", "a red fox"], generation_mode="image")["input_ids"] == image_prompt["input_ids"]


def test_module_imports_only_hub_safe_libraries_and_its_sibling():
    source = Path(processing_module.__file__).read_text()
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert (node.level, node.module) == (1, "image_processing_dualtoken"), node.module
            else:
                imported.add(node.module.split(".")[0])
    assert imported <= {"os", "numpy", "PIL", "torch", "transformers"}, imported


def test_module_copied_with_its_sibling_loads_as_remote_code(processor, red_image, tmp_path):
    shutil.copy(processing_module.__file__, tmp_path / "processing_dualtoken.py")
    shutil.copy(image_processing_module.__file__, tmp_path / "image_processing_dualtoken.py")
    shutil.copy(configuration_module.__file__, tmp_path / "configuration_dualtoken.py")
    processor.save_pretrained(tmp_path)
    # What AutoProcessor does with an `auto_map` entry and trust_remote_code=True.
    remote_class = get_class_from_dynamic_module("processing_dualtoken.DualTokenProcessor", tmp_path)
    assert remote_class.__module__.startswith("transformers_modules")
    remote = remote_class.from_pretrained(tmp_path)
    expected, actual = _saved_inputs(processor, red_image), _saved_inputs(remote, red_image)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


@pytest.mark.slow
def test_auto_processor_loads_the_saved_folder_without_the_package(processor, red_image, tmp_path):
    # `dualtoken_hf/__init__.py` registers the processor for AutoProcessor; repeated here so that the test states it.
    DualTokenProcessor.register_for_auto_class()
    folder = tmp_path / "folder"
    processor.save_pretrained(folder)
    assert json.loads((folder / "processor_config.json").read_text())["auto_map"] == {
        "AutoProcessor": "processing_dualtoken.DualTokenProcessor"
    }
    assert (folder / "processing_dualtoken.py").is_file() and (folder / "image_processing_dualtoken.py").is_file()
    red_image.save(tmp_path / "red.png")
    torch.save(dict(_saved_inputs(processor, red_image)), tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch, PIL.Image
        sys.modules["dualtoken_hf"] = None  # makes `import dualtoken_hf` fail, as where it is not installed
        from transformers import AutoProcessor
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
        image = PIL.Image.open({str(tmp_path / "red.png")!r}).convert("RGB")
        text = ["<image> what is it?", "a red fox <image>"]
        inputs = processor(text=text, images=[image, image], return_tensors="pt")
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        assert all(torch.equal(inputs[key], expected[key]) for key in expected), "inputs differ"
        print("REMOTE-OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert "REMOTE-OK" in result.stdout, result.stderr[-3000:]
