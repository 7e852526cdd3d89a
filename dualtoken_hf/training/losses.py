"""Training losses of the DualToken tokenizer (paper §3.2, eq. 1-4).

- eq. 1, the commitment loss, comes from the quantizers (`DualTokenVisionOutput.commitment_loss`);
- eq. 3, the reconstruction loss: pixel L2 (from the model), a perceptual loss (built by
  `dualtoken_hf.evaluation.build_perceptual_loss`, the network of the LPIPS metric) and a PatchGAN hinge loss
  ([`PatchGANDiscriminator`], [`hinge_generator_loss`]) weighted adaptively ([`adaptive_generator_weight`]);
- eq. 4, the semantic loss ([`semantic_distillation_loss`]) against the frozen original SigLIP tower;
- eq. 2 puts them together ([`tokenizer_losses`]) with the weights of a recipe (`recipes.py`).
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .recipes import SEMANTIC_LOSS_FEATURES, LossWeights


class PatchGANDiscriminator(nn.Module):
    """
    PatchGAN discriminator with the layout of taming-transformers' `NLayerDiscriminator` (VQGAN): a 4x4 stride-2
    conv with LeakyReLU, `num_layers - 1` more stride-2 conv + BatchNorm + LeakyReLU blocks, one stride-1 block, and
    a 4x4 conv to one logit per patch. Channels double per block up to 8x `base_channels`.

    Args:
        in_channels (`int`, defaults to 3): Image channels.
        base_channels (`int`, defaults to 64): Channels of the first conv.
        num_layers (`int`, defaults to 3): Number of stride-2 convs.
    """

    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, base_channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        channels = base_channels
        for index in range(1, num_layers + 1):
            out_channels = base_channels * min(2**index, 8)
            stride = 2 if index < num_layers else 1
            layers += [
                nn.Conv2d(channels, out_channels, 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.LeakyReLU(0.2, True),
            ]
            channels = out_channels
        layers.append(nn.Conv2d(channels, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_discriminator_weights)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images `(B, C, H, W)` in [-1, 1] -> patch logits `(B, 1, h, w)`. Images are cast to the weights' dtype
        (a bf16 tokenizer under DeepSpeed feeds an fp32 discriminator)."""
        return self.main(images.to(self.main[0].weight.dtype))


def _init_discriminator_weights(module: nn.Module):
    # taming-transformers' `weights_init`: conv ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02), shift 0.
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: `(mean(relu(1 - real)) + mean(relu(1 + fake))) / 2`. (The official code
    uses `leaky_relu` in place of `relu`, which also pushes logits beyond the margin; we keep the standard hinge.)"""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: `-mean(fake)`."""
    return -logits_fake.mean()


def adaptive_generator_weight(
    reconstruction_loss: torch.Tensor,
    generator_loss: torch.Tensor,
    last_layer: torch.Tensor,
    min_weight: float = 0.0,
    max_weight: float = 1e4,
    eps: float = 1e-4,
) -> torch.Tensor:
    """
    VQGAN's adaptive GAN weight: `||grad_w L_rec|| / (||grad_w L_G|| + eps)` at the decoder's last layer `w`,
    clamped to `[min_weight, max_weight]` and detached. Both graphs are kept for the backward pass that follows.
    """
    reconstruction_grads = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    generator_grads = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    weight = reconstruction_grads.norm() / (generator_grads.norm() + eps)
    return weight.clamp(min_weight, max_weight).detach()


