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


def layer_norm(x: torch.Tensor, norm) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], norm.weight, norm.bias, norm.eps)


def reference_depth_logits(model, branch: str, hidden: torch.Tensor, codes: torch.LongTensor) -> torch.Tensor:
    """A from-scratch depth head (eq. 5, RQ-Transformer): `(N, D, K)` logits of N positions with teacher-forced codes
    `(N, D)`. Slot 1 reads the LLM hidden state, slot d > 1 the sum of the codebook rows of the codes at depths < d;
    then pre-LayerNorm layers of causal softmax attention and a tanh-GELU MLP, a final LayerNorm and one classifier
    per depth. Only the head's weights are shared with the model; none of its code runs."""
    head = model.pixel_head if branch == "pixel" else model.semantic_head
    quantizer = model.vision_tokenizer.quantizer(branch)
    assert model.config.depth_head_config.hidden_act == "gelu_pytorch_tanh"
    depth, num_heads = codes.shape[1], model.config.depth_head_config.num_attention_heads

    def codebook_row(d: int) -> torch.Tensor:
        return quantizer.codebook[0 if quantizer.shared_codebook else d][codes[:, d]]

    slots, prefix_sum = [F.linear(hidden, head.input_projection.weight, head.input_projection.bias)], 0
    for d in range(1, depth):
        prefix_sum = prefix_sum + codebook_row(d - 1)
        slots.append(F.linear(prefix_sum, head.code_projection.weight, head.code_projection.bias))
    x = torch.stack(slots, dim=1) + head.slot_embeddings.weight[:depth]
    n, _, width = x.shape
    causal = torch.ones(depth, depth, dtype=torch.bool).tril()
    for layer in head.layers:
        qkv = F.linear(layer_norm(x, layer.attention_norm), layer.attention.qkv.weight, layer.attention.qkv.bias)
        query, key, value = qkv.view(n, depth, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)
        scores = (query @ key.transpose(-1, -2)) / (width // num_heads) ** 0.5
        attended = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1) @ value
        attended = attended.transpose(1, 2).reshape(n, depth, width)
        x = x + F.linear(attended, layer.attention.out.weight, layer.attention.out.bias)
        mlp = layer.mlp
        inner = F.gelu(F.linear(layer_norm(x, layer.mlp_norm), mlp.fc1.weight, mlp.fc1.bias), approximate="tanh")
        x = x + F.linear(inner, mlp.fc2.weight, mlp.fc2.bias)
    x = layer_norm(x, head.norm)
    return torch.stack([F.linear(x[:, d], c.weight, c.bias) for d, c in enumerate(head.classifiers)], dim=1)


def teacher_forced_logits(model, prompt: torch.LongTensor, pixel_codes, semantic_codes) -> dict[str, torch.Tensor]:
    """Depth-head logits `(positions, D, K)` per branch of one generated image, recomputed in a single pass: the
    prompt then the image's code embeddings; the begin-of-image state predicts position 0, position p predicts p+1."""
    config = model.config
    image = torch.full((1, config.num_image_tokens), config.image_token_id)
    input_ids = torch.cat((prompt, image), dim=1)
    with torch.no_grad():
        embeds, _, _ = model.embed_inputs(input_ids, pixel_codes=pixel_codes, semantic_codes=semantic_codes)
        hidden = model.language_model(inputs_embeds=embeds).last_hidden_state[0, prompt.shape[1] - 1 : -1]
        return {
            branch: reference_depth_logits(model, branch, hidden, codes.flatten(0, 2))
            for branch, codes in (("pixel", pixel_codes), ("semantic", semantic_codes))
        }


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


