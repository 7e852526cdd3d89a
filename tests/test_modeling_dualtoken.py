"""The unified model: input embedding, eq. 6–8 losses, text and image generation (tiny Qwen2 and Llama LLMs)."""

import pytest
import torch
import torch.nn.functional as F

from transformers import AutoModel

from dualtoken_hf import DualTokenConfig, DualTokenForConditionalGeneration, DualTokenVisionConfig, DualTokenVisionModel


TEXT_CONFIGS = {
    "qwen2": {},
    "llama": {"model_type": "llama"},
}


IMAGE_SIZE = 32  # a 4 x 4 grid: 16 positions per generated image keep the sampling tests fast


def build_model(text_model_type: str = "qwen2", seed: int = 0) -> DualTokenForConditionalGeneration:
    torch.manual_seed(seed)
    vision_config = DualTokenVisionConfig.from_preset("tiny", siglip_config={"image_size": IMAGE_SIZE})
    config = DualTokenConfig.from_preset(
        "tiny", text_config=TEXT_CONFIGS[text_model_type], vision_config=vision_config
    )
    return DualTokenForConditionalGeneration(config).eval()


@pytest.fixture(scope="module", params=sorted(TEXT_CONFIGS))
def model(request):
    return build_model(request.param)


def image_sequence(config, text_before=(11, 12, 13), text_after=(14, 15)) -> torch.LongTensor:
    image = [config.boi_token_id] + [config.image_token_id] * config.num_image_tokens + [config.eoi_token_id]
    return torch.tensor([list(text_before) + image + list(text_after)])


def generation_prompts(config) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Two left-padded prompts of different lengths, each ending with begin-of-image."""
    pad, boi = config.pad_token_id, config.boi_token_id
    input_ids = torch.tensor([[21, 22, 23, 24, boi], [pad, pad, 31, 32, boi]])
    attention_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    return input_ids, attention_mask


@pytest.fixture(scope="module")
def images():
    return torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.slow
def test_dualtoken_3b_preset_sizes_on_the_meta_device():
    with torch.device("meta"):
        model = DualTokenForConditionalGeneration(DualTokenConfig.from_preset("dualtoken-3b"))

    def count(module):
        return sum(p.numel() for p in module.parameters())

    llm = count(model.language_model)  # lm_head is tied to the input embeddings
    tower = count(model.vision_tokenizer.siglip)
    assert 3.0e9 < llm < 3.2e9, llm
    assert 0.40e9 < tower < 0.45e9, tower
    assert model.config.num_image_tokens == 27 * 27
    assert len(model.pixel_head.classifiers) == len(model.semantic_head.classifiers) == 8
    assert model.pixel_head.classifiers[0].out_features == 32768
    assert len(model.pixel_head.layers) == 3


def test_image_positions_get_the_projected_code_embeddings(model, images):
    config = model.config
    input_ids = image_sequence(config)
    pixel_codes, semantic_codes = model.encode_images(images)
    embeds, _, _ = model.embed_inputs(input_ids, pixel_values=images)
    expected = model.embed_image_codes(pixel_codes, semantic_codes).flatten(0, 2)
    image_mask = input_ids[0] == config.image_token_id
    torch.testing.assert_close(embeds[0, image_mask], expected)
    text_embeds = model.get_input_embeddings()(input_ids)
    torch.testing.assert_close(embeds[0, ~image_mask], text_embeds[0, ~image_mask])


def test_pixel_values_and_precomputed_codes_give_the_same_logits(model, images):
    input_ids = image_sequence(model.config)
    pixel_codes, semantic_codes = model.encode_images(images)
    with torch.no_grad():
        from_pixels = model(input_ids=input_ids, pixel_values=images).logits
        from_codes = model(input_ids=input_ids, pixel_codes=pixel_codes, semantic_codes=semantic_codes).logits
    torch.testing.assert_close(from_pixels, from_codes)


def test_placeholder_count_must_match_the_images(model, images):
    input_ids = image_sequence(model.config)[:, :-10]
    with pytest.raises(ValueError, match="placeholder"):
        model(input_ids=input_ids, pixel_values=images)
    with pytest.raises(ValueError, match="placeholder"):
        model(input_ids=image_sequence(model.config))


def test_labels_equal_input_ids_ignore_image_placeholders_in_the_text_loss(model, images):
    input_ids = image_sequence(model.config)
    with torch.no_grad():
        output = model(input_ids=input_ids, pixel_values=images, labels=input_ids)
    targets = input_ids[0, 1:].clone()
    targets[targets == model.config.image_token_id] = -100
    expected = F.cross_entropy(output.logits[0, :-1].float(), targets, ignore_index=-100)
    torch.testing.assert_close(output.text_loss, expected)
    assert output.pixel_loss > 0 and output.semantic_loss > 0
    torch.testing.assert_close(output.loss, output.text_loss + output.pixel_loss + output.semantic_loss)


def test_image_loss_is_the_depth_heads_cross_entropy_summed_over_depths(model, images):
    """eq. 8: position p's codes are predicted from the hidden state at p - 1, every depth teacher-forced."""
    config = model.config
    input_ids = image_sequence(config)
    pixel_codes, semantic_codes = model.encode_images(images)
    with torch.no_grad():
        output = model(input_ids=input_ids, pixel_values=images, labels=input_ids, output_hidden_states=True)
        hidden = model.language_model(inputs_embeds=model.embed_inputs(input_ids, pixel_values=images)[0])
        hidden = hidden.last_hidden_state[0]
        positions = (input_ids[0] == config.image_token_id).nonzero().squeeze(1)
        targets = pixel_codes.flatten(0, 2)
        embeddings = model.vision_tokenizer.embed_codes(pixel_codes, "pixel", per_depth=True).flatten(0, 2)
        logits = model.pixel_head(hidden[positions - 1], embeddings)
    per_depth = [F.cross_entropy(logits[:, d], targets[:, d]) for d in range(targets.shape[1])]
    torch.testing.assert_close(output.pixel_loss, torch.stack(per_depth).sum(), rtol=1e-5, atol=1e-5)


