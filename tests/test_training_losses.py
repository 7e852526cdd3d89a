"""Training losses (eq. 1-4), the PatchGAN discriminator and the recipes (the perceptual networks are tested with
the evaluation, which owns them)."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from dualtoken_hf import DualTokenVisionConfig, DualTokenVisionModel
from dualtoken_hf.evaluation import FeaturePerceptualLoss
from dualtoken_hf.training import (
    RECIPES,
    PatchGANDiscriminator,
    adaptive_generator_weight,
    discriminator_losses,
    frozen,
    get_recipe,
    hinge_discriminator_loss,
    hinge_generator_loss,
    semantic_distillation_loss,
    tokenizer_losses,
)


def tiny_model_and_teacher(**overrides):
    torch.manual_seed(0)
    model = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny", **overrides)).train()
    teacher = copy.deepcopy(model.siglip).eval().requires_grad_(False)
    return model, teacher


def forward_both(model, teacher, batch_size=2):
    pixel_values = torch.rand(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    outputs = model(pixel_values, output_hidden_states=True)
    with torch.no_grad():
        teacher_outputs = teacher(pixel_values, output_hidden_states=True)
    return pixel_values, outputs, teacher_outputs


def test_hinge_discriminator_loss_values():
    logits_real = torch.tensor([2.0, 0.5])  # relu(1 - real) = [0, 0.5] -> mean 0.25
    logits_fake = torch.tensor([-2.0, 0.5])  # relu(1 + fake) = [0, 1.5] -> mean 0.75
    assert hinge_discriminator_loss(logits_real, logits_fake).item() == pytest.approx(0.5)
    assert hinge_discriminator_loss(torch.full((3,), 1.0), torch.full((3,), -1.0)).item() == 0.0


def test_hinge_generator_loss_is_minus_mean_fake_logits():
    assert hinge_generator_loss(torch.tensor([1.0, -3.0, 0.5])).item() == pytest.approx(0.5)


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    last_layer = nn.Parameter(torch.ones(4))
    reconstruction_loss = (last_layer * torch.tensor([3.0, 0.0, 4.0, 0.0])).sum()  # gradient norm 5
    generator_loss = (last_layer * torch.tensor([0.0, 2.0, 0.0, 0.0])).sum()  # gradient norm 2
    weight = adaptive_generator_weight(reconstruction_loss, generator_loss, last_layer, max_weight=1e4, eps=0.0)
    assert weight.item() == pytest.approx(2.5)
    assert not weight.requires_grad
    assert last_layer.grad is None  # the ratio is computed without touching .grad


@pytest.mark.parametrize("scale, expected", [(1e6, 10.0), (1e-6, 0.3)])
def test_adaptive_weight_is_clamped(scale, expected):
    last_layer = nn.Parameter(torch.ones(2))
    weight = adaptive_generator_weight(
        (last_layer * scale).sum(), last_layer.sum(), last_layer, min_weight=0.3, max_weight=10.0
    )
    assert weight.item() == pytest.approx(expected)


def test_semantic_distillation_loss_values():
    features = torch.tensor([[[1.0, 0.0]]])
    teacher_features = torch.tensor([[[0.0, 1.0]]])  # L2 = mean((1, -1)^2) = 1, cos = 0
    pooled = torch.tensor([[2.0, 0.0]])
    teacher_pooled = torch.tensor([[1.0, 0.0]])  # L2 = 0.5, cos = 1
    terms = semantic_distillation_loss(features, teacher_features, pooled, teacher_pooled, 5.0, 1.0, 2.0)
    assert terms["features"].item() == pytest.approx(1.0)
    assert terms["features_cosine"].item() == pytest.approx(1.0)
    assert terms["pooled"].item() == pytest.approx(0.5)
    assert terms["pooled_cosine"].item() == pytest.approx(0.0)
    assert terms["total"].item() == pytest.approx(5.0 * (1.0 + 2.0 * 1.0) + 1.0 * (0.5 + 0.0))


def test_semantic_layer_loss_is_zero_at_initialisation():
    model, teacher = tiny_model_and_teacher()
    pixel_values, outputs, teacher_outputs = forward_both(model, teacher)
    terms = tokenizer_losses(outputs, pixel_values, teacher_outputs, model.config.semantic_layer,
                             RECIPES["v2"]["loss_weights"], semantic_loss_features="layer")
    assert terms["semantic_features"].item() == 0.0
    assert terms["semantic_features_cosine"].item() == pytest.approx(0.0, abs=1e-6)


def hand_computed_semantic_loss(features, teacher_features, pooled, teacher_pooled, weights) -> torch.Tensor:
    """eq. 4 with the recipe's weights: L2 + cosine weight x (1 - cos), on the features and on the pooled output."""
    def term(values, targets):
        mse = ((values - targets) ** 2).mean()
        cosine = (values * targets).sum(-1) / (values.norm(dim=-1) * targets.norm(dim=-1))
        return mse + weights.semantic_cosine_weight * (1 - cosine.mean())

    return (weights.semantic_feature_weight * term(features, teacher_features)
            + weights.semantic_pooled_weight * term(pooled, teacher_pooled))


