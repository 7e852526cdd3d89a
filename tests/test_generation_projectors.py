"""The generation projectors of the paper's later version: one Linear-GELU-Linear per branch between the LLM hidden
state and that branch's depth head, on the path of both the losses and image generation, saved with the model, absent
from older configs, and trained by the `generate` and `joint` stages."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModel

from dualtoken_hf import DualTokenConfig, DualTokenForConditionalGeneration, DualTokenVisionConfig
from dualtoken_hf.configuration_dualtoken import BRANCHES
from dualtoken_hf.hub.folders import load_unified
from dualtoken_hf.testing import build_tiny_unified
from dualtoken_hf.training.unified import STAGES, apply_stage, lora_target_modules

from test_train_unified import run, weights


OLD_FORMAT = Path(__file__).parent / "data" / "old_format_configs"
IMAGE_SIZE = 32  # a 4 x 4 grid keeps generation fast
PROJECTORS = ("pixel_generation_projector", "semantic_generation_projector")


def build_model(generation_projector: bool, seed: int = 0) -> DualTokenForConditionalGeneration:
    torch.manual_seed(seed)
    vision_config = DualTokenVisionConfig.from_preset("tiny", siglip_config={"image_size": IMAGE_SIZE})
    config = DualTokenConfig.from_preset("tiny", vision_config=vision_config, generation_projector=generation_projector)
    return DualTokenForConditionalGeneration(config).eval()


def projector_of(model, branch: str):
    return getattr(model, f"{branch}_generation_projector")


def generation_sequence(config) -> torch.LongTensor:
    """A text-to-image training sequence: prompt, begin-of-image, the image positions, end-of-image."""
    image = [config.image_token_id] * config.num_image_tokens
    return torch.tensor([[21, 22, 23, config.boi_token_id, *image, config.eoi_token_id]])


def random_codes(model, seed: int = 0) -> dict[str, torch.LongTensor]:
    generator = torch.Generator().manual_seed(seed)
    side = model.config.vision_config.grid_size
    codes = {}
    for branch in BRANCHES:
        quantizer = model.config.vision_config.quantizer_config(branch)
        codes[branch] = torch.randint(quantizer.codebook_size, (1, side, side, quantizer.depth), generator=generator)
    return codes


def reference_head_logits(model, input_ids, codes, head_input) -> dict[str, torch.Tensor]:
    """Teacher-forced depth-head logits `(positions, D, K)` per branch, each image position predicted from the
    hidden state before it, with `head_input(branch, hidden)` between the LLM and the head."""
    image_positions = (input_ids[0] == model.config.image_token_id).nonzero().squeeze(1)
    with torch.no_grad():
        embeds, _, _ = model.embed_inputs(input_ids, pixel_codes=codes["pixel"], semantic_codes=codes["semantic"])
        hidden = model.language_model(inputs_embeds=embeds).last_hidden_state[0, image_positions - 1]
        logits = {}
        for branch in BRANCHES:
            embeddings = model.vision_tokenizer.embed_codes(codes[branch], branch, per_depth=True).flatten(0, 2)
            head = model.pixel_head if branch == "pixel" else model.semantic_head
            logits[branch] = head(head_input(branch, hidden), embeddings)
    return logits


def reference_losses(model, input_ids, codes, head_input) -> dict[str, torch.Tensor]:
    logits = reference_head_logits(model, input_ids, codes, head_input)
    return {
        branch: F.cross_entropy(logits[branch].flatten(0, 1), codes[branch].flatten(), reduction="none")
        .view(-1, codes[branch].shape[-1])
        .sum(dim=1)
        .mean()
        for branch in BRANCHES
    }


def image_losses(model, input_ids, codes) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        output = model(input_ids, pixel_codes=codes["pixel"], semantic_codes=codes["semantic"], labels=input_ids)
    return {branch: getattr(output, f"{branch}_loss") for branch in BRANCHES}


def generate(model, **kwargs) -> dict[str, torch.LongTensor]:
    config = model.config
    prompt = torch.tensor([[21, 22, 23, config.boi_token_id]])
    output = model.generate(prompt, generation_mode="image", return_dict_in_generate=True, **kwargs)
    return {"pixel": output.pixel_codes, "semantic": output.semantic_codes}


@pytest.fixture(scope="module")
def model():
    return build_model(generation_projector=True)


def test_the_projectors_exist_only_when_the_config_asks_for_them(model):
    without = build_model(generation_projector=False)
    assert not any(hasattr(without, name) for name in PROJECTORS)
    assert not any("generation_projector" in key for key in without.state_dict())
    hidden_size = model.config.text_config.hidden_size
    extra = {key for key in model.state_dict() if key not in without.state_dict()}
    assert extra == {f"{name}.{layer}.{kind}" for name in PROJECTORS for layer in ("linear_1", "linear_2")
                     for kind in ("weight", "bias")}
    assert model.pixel_generation_projector.linear_1.weight.shape == (hidden_size, hidden_size)
    assert DualTokenConfig.from_preset("dualtoken-3b").generation_projector
    assert not DualTokenConfig.from_preset("tiny").generation_projector


def test_an_old_config_loads_without_projectors():
    config = DualTokenConfig.from_pretrained(OLD_FORMAT / "unified_tiny")
    assert config.generation_projector is False
    with torch.device("meta"):
        model = DualTokenForConditionalGeneration(config)
    assert not any("generation_projector" in key for key in model.state_dict())


def test_the_losses_go_through_the_projectors(model):
    input_ids, codes = generation_sequence(model.config), random_codes(model)
    losses = image_losses(model, input_ids, codes)
    expected = reference_losses(model, input_ids, codes, lambda branch, hidden: projector_of(model, branch)(hidden))
    unprojected = reference_losses(model, input_ids, codes, lambda branch, hidden: hidden)
    for branch in BRANCHES:
        torch.testing.assert_close(losses[branch], expected[branch])
        assert not torch.allclose(losses[branch], unprojected[branch])


def test_without_projectors_the_hidden_state_feeds_the_heads_directly():
    model = build_model(generation_projector=False)
    input_ids, codes = generation_sequence(model.config), random_codes(model)
    losses = image_losses(model, input_ids, codes)
    expected = reference_losses(model, input_ids, codes, lambda branch, hidden: hidden)
    for branch in BRANCHES:
        torch.testing.assert_close(losses[branch], expected[branch])


def test_changing_one_projector_changes_that_branch_s_loss_and_the_generated_codes(model):
    input_ids, codes = generation_sequence(model.config), random_codes(model)
    losses = image_losses(model, input_ids, codes)
    generated = generate(model, generator=torch.Generator().manual_seed(0))
    changed = build_model(generation_projector=True)
    with torch.no_grad():
        changed.pixel_generation_projector.linear_2.weight.mul_(-3.0)
    changed_losses = image_losses(changed, input_ids, codes)
    assert not torch.allclose(changed_losses["pixel"], losses["pixel"])
    torch.testing.assert_close(changed_losses["semantic"], losses["semantic"])  # the heads are independent
    changed_codes = generate(changed, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(changed_codes["pixel"], generated["pixel"])


def test_greedy_generation_picks_the_codes_the_projected_training_path_ranks_first(model):
    generated = generate(model, do_sample=False, guidance_scale=0)
    config = model.config
    image = [config.image_token_id] * config.num_image_tokens
    input_ids = torch.tensor([[21, 22, 23, config.boi_token_id, *image]])
    logits = reference_head_logits(model, input_ids, generated, lambda b, hidden: projector_of(model, b)(hidden))
    for branch in BRANCHES:
        assert torch.equal(logits[branch].argmax(dim=-1), generated[branch].flatten(0, 2))


def test_a_saved_folder_reloads_its_projectors_through_remote_code(tmp_path):
    folder = build_tiny_unified(tmp_path / "tiny", generation_projector=True)
    remote = AutoModel.from_pretrained(folder, trust_remote_code=True)
    # With this package imported AutoModel takes its registered class; the folder's remote code is the same source.
    assert "DualTokenGenerationProjector" in (Path(folder) / "modeling_dualtoken.py").read_text()
    saved = {}
    for shard in Path(folder).glob("*.safetensors"):
        saved.update(load_file(shard))
    for key in (key for key in remote.state_dict() if "generation_projector" in key):
        assert torch.equal(remote.state_dict()[key], saved[key]), key
    local = load_unified(folder)
    assert remote.config.generation_projector and local.config.generation_projector
    for key, value in local.state_dict().items():
        assert torch.equal(remote.state_dict()[key], value), key
    input_ids, codes = generation_sequence(local.config), random_codes(local)
    remote_losses, local_losses = image_losses(remote.eval(), input_ids, codes), image_losses(local, input_ids, codes)
    for branch in BRANCHES:
        assert torch.equal(remote_losses[branch], local_losses[branch])


def test_the_generate_stage_trains_the_projectors_and_heads():
    model = build_model(generation_projector=True)
    trained = apply_stage(model, STAGES["generate"])
    prefixes = (*PROJECTORS, "pixel_head", "semantic_head")
    assert set(trained) == {name for name, _ in model.named_parameters() if name.split(".")[0] in prefixes}
    assert any(name.startswith("pixel_generation_projector.") for name in trained)
    assert {name for name, parameter in model.named_parameters() if parameter.requires_grad} == set(trained)


def test_the_stages_run_on_a_model_without_projectors():
    model = build_model(generation_projector=False)
    trained = apply_stage(model, STAGES["generate"])
    assert set(trained) == {name for name, _ in model.named_parameters() if name.startswith(("pixel_head.",
                                                                                                "semantic_head."))}
    apply_stage(model, STAGES["joint"])
    assert all(parameter.requires_grad for name, parameter in model.named_parameters()
               if not name.startswith("vision_tokenizer."))


def test_a_model_configured_with_projectors_but_missing_them_is_refused():
    model = build_model(generation_projector=True)
    del model.pixel_generation_projector, model.semantic_generation_projector
    with pytest.raises(ValueError, match="generation_projectors"):
        apply_stage(model, STAGES["generate"])


def test_lora_targets_the_projectors_when_present(model):
    pattern = lora_target_modules(model, ("generation_projectors",))
    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    assert {name for name in linear if re.fullmatch(pattern, name)} == {
        f"{name}.{layer}" for name in PROJECTORS for layer in ("linear_1", "linear_2")}
    with pytest.raises(ValueError, match="generation_projectors"):
        lora_target_modules(build_model(generation_projector=False), ("generation_projectors",))


def test_the_generate_stage_changes_the_projectors_and_heads_and_nothing_else(tmp_path, pairs_file):  # noqa: F811
    model_dir = Path(build_tiny_unified(tmp_path / "tiny", generation_projector=True))
    run("generate", model_dir, pairs_file, tmp_path / "out")
    before, after = weights(model_dir), weights(tmp_path / "out")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    prefixes = tuple(f"{prefix}." for prefix in (*PROJECTORS, "pixel_head", "semantic_head"))
    assert changed == {name for name in before if name.startswith(prefixes)}
    assert any(name.startswith("semantic_generation_projector.") for name in changed)