def test_image_positions_with_ignored_labels_are_not_generation_targets(model, images):
    input_ids = image_sequence(model.config)
    labels = input_ids.masked_fill(input_ids == model.config.image_token_id, -100)
    with torch.no_grad():
        output = model(input_ids=input_ids, pixel_values=images, labels=labels)
    assert output.pixel_loss == 0 and output.semantic_loss == 0 and output.text_loss > 0


def test_loss_falls_when_overfitting_understanding_and_generation_samples(images):
    model = build_model().train()
    config = model.config
    understanding = image_sequence(config)
    understanding_labels = understanding.masked_fill(understanding == config.image_token_id, -100)
    generation = image_sequence(config, text_before=(41, 42), text_after=())
    pixel_codes, semantic_codes = model.encode_images(images)
    batches = [
        {"input_ids": understanding, "labels": understanding_labels},
        {"input_ids": generation, "labels": generation},
    ]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(30):
        total = 0.0
        for batch in batches:
            output = model(**batch, pixel_codes=pixel_codes, semantic_codes=semantic_codes)
            output.loss.backward()
            total += output.loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    assert losses[-1] < 0.5 * losses[0], losses
    assert not any(p.grad is not None for p in model.vision_tokenizer.parameters())
    assert not model.vision_tokenizer.training


def test_text_generation_with_an_image_input(model, images):
    input_ids = image_sequence(model.config)
    generated = model.generate(input_ids=input_ids, pixel_values=images, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, input_ids.shape[1] + 4)
    assert torch.equal(generated[:, : input_ids.shape[1]], input_ids)
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=images).logits
    assert generated[0, input_ids.shape[1]] == logits[0, -1].argmax()


def generate_codes(model, seed=0, **kwargs):
    input_ids, attention_mask = generation_prompts(model.config)
    kwargs.setdefault("generator", torch.Generator().manual_seed(seed))
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_mode="image", **kwargs)


