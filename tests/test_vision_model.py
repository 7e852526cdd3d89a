"""DualTokenVisionModel behaviour on tiny configs, and the full-size presets on the meta device."""

import copy
import csv

import pytest
import torch
from transformers import SiglipModel, SiglipConfig, SiglipVisionModel

from conftest import REFERENCE_DIR, require_reference_dir
from dualtoken_hf import DualTokenVisionConfig, DualTokenVisionModel


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny"))


@pytest.fixture
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


def official_unique_numel(version: str) -> int:
    """Elements of the official full-size model without text tower, logit scale/bias, the all-zero key-bias
    buffers, the codebooks' zero padding rows and the per-depth aliases of shared codebooks."""
    total = 0
    with open(REFERENCE_DIR / f"official_keys_fullsize_{version}.tsv") as handle:
        rows = csv.DictReader((line for line in handle if not line.startswith("#")), delimiter="\t")
        for row in rows:
            if row["alias_of"] or row["group"] == "siglip_logit" or row["key"].endswith("zero_k_bias"):
                continue
            numel = int(row["numel"])
            if ".codebooks." in row["key"] and row["key"].endswith(".weight"):
                numel -= int(row["shape"].split("x")[1])
            total += numel
    return total


@pytest.mark.slow
@pytest.mark.parametrize("preset, version", [("paper", "v1"), ("v2", "v2")])
def test_full_size_preset_matches_official_size_and_gives_27x27x8_codes(preset, version):
    require_reference_dir()
    with torch.device("meta"):
        model = DualTokenVisionModel(DualTokenVisionConfig.from_preset(preset)).eval()
        assert sum(t.numel() for t in model.state_dict().values()) == official_unique_numel(version)
        with torch.no_grad():
            encoded = model.encode(torch.zeros(1, 3, 384, 384))
            images = model.decode(encoded.pixel_codes)
    assert encoded.pixel_codes.shape == encoded.semantic_codes.shape == (1, 27, 27, 8)
    assert encoded.pooler_output.shape == (1, 1152)
    assert images.shape == (1, 3, 384, 384)


def test_encode_decode_shapes_and_code_ranges(tiny_model, images):
    tiny_model.eval()
    with torch.no_grad():
        encoded = tiny_model.encode(images)
        decoded = tiny_model.decode(encoded.pixel_codes)
    assert encoded.pixel_codes.shape == encoded.semantic_codes.shape == (2, 8, 8, 4)
    assert encoded.pixel_codes.dtype == torch.long
    for codes in (encoded.pixel_codes, encoded.semantic_codes):
        assert 0 <= codes.min() and codes.max() < 256
    assert decoded.shape == images.shape
    assert encoded.semantic_features.shape == (2, 64, 64)
    assert torch.equal(encoded.commitment_loss, encoded.pixel_commitment_loss + encoded.semantic_commitment_loss)


def test_decode_of_codes_equals_decode_of_straight_through_embeddings(tiny_model, images):
    tiny_model.eval()
    with torch.no_grad():
        output = tiny_model(images)
        decoded = tiny_model.decode(output.pixel_codes)
    torch.testing.assert_close(decoded, output.reconstruction, rtol=1e-4, atol=1e-4)


def test_gradient_reaches_the_tower_through_the_straight_through_path(tiny_model, images):
    tiny_model.train()
    output = tiny_model(images)
    (output.reconstruction_loss + output.commitment_loss).backward()
    first_block = tiny_model.siglip.encoder.layers[0].mlp.fc1.weight.grad
    assert first_block is not None and first_block.abs().sum() > 0
    assert tiny_model.pixel_projection.proj.weight.grad.abs().sum() > 0
    assert not any(buffer.requires_grad for buffer in tiny_model.pixel_quantizer.buffers())


def test_eval_forward_leaves_codebooks_unchanged_and_training_forward_updates_them(tiny_model, images):
    before = copy.deepcopy(tiny_model.pixel_quantizer.state_dict())
    tiny_model.eval()
    with torch.no_grad():
        tiny_model(images)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.pixel_quantizer.state_dict().items())
    tiny_model.train()
    with torch.no_grad():
        tiny_model(images)
    assert not torch.equal(before["codebook"], tiny_model.pixel_quantizer.codebook)