@pytest.mark.parametrize("recipe_name", ["paper", "v2"])
def test_recipe_semantic_loss_matches_a_hand_computation(recipe_name):
    """`paper` compares the unquantized semantic layer; `v2` (as the official v2 code's `zq_semantic`) the semantic
    codes' embeddings, looked up in the codebook and projected back to the tower width."""
    model, teacher = tiny_model_and_teacher()
    model.eval()  # no EMA step: the codebook that chose the codes is the one the hand computation reads
    pixel_values, outputs, teacher_outputs = forward_both(model, teacher)
    recipe = get_recipe(recipe_name)
    weights, layer = recipe["loss_weights"], model.config.semantic_layer
    terms = tokenizer_losses(outputs, pixel_values, teacher_outputs, layer, weights,
                             semantic_loss_features=recipe["semantic_loss_features"])
    with torch.no_grad():
        if recipe_name == "paper":
            features = model.siglip(pixel_values, output_hidden_states=True).hidden_states[layer]
        else:
            codes = outputs.semantic_codes  # (B, h, w, D)
            table = model.semantic_quantizer.codebook[0]  # the tiny preset shares one codebook across depths
            embeddings = sum(table[codes[..., d]] for d in range(codes.shape[-1]))
            features = model.semantic_up_projection(embeddings).flatten(1, 2)
        teacher_features = teacher(pixel_values, output_hidden_states=True).hidden_states[layer]
        expected = hand_computed_semantic_loss(features, teacher_features, outputs.pooler_output,
                                               teacher_outputs.pooler_output, weights)
    torch.testing.assert_close(terms["semantic"], expected, rtol=1e-5, atol=1e-6)
    # At initialisation only the quantized features differ from the teacher's semantic layer.
    assert (terms["semantic_features"].item() > 1e-3) == (recipe_name == "v2")


def test_unknown_semantic_loss_features_are_rejected():
    model, teacher = tiny_model_and_teacher()
    pixel_values, outputs, teacher_outputs = forward_both(model, teacher)
    with pytest.raises(ValueError, match="semantic_loss_features must be one of"):
        tokenizer_losses(outputs, pixel_values, teacher_outputs, model.config.semantic_layer,
                         RECIPES["v2"]["loss_weights"], semantic_loss_features="pooled")


def test_semantic_loss_is_zero_at_initialisation_without_semantic_feedback():
    # With semantic feedback the pooled output runs on quantized features, so only the layer term starts at zero;
    # pooling the unquantized last layer instead makes the whole of eq. 4 start at zero.
    model, teacher = tiny_model_and_teacher(semantic_feedback=False, semantic_layer=6)
    pixel_values, outputs, teacher_outputs = forward_both(model, teacher)
    terms = tokenizer_losses(outputs, pixel_values, teacher_outputs, model.config.semantic_layer,
                             RECIPES["v2"]["loss_weights"])
    assert terms["semantic"].item() == pytest.approx(0.0, abs=1e-5)


def test_total_loss_is_the_weighted_sum_of_eq_2():
    model, teacher = tiny_model_and_teacher()
    pixel_values, outputs, teacher_outputs = forward_both(model, teacher)
    weights = dataclasses.replace(RECIPES["paper"]["loss_weights"], perceptual_weight=0.5)
    discriminator = PatchGANDiscriminator(base_channels=8)
    perceptual = FeaturePerceptualLoss(nn.Conv2d(3, 4, 3))
    terms = tokenizer_losses(outputs, pixel_values, teacher_outputs, model.config.semantic_layer, weights,
                             perceptual, discriminator, model.pixel_decoder.decoder.conv_out.weight)
    expected = (
        weights.semantic_weight * terms["semantic"]
        + weights.reconstruction_weight * outputs.reconstruction_loss
        + 0.5 * terms["perceptual"]
        + terms["adaptive_weight"] * weights.generator_weight * terms["generator"]
        + weights.commitment_weight * (outputs.pixel_commitment_loss + outputs.semantic_commitment_loss)
    )
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["semantic"].item() == pytest.approx(
        (5.0 * terms["semantic_features"] + 1.0 * terms["semantic_pooled"]).item(), rel=1e-6
    )
    assert terms["perceptual"].item() > 0
    with torch.no_grad():
        per_image = perceptual(outputs.reconstruction, pixel_values)
    assert terms["perceptual"].item() == pytest.approx(per_image.mean().item(), rel=1e-6)
    assert 0.3 <= terms["adaptive_weight"].item() <= 10.0


