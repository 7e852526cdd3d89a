"""Bad input fails at the public boundary with a `ValueError` naming the value and the limit: the tokenizer's
`encode`/`decode`, the unified model's `generate`/`decode_image_tokens`, and configs on construction and on load."""

import json
import math

import pytest
import torch

from dualtoken_hf import (
    DualTokenConfig,
    DualTokenForConditionalGeneration,
    DualTokenPixelDecoderConfig,
    DualTokenQuantizerConfig,
    DualTokenVisionConfig,
    DualTokenVisionModel,
)


GRID = 4  # the unified model reads 32 px images: 4 x 4 positions of 4 codes per branch
CONTEXT = 40  # its LLM's max_position_embeddings: prompts of up to 40 - 16 = 24 tokens leave room for an image


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = DualTokenConfig.from_preset(
        "tiny",
        vision_config=DualTokenVisionConfig.from_preset("tiny", siglip_config={"image_size": 8 * GRID}),
        text_config={"max_position_embeddings": CONTEXT},
    )
    return DualTokenForConditionalGeneration(config).eval()


def image_prompt(config, length: int) -> torch.LongTensor:
    """One image-generation prompt of `length` tokens ending with begin-of-image."""
    return torch.tensor([[21] * (length - 1) + [config.boi_token_id]])


# --- DualTokenVisionModel.encode ----------------------------------------------------------------------------------


def _with_one(value: float) -> torch.Tensor:
    pixel_values = torch.zeros(1, 3, 64, 64)
    pixel_values[0, 1, 5, 7] = value
    return pixel_values