def test_encode_runs_no_block_past_the_semantic_layer_without_feedback(images):
    config = DualTokenVisionConfig.from_preset("tiny", semantic_feedback=False)
    model = DualTokenVisionModel(config).eval()
    calls = []
    for index, layer in enumerate(model.siglip.encoder.layers, start=1):
        layer.register_forward_hook(lambda *_, index=index: calls.append(index))
    with torch.no_grad():
        encoded = model.encode(images)
    assert calls == list(range(1, config.semantic_layer + 1))
    assert encoded.pooler_output.shape == (2, 64)


def test_encode_with_feedback_runs_the_remaining_blocks_on_quantized_semantics(tiny_model, images):
    tiny_model.eval()
    calls = []
    for index, layer in enumerate(tiny_model.siglip.encoder.layers, start=1):
        layer.register_forward_hook(lambda *_, index=index: calls.append(index))
    with torch.no_grad():
        encoded = tiny_model.encode(images, output_hidden_states=True)
    assert calls == list(range(1, 7))
    assert len(encoded.hidden_states) == 7


def test_codes_only_encode_gives_the_same_codes_without_the_blocks_after_the_semantic_layer(tiny_model, images):
    tiny_model.eval()
    calls = []
    for index, layer in enumerate(tiny_model.siglip.encoder.layers, start=1):
        layer.register_forward_hook(lambda *_, index=index: calls.append(index))
    for module in (tiny_model.siglip.post_layernorm, tiny_model.siglip.head, tiny_model.semantic_up_projection):
        module.register_forward_hook(lambda *_: calls.append("after the quantizers"))
    with torch.no_grad():
        full = tiny_model.encode(images)
        calls.clear()
        codes_only = tiny_model.encode(images, codes_only=True)
    assert calls == list(range(1, tiny_model.config.semantic_layer + 1))
    assert torch.equal(codes_only.pixel_codes, full.pixel_codes)
    assert torch.equal(codes_only.semantic_codes, full.semantic_codes)
    assert codes_only.pooler_output is None and codes_only.semantic_features is None


def test_gradient_checkpointing_gives_the_same_gradients(images):
    torch.manual_seed(0)
    plain = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.activation_checkpointing_enable()
    assert checkpointed.is_activation_checkpointing
    for model in (plain, checkpointed):
        torch.manual_seed(1)
        model(images).reconstruction_loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def mean_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected).abs().mean() / expected.abs().mean()).item()


def code_agreement_per_depth(codes: torch.LongTensor, expected: torch.LongTensor) -> torch.Tensor:
    return (codes == expected).float().mean(dim=(0, 1, 2))


# bf16 rounding moves a few latents across a code boundary (measured: >= 96% of codes agree at every depth) and the
# decoder's outputs by ~5% on average; a wrong cast or a lost tensor would give unrelated codes and images.


def test_bfloat16_model_encodes_and_decodes_like_float32(tiny_model, images):
    tiny_model.eval()
    with torch.no_grad():
        expected = tiny_model.encode(images)
        expected_images = tiny_model.decode(expected.pixel_codes)
        model = copy.deepcopy(tiny_model).to(torch.bfloat16)
        encoded = model.encode(images)
        decoded = model.decode(expected.pixel_codes)
    assert encoded.pixel_codes.dtype == torch.long and decoded.dtype == torch.bfloat16
    for branch in ("pixel", "semantic"):
        agreement = code_agreement_per_depth(encoded.branch_codes(branch), expected.branch_codes(branch))
        assert (agreement >= 0.9).all(), (branch, agreement)
    assert mean_relative_error(encoded.pooler_output, expected.pooler_output) < 0.05
    assert mean_relative_error(decoded, expected_images) < 0.1