def test_generated_codes_are_in_range_and_decode_to_images(model):
    output = generate_codes(model, return_dict_in_generate=True)
    quantizer = model.vision_tokenizer.quantizer("pixel")
    for codes in (output.pixel_codes, output.semantic_codes):
        assert codes.shape == (2, 4, 4, 4)
        assert codes.min() >= 0 and codes.max() < quantizer.codebook_size
    images = model.decode_image_tokens(output.pixel_codes)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and torch.isfinite(images).all()


def test_same_seed_gives_the_same_image_and_another_seed_differs(model):
    assert torch.equal(generate_codes(model, seed=1), generate_codes(model, seed=1))
    assert not torch.equal(generate_codes(model, seed=1), generate_codes(model, seed=2))


def test_cached_and_recomputed_depth_slots_give_identical_codes(model):
    cached = generate_codes(model, seed=3, use_depth_cache=True, return_dict_in_generate=True)
    recomputed = generate_codes(model, seed=3, use_depth_cache=False, return_dict_in_generate=True)
    assert torch.equal(cached.pixel_codes, recomputed.pixel_codes)
    assert torch.equal(cached.semantic_codes, recomputed.semantic_codes)


def test_guidance_scale_one_equals_unguided_sampling(model):
    assert torch.equal(generate_codes(model, seed=4, guidance_scale=1.0), generate_codes(model, seed=4, guidance_scale=0))


def test_guidance_changes_the_samples(model):
    assert not torch.equal(generate_codes(model, seed=4, guidance_scale=3.0), generate_codes(model, seed=4, guidance_scale=0))


def test_left_padded_batch_equals_prompts_run_one_by_one(model):
    input_ids, attention_mask = generation_prompts(model.config)
    batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_mode="image", do_sample=False)
    for row in range(2):
        keep = attention_mask[row].bool()
        single = model.generate(input_ids=input_ids[row : row + 1, keep], generation_mode="image", do_sample=False)
        assert torch.equal(batched[row : row + 1], single), row


def test_num_images_per_prompt_groups_rows_by_prompt(model):
    codes = generate_codes(model, num_images_per_prompt=3)
    assert codes.shape[0] == 6


def test_per_depth_sampling_settings_are_accepted_and_checked(model):
    codes = generate_codes(model, temperature=[1.0, 0.9, 0.8, 0.7], top_k=[0, 50, 20, 10], top_p=0.95)
    assert codes.shape == (2, 4, 4, 4)
    with pytest.raises(ValueError, match="one value per depth"):
        generate_codes(model, temperature=[1.0, 0.9])


def test_top_k_one_is_greedy(model):
    assert torch.equal(generate_codes(model, seed=5, top_k=1), generate_codes(model, seed=6, do_sample=False))


def test_image_generation_needs_prompts_ending_with_begin_of_image(model):
    with pytest.raises(ValueError, match="begin-of-image"):
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), generation_mode="image")
    with pytest.raises(ValueError, match="generation_mode"):
        model.generate(input_ids=torch.tensor([[1, 2, 3]]), generation_mode="video")


def test_progress_callback_counts_every_position(model):
    calls = []
    generate_codes(model, callback=lambda done, total: calls.append((done, total)))
    assert calls == [(p, 16) for p in range(1, 17)]


def test_a_plain_llm_checkpoint_loads_under_the_base_model_prefix(tmp_path):
    config = DualTokenConfig.from_preset("tiny")
    torch.manual_seed(1)
    llm = AutoModel.from_config(config.text_config)
    llm.save_pretrained(tmp_path)
    model = DualTokenForConditionalGeneration.from_pretrained(tmp_path, config=config)
    assert model.base_model is model.language_model
    loaded = model.language_model.state_dict()
    for key, value in llm.state_dict().items():
        assert torch.equal(loaded[key], value), key


def test_the_tokenizer_loads_out_of_a_unified_checkpoint(tmp_path):
    model = build_model(seed=2)
    model.save_pretrained(tmp_path)
    tokenizer = DualTokenVisionModel.from_pretrained(tmp_path, config=model.config.vision_config)
    assert getattr(model, DualTokenVisionModel.base_model_prefix) is model.vision_tokenizer
    loaded = tokenizer.state_dict()
    for key, value in model.vision_tokenizer.state_dict().items():
        assert torch.equal(loaded[key], value), key