@pytest.mark.parametrize(
    "pixel_values, message",
    [
        (torch.zeros(1, 3, 64, 64).numpy(), r"pixel_values must be a torch.Tensor, got ndarray"),
        (torch.zeros(3, 64, 64), r"pixel_values must have 4 dimensions \(batch, 3, 64, 64\), got 3"),
        (torch.zeros(0, 3, 64, 64), r"pixel_values must hold at least one image, got shape \(0, 3, 64, 64\)"),
        (torch.zeros(1, 64, 64, 3), r"shape \(batch, 3, 64, 64\) with 3 channels first, got \(1, 64, 64, 3\)"),
        (torch.zeros(1, 3, 32, 32), r"shape \(batch, 3, 64, 64\) \(64 px is the config's image_size\), got \(1, 3, 32"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r"pixel_values must be a floating-point .* got torch.uint8"),
        (_with_one(math.nan), r"pixel_values must be finite, got NaN or inf"),
        (_with_one(-math.inf), r"pixel_values must be finite, got NaN or inf"),
    ],
    ids=["numpy", "rank-3", "empty-batch", "channels-last", "wrong-size", "uint8", "nan", "inf"],
)
def test_encode_rejects_bad_pixel_values_naming_value_and_limit(tokenizer, pixel_values, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.encode(pixel_values)


def test_encode_accepts_any_float_dtype_and_gives_the_same_codes(tokenizer):
    pixel_values = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        float32 = tokenizer.encode(pixel_values)
        float64 = tokenizer.encode(pixel_values.double())
    assert torch.equal(float32.pixel_codes, float64.pixel_codes)
    assert torch.equal(float32.semantic_codes, float64.semantic_codes)


# --- DualTokenVisionModel.decode / semantic_features_from_codes, and decode_image_tokens --------------------------


@pytest.mark.parametrize(
    "codes, message",
    [
        ([[0] * 4] * 8, r"pixel_codes must be a torch.Tensor \(batch, 8, 8, 4\), got list"),
        (torch.zeros(8, 8, 4, dtype=torch.long), r"pixel_codes must have shape \(batch, 8, 8, 4\) .*got \(8, 8, 4\)"),
        (torch.zeros(1, 4, 4, 4, dtype=torch.long), r"must have shape \(batch, 8, 8, 4\) .*got \(1, 4, 4, 4\)"),
        (torch.zeros(1, 8, 8, 3, dtype=torch.long), r"must have shape \(batch, 8, 8, 4\) .*got \(1, 8, 8, 3\)"),
        (torch.zeros(0, 8, 8, 4, dtype=torch.long), r"with batch >= 1, got \(0, 8, 8, 4\)"),
        (torch.zeros(1, 8, 8, 4), r"pixel_codes must be an integer tensor, got torch.float32"),
        (torch.full((1, 8, 8, 4), -1), r"pixel_codes must be in \[0, 256\), got min -1 and max -1"),
        (torch.full((1, 8, 8, 4), 256), r"pixel_codes must be in \[0, 256\), got min 256 and max 256"),
    ],
    ids=["list", "rank-3", "wrong-grid", "wrong-depth", "empty-batch", "float", "negative", "too-large"],
)
def test_decode_rejects_bad_pixel_codes_naming_value_and_limit(tokenizer, codes, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.decode(codes)


def test_semantic_features_from_codes_names_the_semantic_branch(tokenizer):
    codes = torch.zeros(1, 8, 8, 4, dtype=torch.long)
    codes[0, 3, 3, 2] = 300
    with pytest.raises(ValueError, match=r"semantic_codes must be in \[0, 256\), got min 0 and max 300"):
        tokenizer.semantic_features_from_codes(codes)


def test_codes_at_the_limits_of_the_codebook_still_decode(tokenizer):
    codes = torch.zeros(1, 8, 8, 4, dtype=torch.long)
    codes[0, :, 4:] = 255
    with torch.no_grad():
        decoded = tokenizer.decode(codes)
        expected = tokenizer.decode_embeddings(tokenizer.embed_codes(codes, "pixel"))
    torch.testing.assert_close(decoded, expected, rtol=0, atol=0)


def test_decode_image_tokens_rejects_codes_of_another_grid_or_codebook(model):
    with pytest.raises(ValueError, match=rf"pixel_codes must have shape \(batch, {GRID}, {GRID}, 4\)"):
        model.decode_image_tokens(torch.zeros(1, 8, 8, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pixel_codes must be in \[0, 256\), got min 0 and max 4096"):
        model.decode_image_tokens(torch.tensor([0, 4096]).repeat(8)[None].view(1, GRID, GRID, 1).repeat(1, 1, 1, 4))


# --- DualTokenForConditionalGeneration.generate -------------------------------------------------------------------


@pytest.fixture
def llm_calls(model):
    """How many times the LLM ran during the test: the checks must come before the prefill."""
    calls = []
    handle = model.language_model.register_forward_pre_hook(lambda module, args: calls.append(1))
    yield calls
    handle.remove()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"guidance_scale": -1.0}, r"guidance_scale must be a finite number >= 0, got -1.0"),
        ({"guidance_scale": math.nan}, r"guidance_scale must be a finite number >= 0, got nan"),
        ({"temperature": 0.0}, r"temperature must be a finite number > 0 .*got 0.0"),
        ({"temperature": -0.5}, r"temperature must be a finite number > 0 .*got -0.5"),
        ({"temperature": math.nan}, r"temperature must be a finite number > 0 .*got nan"),
        ({"temperature": [1.0, math.inf, 1.0, 1.0]}, r"temperature\[1\] must be a finite number > 0 .*got inf"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\] .*got 0.0"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\] .*got 1.5"),
        ({"top_p": [0.9, 0.9, 0.9, math.nan]}, r"top_p\[3\] must be in \(0, 1\] .*got nan"),
        ({"top_k": -1}, r"top_k must be an int >= 0 .*got -1"),
        ({"top_k": 2.5}, r"top_k must be an int >= 0 .*got 2.5"),
        ({"top_k": [0, 10, -3, 10]}, r"top_k\[2\] must be an int >= 0 .*got -3"),
        ({"top_k": [10, 10]}, r"top_k needs one value per depth \(4\), got 2"),
        ({"num_images_per_prompt": 0}, r"num_images_per_prompt must be an int >= 1, got 0"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_image_generation_rejects_bad_sampling_settings_before_running_the_llm(model, llm_calls, settings, message):
    with pytest.raises(ValueError, match=message):
        model.generate(input_ids=image_prompt(model.config, 5), generation_mode="image", **settings)
    assert llm_calls == []


def test_image_generation_rejects_a_guidance_scale_from_the_generation_config(model, llm_calls):
    config = model.generation_config.__class__(guidance_scale=-2.0)
    with pytest.raises(ValueError, match=r"guidance_scale must be a finite number >= 0, got -2.0"):
        model.generate(input_ids=image_prompt(model.config, 5), generation_mode="image", generation_config=config)
    assert llm_calls == []


def test_settings_at_their_limits_sample_like_no_warping(model):
    prompt = image_prompt(model.config, 5)

    def sample(**settings):
        generator = torch.Generator().manual_seed(3)
        return model.generate(
            input_ids=prompt, generation_mode="image", guidance_scale=0.0, generator=generator, **settings
        )

    plain = sample()
    assert torch.equal(sample(top_p=1.0, top_k=0, temperature=[1.0] * 4), plain)
    assert torch.equal(sample(top_p=[1, 1, 1, 1], top_k=[0, 0, 0, 0]), plain)


def test_image_generation_prompts_must_leave_room_for_an_image(model, llm_calls):
    num_positions = GRID * GRID
    longest = CONTEXT - num_positions
    with pytest.raises(
        ValueError,
        match=rf"room for an image of {num_positions} positions in the context of {CONTEXT} .*got a prompt of "
        rf"{longest + 1} tokens; shorten prompts to at most {longest} tokens",
    ):
        model.generate(input_ids=image_prompt(model.config, longest + 1), generation_mode="image")
    assert llm_calls == []
    codes = model.generate(input_ids=image_prompt(model.config, longest), generation_mode="image", do_sample=False)
    assert codes.shape == (1, GRID, GRID, 4) and 0 <= codes.min() and codes.max() < 256


def test_left_padding_does_not_count_against_the_context(model):
    config = model.config
    prompt = image_prompt(config, CONTEXT - GRID * GRID)
    padded = torch.cat((torch.full((1, 3), config.pad_token_id), prompt), dim=1)
    attention_mask = torch.cat((torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt)), dim=1)
    codes = model.generate(input_ids=padded, attention_mask=attention_mask, generation_mode="image", do_sample=False)
    assert torch.equal(codes, model.generate(input_ids=prompt, generation_mode="image", do_sample=False))


def test_image_generation_prompts_must_not_hold_image_placeholders(model, llm_calls):
    prompt = image_prompt(model.config, 6)
    prompt[0, 2] = model.config.image_token_id
    with pytest.raises(ValueError, match=r"takes text-only prompts, but input_ids hold 1 image placeholder"):
        model.generate(input_ids=prompt, generation_mode="image")
    assert llm_calls == []


def test_text_generation_rejects_more_images_than_placeholders_before_generating(model, llm_calls):
    config = model.config
    image = [config.boi_token_id] + [config.image_token_id] * GRID * GRID + [config.eoi_token_id]
    input_ids = torch.tensor([[11, *image]])
    two_images = torch.zeros(2, 3, 8 * GRID, 8 * GRID)
    with pytest.raises(ValueError, match=r"hold 16 image placeholder tokens but the images give 32 positions"):
        model.generate(input_ids=input_ids, pixel_values=two_images, max_new_tokens=3)
    assert llm_calls == []


# --- configs --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: DualTokenQuantizerConfig(codebook_size=2**24 + 1), r"codebook_size must be at most 16777216, got"),
        (lambda: DualTokenQuantizerConfig(depth=65), r"DualTokenQuantizerConfig.depth must be at most 64, got 65"),
        (lambda: DualTokenQuantizerConfig(code_dim=-4), r"QuantizerConfig.code_dim must be at least 1, got -4"),
        (
            lambda: DualTokenPixelDecoderConfig(block_out_channels=[32, 48]),
            r"block_out_channels\[1\] \(48\) must be a multiple of norm_num_groups \(32\)",
        ),
        (
            lambda: DualTokenPixelDecoderConfig(decoder_in_channels=100),
            r"decoder_in_channels \(100\) must be a multiple of norm_num_groups \(32\)",
        ),
    ],
    ids=["huge-codebook", "deep", "negative-width", "decoder-groups", "decoder-input-groups"],
)
def test_impossible_sub_configs_are_rejected(build, message):
    with pytest.raises(ValueError, match=message):
        build()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"siglip_config": {"hidden_size": 0}}, r"SiglipVisionConfig.hidden_size must be at least 1, got 0"),
        ({"siglip_config": {"num_hidden_layers": 0}}, r"SiglipVisionConfig.num_hidden_layers must be at least 1"),
        ({"siglip_config": {"num_attention_heads": 5}}, r"\(64\) must be a multiple of num_attention_heads \(5\)"),
        ({"siglip_config": {"patch_size": 128}}, r"image_size \(64\) must be at least patch_size \(128\)"),
        ({"siglip_config": {"image_size": 60}}, r"image_size \(60\) must be a multiple of the pixel decoder's"),
        ({"pixel_layer": 0}, r"need 1 <= pixel_layer <= semantic_layer <= num_hidden_layers \(6\), got pixel_layer=0"),
        ({"semantic_layer": 7}, r"num_hidden_layers \(6\), got pixel_layer=2, semantic_layer=7"),
        ({"shortcut_layer": 6}, r"shortcut_layer must be in \[1, semantic_layer=5\], got 6"),
        ({"pixel_quantizer_config": {"code_dim": 24}}, r"the pixel code_dim \(24\) and the SigLIP hidden_size \(64\)"),
        ({"semantic_quantizer_config": {"codebook_size": 0}}, r"codebook_size must be at least 1, got 0"),
        ({"projection_type": "resconv"}, r"pixel code_dim \(16\) must be a multiple of the resconv projection's"),
        (
            {"decoder_config": {"norm_num_groups": 64, "block_out_channels": [64, 64], "decoder_in_channels": 64},
             "siglip_config": {"hidden_size": 96, "num_attention_heads": 4}},
            r"hidden_size \(96\) must be a multiple of decoder_config.norm_num_groups \(64\)",
        ),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else "",
)
def test_impossible_tokenizer_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        DualTokenVisionConfig.from_preset("tiny", **overrides)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_token_id": 512}, r"image_token_id must be in \[0, text_config.vocab_size=512\), got 512"),
        ({"boi_token_id": -1}, r"boi_token_id must be in \[0, text_config.vocab_size=512\), got -1"),
        ({"pad_token_id": 600}, r"pad_token_id must be in \[0, text_config.vocab_size=512\), got 600"),
        ({"eoi_token_id": 510}, r"the image, begin/end-of-image and padding token ids must differ"),
        ({"text_config": {"vocab_size": 256}}, r"image_token_id must be in \[0, text_config.vocab_size=256\), got 509"),
        ({"text_config": {"max_position_embeddings": 65}}, r"max_position_embeddings \(65\) must be at least"),
    ],
    ids=lambda value: json.dumps(value) if isinstance(value, dict) else "",
)
def test_impossible_unified_configs_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        DualTokenConfig.from_preset("tiny", **overrides)