def cosine_distance(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of `1 - cos` over the last dimension. The official v2 code uses `-cos`; the constant 1 makes a perfect
    match score 0 and leaves the gradient unchanged."""
    return 1.0 - F.cosine_similarity(features.float(), targets.float(), dim=-1).mean()


def semantic_distillation_loss(
    features: torch.Tensor,
    teacher_features: torch.Tensor,
    pooled: torch.Tensor,
    teacher_pooled: torch.Tensor,
    feature_weight: float = 1.0,
    pooled_weight: float = 1.0,
    cosine_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """
    Eq. 4: keep the student's semantic features `F` (and the pooled output) close to the teacher's `F_0` at the
    semantic layer (which student features: `semantic_loss_features` of [`tokenizer_losses`]).

    Returns `features` (L2 on the semantic features), `pooled` (L2 on the pooling head), their `1 - cos` counterparts
    `features_cosine` and `pooled_cosine`, and `total`
    `= feature_weight * (features + cosine_weight * features_cosine) + pooled_weight * (pooled + ...)`.
    """
    terms = {
        "features": F.mse_loss(features.float(), teacher_features.float()),
        "pooled": F.mse_loss(pooled.float(), teacher_pooled.float()),
        "features_cosine": cosine_distance(features, teacher_features),
        "pooled_cosine": cosine_distance(pooled, teacher_pooled),
    }
    terms["total"] = feature_weight * (terms["features"] + cosine_weight * terms["features_cosine"]) + pooled_weight * (
        terms["pooled"] + cosine_weight * terms["pooled_cosine"]
    )
    return terms


@contextlib.contextmanager
def frozen(module: nn.Module):
    """Temporarily stop gradients into `module`'s parameters (the discriminator during the generator loss)."""
    flags = [parameter.requires_grad for parameter in module.parameters()]
    module.requires_grad_(False)
    try:
        yield module
    finally:
        for parameter, flag in zip(module.parameters(), flags):
            parameter.requires_grad_(flag)


def tokenizer_losses(
    outputs,
    pixel_values: torch.Tensor,
    teacher_outputs,
    semantic_layer: int,
    weights: LossWeights,
    perceptual_loss: nn.Module | None = None,
    discriminator: nn.Module | None = None,
    last_layer: torch.Tensor | None = None,
    semantic_loss_features: str = "layer",
) -> dict[str, torch.Tensor]:
    """
    Eq. 2: every loss term of one tokenizer (generator) step, and their weighted sum under `"total"`.

    Args:
        outputs (`DualTokenVisionOutput`): `model(pixel_values, output_hidden_states=True)` in training mode.
        pixel_values (`torch.Tensor`): The input images `(B, 3, H, W)` in [-1, 1].
        teacher_outputs: Output of the frozen original SigLIP tower on `pixel_values` with `output_hidden_states=True`.
        semantic_layer (`int`): 1-indexed block whose teacher output is the target of eq. 4.
        weights (`LossWeights`): The recipe.
        perceptual_loss (`nn.Module`, *optional*): `(reconstruction, pixel_values) -> (B,)` per-image distances
            (see `dualtoken_hf.evaluation.build_perceptual_loss`), averaged here; `None` for no term.
        discriminator (`nn.Module`, *optional*): The PatchGAN once the GAN has started, else `None`. It is called
            with frozen parameters, so only the tokenizer receives gradients from the generator loss.
        last_layer (`torch.Tensor`, *optional*): The decoder's last weight, for the adaptive GAN weight.
        semantic_loss_features (`str`, defaults to `"layer"`): The student features of eq. 4 (see `recipes.py`):
            `"layer"`, the unquantized output of block `semantic_layer` (`paper`), or `"quantized"`,
            `outputs.semantic_features`, the semantic code embeddings projected back to the tower width (`v2`).
    """
    reconstruction = outputs.reconstruction
    zero = reconstruction.new_zeros((), dtype=torch.float32)
    terms = {
        "reconstruction": outputs.reconstruction_loss.float(),
        "perceptual": perceptual_loss(reconstruction, pixel_values).mean() if perceptual_loss is not None else zero,
        "pixel_commitment": outputs.pixel_commitment_loss.float(),
        "semantic_commitment": outputs.semantic_commitment_loss.float(),
    }
    if semantic_loss_features not in SEMANTIC_LOSS_FEATURES:
        raise ValueError(
            f"semantic_loss_features must be one of {SEMANTIC_LOSS_FEATURES}, got {semantic_loss_features!r}"
        )
    student_features = (
        outputs.hidden_states[semantic_layer] if semantic_loss_features == "layer" else outputs.semantic_features
    )
    semantic = semantic_distillation_loss(
        student_features,
        teacher_outputs.hidden_states[semantic_layer],
        outputs.pooler_output,
        teacher_outputs.pooler_output,
        feature_weight=weights.semantic_feature_weight,
        pooled_weight=weights.semantic_pooled_weight,
        cosine_weight=weights.semantic_cosine_weight,
    )
    terms.update({f"semantic_{name}": value for name, value in semantic.items() if name != "total"})
    terms["semantic"] = semantic["total"]

    if discriminator is not None:
        with frozen(discriminator):
            terms["generator"] = hinge_generator_loss(discriminator(reconstruction).float())
        # As in the official code, the adaptive weight balances the unweighted pixel L2 plus the perceptual term.
        terms["adaptive_weight"] = adaptive_generator_weight(
            terms["reconstruction"] + weights.perceptual_weight * terms["perceptual"],
            terms["generator"],
            last_layer,
            min_weight=weights.adaptive_weight_min,
            max_weight=weights.adaptive_weight_max,
        )
    else:
        terms["generator"] = terms["adaptive_weight"] = zero

    terms["total"] = (
        weights.semantic_weight * terms["semantic"]
        + weights.reconstruction_weight * terms["reconstruction"]
        + weights.perceptual_weight * terms["perceptual"]
        + terms["adaptive_weight"] * weights.generator_weight * terms["generator"]
        + weights.commitment_weight * (terms["pixel_commitment"] + terms["semantic_commitment"])
    )
    return terms


def discriminator_losses(
    discriminator: nn.Module, pixel_values: torch.Tensor, reconstruction: torch.Tensor, weights: LossWeights
) -> dict[str, torch.Tensor]:
    """One discriminator step's hinge loss on real images and detached reconstructions (`"total"` is weighted by
    `weights.discriminator_weight`), plus the mean logits for logging."""
    logits_real = discriminator(pixel_values.detach()).float()
    logits_fake = discriminator(reconstruction.detach()).float()
    loss = hinge_discriminator_loss(logits_real, logits_fake)
    return {
        "discriminator": loss,
        "logits_real": logits_real.detach().mean(),
        "logits_fake": logits_fake.detach().mean(),
        "total": weights.discriminator_weight * loss,
    }