def hand_computed_negative_log_likelihoods(model, input_ids, labels, pixel_codes, semantic_codes) -> dict:
    """Per-target negative log-likelihoods of eq. 7 (text) and eq. 8 (image, summed over depth), from the text logits
    and a from-scratch depth head: text targets are labels that are neither -100 nor the placeholder, image targets
    are placeholder positions labelled with the placeholder, each predicted from the position before it."""
    config = model.config
    with torch.no_grad():
        embeds, _, _ = model.embed_inputs(input_ids, pixel_codes=pixel_codes, semantic_codes=semantic_codes)
        hidden = model.language_model(inputs_embeds=embeds).last_hidden_state
        log_probs = model.lm_head(hidden).float().log_softmax(dim=-1)
    nll = {"text": [], "pixel": [], "semantic": []}
    placeholder = 0  # index of the next image position, in the order images fill the placeholders
    for row, column in torch.cartesian_prod(torch.arange(input_ids.shape[0]), torch.arange(input_ids.shape[1])):
        label = labels[row, column].item()
        if input_ids[row, column] == config.image_token_id:
            if label == config.image_token_id:
                for branch, codes in (("pixel", pixel_codes), ("semantic", semantic_codes)):
                    target = codes.flatten(0, 2)[placeholder : placeholder + 1]
                    with torch.no_grad():
                        logits = reference_depth_logits(model, branch, hidden[row, column - 1][None], target)[0]
                    nll[branch].append(-logits.float().log_softmax(dim=-1).gather(1, target.T).sum())
            placeholder += 1
        elif column > 0 and label != -100:
            nll["text"].append(-log_probs[row, column - 1, label])
    return {name: torch.stack(values) for name, values in nll.items()}


def generation_and_understanding_batch(config):
    """Row 0 generates its image (labels = input ids); row 1 reads its image (-100 there) and answers in text."""
    input_ids = torch.cat((image_sequence(config, text_before=(41, 42, 43)), image_sequence(config)))
    labels = input_ids.clone()
    labels[1][input_ids[1] == config.image_token_id] = -100
    return input_ids, labels


@pytest.fixture(scope="module")
def two_images():
    return torch.rand(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(7)) * 2 - 1


def test_default_loss_is_eq_6_one_sum_over_every_target_divided_by_the_target_positions(model, two_images):
    input_ids, labels = generation_and_understanding_batch(model.config)
    pixel_codes, semantic_codes = model.encode_images(two_images)
    nll = hand_computed_negative_log_likelihoods(model, input_ids, labels, pixel_codes, semantic_codes)
    num_text, num_image = len(nll["text"]), len(nll["pixel"])
    assert (num_text, num_image) == (6 + 6, 16)  # the understanding row's image positions are inputs only
    with torch.no_grad():
        output = model(input_ids=input_ids, pixel_codes=pixel_codes, semantic_codes=semantic_codes, labels=labels)
    assert model.config.loss_reduction == "sequence"
    expected = (nll["text"].sum() + nll["pixel"].sum() + nll["semantic"].sum()) / (num_text + num_image)
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-5)
    # The per-term means are still reported, and the loss is their average weighted by target counts.
    for name in ("text", "pixel", "semantic"):
        torch.testing.assert_close(getattr(output, f"{name}_loss"), nll[name].mean(), rtol=1e-5, atol=1e-5)
    weighted = (num_text * output.text_loss + num_image * (output.pixel_loss + output.semantic_loss))
    torch.testing.assert_close(output.loss, weighted / (num_text + num_image))
    assert not torch.isclose(output.loss, output.text_loss + output.pixel_loss + output.semantic_loss)


def test_per_term_loss_reduction_adds_the_text_pixel_and_semantic_means(model, two_images, monkeypatch):
    input_ids, labels = generation_and_understanding_batch(model.config)
    pixel_codes, semantic_codes = model.encode_images(two_images)
    nll = hand_computed_negative_log_likelihoods(model, input_ids, labels, pixel_codes, semantic_codes)
    monkeypatch.setattr(model.config, "loss_reduction", "per_term")
    with torch.no_grad():
        output = model(input_ids=input_ids, pixel_codes=pixel_codes, semantic_codes=semantic_codes, labels=labels)
    expected = nll["text"].mean() + nll["pixel"].mean() + nll["semantic"].mean()
    torch.testing.assert_close(output.loss, expected, rtol=1e-5, atol=1e-5)


def test_unknown_loss_reduction_is_rejected():
    with pytest.raises(ValueError, match="loss_reduction must be one of"):
        DualTokenConfig.from_preset("tiny", loss_reduction="mean")


