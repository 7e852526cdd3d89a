"""Perceptual distances between images (LPIPS, Zhang et al. 2018): one loader for the evaluation metric and for the
perceptual term of the training loss (eq. 3).

A perceptual network is named by a string (see `PERCEPTUAL_LOSS_HELP`): `"lpips"` (through the `lpips` package,
which needs torchvision and downloaded VGG/AlexNet weights, so it is imported lazily), `"none"`, or
`"package.module:factory"`, any feature network compared LPIPS-style. Every network maps two image batches
`(B, 3, H, W)` in [-1, 1] to per-image distances `(B,)`.
"""

import torch
from torch import nn

from .plugins import MetricNetwork, load_factory, user_supplied


PERCEPTUAL_LOSS_HELP = (
    '"lpips" (LPIPS through the `lpips` package, which needs torchvision and its VGG/AlexNet weights), "none", or '
    '"package.module:factory", a callable returning an nn.Module that maps images in [-1, 1] to a feature map or a '
    "list of feature maps, compared LPIPS-style (unit-normalised channels, squared L2, spatial mean, summed)"
)


class FeaturePerceptualLoss(nn.Module):
    """
    LPIPS-style distance in the feature space of any frozen network: every feature map is normalised to unit length
    over channels, the squared difference is summed over channels and averaged over positions, and the layers are
    summed (LPIPS with unit layer weights). Returns one distance per image, `(B,)`.

    Args:
        feature_extractor (`nn.Module`): Maps images `(B, 3, H, W)` in [-1, 1] to a feature map `(B, C, h, w)`, or a
            list / tuple / dict of them. It is frozen and put in eval mode here.
    """

    def __init__(self, feature_extractor: nn.Module):
        super().__init__()
        self.feature_extractor = feature_extractor.eval().requires_grad_(False)

    def train(self, mode: bool = True):
        # The extractor stays in eval mode (BatchNorm statistics, dropout) whatever the training loop asks.
        return self

    def _feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        dtype = next(self.feature_extractor.parameters(), images).dtype
        features = self.feature_extractor(images.to(dtype))
        if isinstance(features, dict):
            features = list(features.values())
        return list(features) if isinstance(features, (list, tuple)) else [features]

    def forward(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        distance = images.new_zeros(images.shape[0], dtype=torch.float32)
        for image_map, reference_map in zip(self._feature_maps(images), self._feature_maps(references)):
            image_map, reference_map = _unit_channels(image_map.float()), _unit_channels(reference_map.float())
            distance = distance + (image_map - reference_map).pow(2).sum(dim=1).flatten(1).mean(dim=1)
        return distance


def _unit_channels(feature_map: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    return feature_map / (feature_map.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPSPerceptualLoss(nn.Module):
    """LPIPS through the `lpips` package with its `net` backbone (`"vgg"` as in the official training, `"alex"` as
    usually reported), one distance per image `(B,)`; inputs in [-1, 1]."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        try:
            import lpips
        except ImportError as error:
            raise ImportError(
                "the perceptual network 'lpips' needs the `lpips` package (pip install lpips; it needs torchvision "
                "and downloads its weights on first use); use 'none' or a 'package.module:factory' feature network "
                "instead"
            ) from error
        self.lpips = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)

    def train(self, mode: bool = True):
        return self

    def forward(self, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        return self.lpips(images.float(), references.float()).flatten()


def build_perceptual_loss(name: str, lpips_net: str = "vgg") -> nn.Module | None:
    """
    The perceptual network `name` (see `PERCEPTUAL_LOSS_HELP`): `"lpips"` (with the `lpips_net` backbone), `"none"`
    (returns `None`) or `"package.module:factory"`. Raises instead of falling back, so a training run never goes on
    without the loss it asked for.
    """
    if name == "none":
        return None
    if name == "lpips":
        return LPIPSPerceptualLoss(lpips_net)
    try:
        factory = load_factory(name)
    except ValueError as error:
        raise ValueError(f"a perceptual network is 'lpips', 'none' or 'package.module:factory' ({error})") from error
    extractor = factory()
    if not isinstance(extractor, nn.Module):
        raise ValueError(f"{name} must return an nn.Module feature extractor, got {type(extractor).__name__}")
    return FeaturePerceptualLoss(extractor)


def resolve_perceptual_network(perceptual_network: str | None = None, lpips_net: str = "alex") -> MetricNetwork:
    """Pick the evaluation's LPIPS network.

    1. `perceptual_network` other than `"lpips"` (see [`build_perceptual_loss`]): used as given, labelled
       non-standard (`"none"` skips LPIPS).
    2. LPIPS with the `lpips_net` backbone when the `lpips` package imports and loads its weights.
    3. Nothing: LPIPS is reported as null and the note says why.
    """
    if perceptual_network == "none":
        return MetricNetwork(None, None, standard=False, note="LPIPS skipped: the perceptual network is 'none'")
    if perceptual_network and perceptual_network != "lpips":
        return user_supplied(build_perceptual_loss(perceptual_network), perceptual_network, "LPIPS")
    try:
        network = build_perceptual_loss("lpips", lpips_net)
    except Exception as error:  # noqa: BLE001 - any import or weight-loading failure means "not available here"
        return MetricNetwork(
            None,
            None,
            standard=False,
            note=f"LPIPS skipped: the lpips package could not be used ({type(error).__name__}: {error})",
        )
    return MetricNetwork(network, f"lpips ({lpips_net})", standard=True)