def test_generator_loss_trains_the_decoder_but_not_the_discriminator():
    model, teacher = tiny_model_and_teacher()
    pixel_values, outputs, teacher_outputs = forward_both(model, teacher)
    discriminator = PatchGANDiscriminator(base_channels=8)
    last_layer = model.pixel_decoder.decoder.conv_out.weight
    terms = tokenizer_losses(outputs, pixel_values, teacher_outputs, model.config.semantic_layer,
                             RECIPES["paper"]["loss_weights"], None, discriminator, last_layer)
    terms["total"].backward()
    assert last_layer.grad is not None and last_layer.grad.abs().sum() > 0
    assert all(parameter.grad is None for parameter in discriminator.parameters())
    assert all(parameter.requires_grad for parameter in discriminator.parameters())


def test_discriminator_losses_are_weighted_hinge_on_detached_images():
    discriminator = PatchGANDiscriminator(base_channels=8)
    real = torch.rand(2, 3, 32, 32) * 2 - 1
    fake = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    terms = discriminator_losses(discriminator, real, fake, RECIPES["paper"]["loss_weights"])
    assert terms["total"].item() == pytest.approx(0.75 * terms["discriminator"].item())
    terms["total"].backward()
    assert fake.grad is None
    assert discriminator.main[0].weight.grad is not None


def test_patchgan_has_the_taming_layout():
    discriminator = PatchGANDiscriminator()
    convs = [module for module in discriminator.modules() if isinstance(module, nn.Conv2d)]
    assert [conv.out_channels for conv in convs] == [64, 128, 256, 512, 1]
    assert [conv.stride[0] for conv in convs] == [2, 2, 2, 1, 1]
    assert sum(isinstance(module, nn.BatchNorm2d) for module in discriminator.modules()) == 3
    # 256 px images give the classic 30 x 30 grid of 70 x 70 patches.
    assert PatchGANDiscriminator(base_channels=4)(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)


def test_frozen_restores_requires_grad():
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    module[1].weight.requires_grad_(False)
    with frozen(module):
        assert not any(parameter.requires_grad for parameter in module.parameters())
    assert [parameter.requires_grad for parameter in module.parameters()] == [True, True, False, True]


def test_recipes_hold_the_official_weights():
    paper, v2 = RECIPES["paper"]["loss_weights"], RECIPES["v2"]["loss_weights"]
    assert (paper.reconstruction_weight, paper.commitment_weight, paper.semantic_cosine_weight) == (10.0, 40.0, 0.0)
    assert (v2.reconstruction_weight, v2.commitment_weight, v2.semantic_cosine_weight) == (5.0, 5.0, 1.0)
    assert (RECIPES["paper"]["adam_beta1"], RECIPES["paper"]["adam_beta2"]) == (0.5, 0.9)
    assert (RECIPES["paper"]["semantic_loss_features"], RECIPES["v2"]["semantic_loss_features"]) == (
        "layer", "quantized"
    )


def test_get_recipe_applies_overrides_and_ignores_none():
    recipe = get_recipe("paper", commitment_weight=1.0, learning_rate=1e-3, perceptual_weight=None)
    assert recipe["loss_weights"].commitment_weight == 1.0
    assert recipe["loss_weights"].perceptual_weight == 1.0
    assert recipe["learning_rate"] == 1e-3
    assert RECIPES["paper"]["loss_weights"].commitment_weight == 40.0
    assert get_recipe("paper", semantic_loss_features="quantized")["semantic_loss_features"] == "quantized"
    with pytest.raises(ValueError, match="semantic_loss_features must be one of"):
        get_recipe("paper", semantic_loss_features="pooled")
    with pytest.raises(ValueError, match="unknown recipe settings"):
        get_recipe("paper", commitment=1.0)
    with pytest.raises(ValueError, match="unknown recipe"):
        get_recipe("v3")