def test_depth_head_matches_a_from_scratch_eq_5_reference(model):
    """Teacher-forced logits equal the reference's; greedy sampling (cached or recomputed slots) picks, at every
    depth, the reference's argmax given the codes it picked before."""
    generator = torch.Generator().manual_seed(9)
    hidden = torch.randn(5, model.config.text_config.hidden_size, generator=generator)
    for branch in ("pixel", "semantic"):
        head, quantizer = getattr(model, f"{branch}_head"), model.vision_tokenizer.quantizer(branch)
        codes = torch.randint(0, quantizer.codebook_size, (5, quantizer.depth), generator=generator)
        embeddings = model.vision_tokenizer.embed_codes(codes[:, None, None], branch, per_depth=True)[:, 0, 0]
        with torch.no_grad():
            expected = reference_depth_logits(model, branch, hidden, codes)
            torch.testing.assert_close(head(hidden, embeddings), expected, rtol=1e-5, atol=1e-5)
            for use_cache in (True, False):
                greedy, embedding_sum = head.sample(hidden, lambda d, logits: logits.argmax(dim=-1),
                                                    quantizer.embed_codes_at_depth, use_cache=use_cache)
                assert torch.equal(greedy, reference_depth_logits(model, branch, hidden, greedy).argmax(dim=-1))
                torch.testing.assert_close(embedding_sum, quantizer.embed_codes(greedy[:, None, None])[:, 0, 0])


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
    images = model.decode_image_tokens(output)
    assert images.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    # Only the pixel codes reach the pixels, through the tokenizer's decoder.
    with torch.no_grad():
        expected = model.vision_tokenizer.pixel_decoder(model.vision_tokenizer.embed_codes(output.pixel_codes)).sample
    torch.testing.assert_close(images, expected)
    assert not torch.allclose(images[0], images[1])


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


def test_guidance_mixes_conditional_and_unconditional_logits_at_every_depth(model):
    """CFG at s = 3: every code is the argmax of cond + (s - 1)(cond - uncond), with both logits recomputed in one
    teacher-forced pass over the prompt (conditional) or padding + begin-of-image (unconditional)."""
    scale, config = 3.0, model.config
    prompt = torch.tensor([[21, 22, 23, 24, config.boi_token_id]])
    unconditional = torch.tensor([[config.pad_token_id] * 4 + [config.boi_token_id]])
    output = model.generate(input_ids=prompt, generation_mode="image", guidance_scale=scale, do_sample=False,
                            return_dict_in_generate=True)
    conditional = teacher_forced_logits(model, prompt, output.pixel_codes, output.semantic_codes)
    unconditioned = teacher_forced_logits(model, unconditional, output.pixel_codes, output.semantic_codes)
    for branch in ("pixel", "semantic"):
        codes = output[f"{branch}_codes"].flatten(0, 2)
        guided = conditional[branch] + (scale - 1) * (conditional[branch] - unconditioned[branch])
        assert torch.equal(codes, guided.argmax(dim=-1)), branch
        assert not torch.equal(codes, conditional[branch].argmax(dim=-1)), branch  # guidance did change choices


def test_left_padded_batch_equals_prompts_run_one_by_one(model):
    input_ids, attention_mask = generation_prompts(model.config)
    batched = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_mode="image", do_sample=False)
    for row in range(2):
        keep = attention_mask[row].bool()
        single = model.generate(input_ids=input_ids[row : row + 1, keep], generation_mode="image", do_sample=False)
        assert torch.equal(batched[row : row + 1], single), row


def test_num_images_per_prompt_groups_rows_by_prompt(model):
    one_each = generate_codes(model, do_sample=False)
    assert not torch.equal(one_each[0], one_each[1])
    three_each = generate_codes(model, do_sample=False, num_images_per_prompt=3)
    assert torch.equal(three_each, one_each.repeat_interleave(3, dim=0))  # prompt 0, 0, 0, then prompt 1, 1, 1


def test_per_depth_top_k_and_temperature_apply_at_their_own_depth(model):
    """top_k = 1 at depth 1 and temperature 1e-4 at depth 3 make those depths greedy; depths 0 and 2 still sample."""
    prompt = torch.tensor([[21, 22, 23, 24, model.config.boi_token_id]])
    output = model.generate(input_ids=prompt, generation_mode="image", guidance_scale=0, top_k=[0, 1, 0, 0],
                            temperature=[1.0, 1.0, 1.0, 1e-4], generator=torch.Generator().manual_seed(8),
                            return_dict_in_generate=True)
    logits = teacher_forced_logits(model, prompt, output.pixel_codes, output.semantic_codes)
    greedy = torch.cat([output[f"{b}_codes"].flatten(0, 2) == logits[b].argmax(dim=-1) for b in logits])
    assert greedy[:, [1, 3]].all()
    assert not greedy[:, 0].all() and not greedy[:, 2].all()


def test_per_depth_sampling_settings_need_one_value_per_depth(model):
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
