"""Loss weights and optimiser settings of the official DualToken tokenizer recipes, in one place.

`paper` is the 2025 release that matches the paper (its training step is eq. 2-4); `v2` is the later official code.
Values marked *official* were read from the authors' training loop and launch scripts (songweii/DualToken,
`src/open_clip_train/train.py` and `run*.sh`, at commit b0f6f76 for `paper` and 41be90e for `v2`, stage 1); the
others are our choices where the official code has none (each is said so in the comment next to it).

    total = semantic_weight * L_sem                                        (eq. 2, lambda_2)
          + reconstruction_weight * ||x_hat - x||^2                       (eq. 3, lambda_1 on the pixel L2)
          + perceptual_weight * LPIPS(x_hat, x)                           (eq. 3, lambda_p)
          + adaptive_weight * generator_weight * L_G(x_hat)               (eq. 3, lambda_g)
          + commitment_weight * (L_c1 + L_c2)                             (eq. 2, lambda_3; eq. 1)

    L_sem = semantic_feature_weight * (||F - F_0||^2 + cosine * (1 - cos(F, F_0)))      (eq. 4, the semantic layer)
          + semantic_pooled_weight  * (||P - P_0||^2 + cosine * (1 - cos(P, P_0)))      (the pooling head)

F_0 is the frozen teacher's output at the semantic layer. F is the student's, chosen by `semantic_loss_features`:
`"layer"` (`paper`, as eq. 4 and the 2025 code) is the semantic layer's own, unquantized output; `"quantized"` (`v2`,
as the official v2 code's `zq_semantic`) is the semantic codes' embeddings projected back to the tower width, the
features that replace the hidden state after the semantic layer (`DualTokenVisionOutput.semantic_features`).
"""

import dataclasses


SEMANTIC_LOSS_FEATURES = ("layer", "quantized")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of eq. 2-4 plus the GAN settings; see the module docstring for where each one goes."""

    reconstruction_weight: float
    perceptual_weight: float
    generator_weight: float
    discriminator_weight: float
    semantic_weight: float
    semantic_feature_weight: float
    semantic_pooled_weight: float
    semantic_cosine_weight: float
    commitment_weight: float
    adaptive_weight_min: float
    adaptive_weight_max: float


RECIPES = {
    "paper": {
        "loss_weights": LossWeights(
            reconstruction_weight=10.0,  # official
            perceptual_weight=1.0,  # official
            generator_weight=0.75,  # official
            discriminator_weight=0.75,  # official (1.0 during the first GAN epoch only; we keep 0.75 throughout)
            semantic_weight=1.0,  # official
            semantic_feature_weight=5.0,  # official: 5 x layer-26 L2
            semantic_pooled_weight=1.0,  # official: 1 x pooled-output L2
            semantic_cosine_weight=0.0,  # official: no cosine term
            commitment_weight=40.0,  # official
            adaptive_weight_min=0.3,  # official clamp (taming-transformers uses [0, 1e4])
            adaptive_weight_max=10.0,  # official clamp
        ),
        "learning_rate": 7.2e-5,  # official, per 32-image batch on each of 8 GPUs
        "adam_beta1": 0.5,  # official
        "adam_beta2": 0.9,  # official
        "adam_weight_decay": 1e-4,  # official
        "lr_warmup_steps": 10_000,  # official
        # Official: the GAN starts half-way through the first epoch (about 19.5k steps for CC12M at 8 x 32 images).
        "gan_start_step": 20_000,
        "semantic_loss_features": "layer",  # official: the unquantized semantic layer (eq. 4)
    },
    "v2": {
        "loss_weights": LossWeights(
            reconstruction_weight=5.0,  # official
            perceptual_weight=1.0,  # official
            generator_weight=0.75,  # official
            discriminator_weight=0.75,  # official (as in `paper`)
            semantic_weight=1.0,  # official
            semantic_feature_weight=5.0,  # official: 5 x (L2 - cos) on the semantic layer
            semantic_pooled_weight=1.0,  # official: 1 x (L2 - cos) on the pooled output
            semantic_cosine_weight=1.0,  # official
            commitment_weight=5.0,  # official
            adaptive_weight_min=0.3,  # official
            adaptive_weight_max=10.0,  # official
        ),
        "learning_rate": 7.2e-5,  # official
        "adam_beta1": 0.5,  # official
        "adam_beta2": 0.9,  # official
        "adam_weight_decay": 1e-4,  # official
        "lr_warmup_steps": 10_000,  # official
        "gan_start_step": 20_000,  # official schedule as in `paper`
        "semantic_loss_features": "quantized",  # official: `zq_semantic`, the projected-back semantic embeddings
    },
}


def get_recipe(name: str, **overrides) -> dict:
    """The settings of recipe `name` with `overrides` applied; an override of `None` keeps the recipe's value.

    Overrides may name any `LossWeights` field or any top-level setting (`learning_rate`, `gan_start_step`, ...).
    """
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    recipe = dict(RECIPES[name])
    weight_names = {field.name for field in dataclasses.fields(LossWeights)}
    unknown = set(overrides) - weight_names - set(recipe)
    if unknown:
        raise ValueError(f"unknown recipe settings {sorted(unknown)}")
    set_overrides = {key: value for key, value in overrides.items() if value is not None}
    recipe["loss_weights"] = dataclasses.replace(
        recipe["loss_weights"], **{key: value for key, value in set_overrides.items() if key in weight_names}
    )
    recipe.update({key: value for key, value in set_overrides.items() if key not in weight_names})
    if recipe["semantic_loss_features"] not in SEMANTIC_LOSS_FEATURES:
        raise ValueError(
            f"semantic_loss_features must be one of {SEMANTIC_LOSS_FEATURES}, got {recipe['semantic_loss_features']!r}"
        )
    return recipe