def test_a_unified_config_without_a_padding_token_is_valid():
    assert DualTokenConfig.from_preset("tiny", pad_token_id=None).pad_token_id is None


def test_the_presets_are_valid():
    for name in ("paper", "v2", "tiny"):
        DualTokenVisionConfig.from_preset(name).validate()
    for name in ("dualtoken-3b", "tiny"):
        DualTokenConfig.from_preset(name).validate()


def _edit(path, keys: tuple[str, ...], value):
    config = json.loads(path.read_text())
    node = config
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    "keys, value, message",
    [
        (("vision_config", "pixel_layer"), 99, r"num_hidden_layers \(6\), got pixel_layer=99"),
        (("vision_config", "pixel_quantizer_config", "codebook_size"), 0, r"codebook_size must be at least 1, got 0"),
        (("vision_config", "semantic_quantizer_config", "depth"), 1000, r"depth must be at most 64, got 1000"),
        (("vision_config", "siglip_config", "patch_size"), 0, r"SiglipVisionConfig.patch_size must be at least 1"),
        (("image_token_id",), 100000, r"image_token_id must be in \[0, text_config.vocab_size=512\), got 100000"),
        (("depth_head_config", "num_attention_heads"), 3, r"hidden_size \(64\) must be a multiple of num_attention_he"),
    ],
    ids=["pixel-layer", "codebook-size", "depth", "patch-size", "image-token-id", "depth-head-heads"],
)
def test_an_edited_unified_config_json_fails_at_from_pretrained(tmp_path, keys, value, message):
    DualTokenConfig.from_preset("tiny").save_pretrained(tmp_path)
    _edit(tmp_path / "config.json", keys, value)
    with pytest.raises(ValueError, match=message):
        DualTokenConfig.from_pretrained(tmp_path)


def test_an_edited_tokenizer_config_json_fails_at_model_from_pretrained(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    _edit(tmp_path / "config.json", ("semantic_layer",), 0)
    with pytest.raises(ValueError, match=r"need 1 <= pixel_layer <= semantic_layer .*semantic_layer=0"):
        DualTokenVisionModel.from_pretrained(tmp_path)