def test_bf16_autocast_gives_the_float32_codes_and_losses(tiny_model, images):
    tiny_model.eval()
    with torch.no_grad():
        expected = tiny_model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = tiny_model(images)
    for branch in ("pixel", "semantic"):
        agreement = code_agreement_per_depth(output.branch_codes(branch), expected.branch_codes(branch))
        assert (agreement >= 0.9).all(), (branch, agreement)
    assert output.reconstruction_loss.item() == pytest.approx(expected.reconstruction_loss.item(), rel=0.05)
    assert output.commitment_loss.item() == pytest.approx(expected.commitment_loss.item(), rel=0.05)


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.zeros(2, 3, 32, 32), "shape"),
        (torch.zeros(3, 64, 64), "shape"),
        ("not a tensor", "tensor"),
    ],
)
def test_encode_rejects_malformed_pixel_values(tiny_model, bad, message):
    with pytest.raises(ValueError, match=message):
        tiny_model.encode(bad)


def test_decode_rejects_codes_of_the_wrong_grid_or_range(tiny_model):
    with pytest.raises(ValueError, match="shape"):
        tiny_model.decode(torch.zeros(1, 4, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="256"):
        tiny_model.decode(torch.full((1, 8, 8, 4), 256, dtype=torch.long))


def test_branch_api_routes_each_branch_to_its_own_quantizer_and_codes(tiny_model, images):
    tiny_model.eval()
    with torch.no_grad():
        encoded = tiny_model.encode(images)
    assert tiny_model.quantizer("pixel") is tiny_model.pixel_quantizer
    assert tiny_model.quantizer("semantic") is tiny_model.semantic_quantizer
    assert encoded.branch_codes("pixel") is encoded.pixel_codes
    assert encoded.branch_codes("semantic") is encoded.semantic_codes
    codes = encoded.semantic_codes
    per_depth = tiny_model.embed_codes(codes, "semantic", per_depth=True)
    torch.testing.assert_close(per_depth[..., 2, :], tiny_model.semantic_quantizer.codebook[0][codes[..., 2]])
    torch.testing.assert_close(tiny_model.embed_codes(codes, "semantic"), per_depth.sum(dim=-2))
    assert not torch.equal(tiny_model.embed_codes(codes, "pixel"), tiny_model.embed_codes(codes, "semantic"))


@pytest.mark.parametrize(
    "call",
    [
        lambda model, codes: model.embed_codes(codes, branch="texture"),
        lambda model, codes: model.quantizer("texture"),
        lambda model, codes: model.encode(torch.zeros(1, 3, 64, 64)).branch_codes("texture"),
    ],
    ids=["embed_codes", "quantizer", "branch_codes"],
)
def test_unknown_branches_are_rejected(tiny_model, call):
    with pytest.raises(ValueError, match=r"branch must be one of \('pixel', 'semantic'\), got 'texture'"):
        call(tiny_model.eval(), torch.zeros(1, 8, 8, 4, dtype=torch.long))


def test_from_siglip_loads_the_pretrained_tower(tmp_path):
    siglip_config = DualTokenVisionConfig.from_preset("tiny").siglip_config
    torch.manual_seed(3)
    tower = SiglipVisionModel(siglip_config)
    tower.save_pretrained(tmp_path / "vision")
    model = DualTokenVisionModel.from_siglip(tmp_path / "vision", preset="tiny", pixel_layer=3)
    assert model.config.pixel_layer == 3
    for key, value in tower.state_dict().items():
        assert torch.equal(model.siglip.state_dict()[key], value), key


def test_from_siglip_accepts_a_full_siglip_checkpoint(tmp_path):
    vision = DualTokenVisionConfig.from_preset("tiny").siglip_config.to_dict()
    config = SiglipConfig(vision_config=vision, text_config={"hidden_size": 32, "intermediate_size": 64,
                                                             "num_hidden_layers": 1, "num_attention_heads": 2})
    torch.manual_seed(4)
    full = SiglipModel(config)
    full.save_pretrained(tmp_path / "siglip")
    model = DualTokenVisionModel.from_siglip(tmp_path / "siglip", preset="tiny")
    assert torch.equal(
        model.siglip.embeddings.patch_embedding.weight, full.vision_model.embeddings.patch_embedding.weight
    )


def test_invalid_layer_layout_is_rejected():
    with pytest.raises(ValueError, match="semantic_layer"):
        DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny", pixel_layer=6, semantic_layer=5))
    with pytest.raises(ValueError, match="projection_type"):
        DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny", projection_type="mlp"))


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="paper"):
        DualTokenVisionConfig.from_preset("huge")
