"""Reconstruction FID (rFID): Fréchet distance between feature statistics of the inputs and of their reconstructions.

The standard protocol uses the 2048-d pool features of the TF Inception-v3 "2015-12-05" graph. Its weights cannot be
downloaded here, so the network is resolved at run time (see `resolve_fid_network`): the TorchScript port used by
StyleGAN3 / clean-fid when its file is present, otherwise a user-supplied feature extractor (reported as non-standard),
otherwise no rFID at all, with the reason in the report.
"""

import os
from pathlib import Path

import torch
from torch import nn

from .plugins import MetricNetwork, load_factory, user_supplied


INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = (
    f"https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/{INCEPTION_FILENAME}"
)


class FeatureStatistics:
    """Running mean and covariance of feature vectors, accumulated in float64 without keeping the features.

    The covariance is the unbiased sample covariance (divides by `count - 1`), as `numpy.cov` in the reference
    FID implementations.
    """

    def __init__(self):
        self.count = 0
        self._sum = None
        self._outer_sum = None

    def update(self, features: torch.Tensor):
        """Add a batch of features `(B, F)` (trailing singleton dimensions are flattened away)."""
        features = features.detach().reshape(features.shape[0], -1).double().cpu()
        if self._sum is None:
            self._sum = torch.zeros(features.shape[1], dtype=torch.float64)
            self._outer_sum = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
        self.count += features.shape[0]
        self._sum += features.sum(dim=0)
        self._outer_sum += features.T @ features

    @property
    def mean(self) -> torch.Tensor:
        return self._sum / self.count

    @property
    def covariance(self) -> torch.Tensor:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.count}")
        mean = self.mean
        return (self._outer_sum - self.count * torch.outer(mean, mean)) / (self.count - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition (negative round-off -> 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


def frechet_distance(
    mean_a: torch.Tensor, covariance_a: torch.Tensor, mean_b: torch.Tensor, covariance_b: torch.Tensor
) -> float:
    r"""Fréchet distance between the Gaussians N(mean_a, covariance_a) and N(mean_b, covariance_b):

    $$d^2 = \lVert\mu_a - \mu_b\rVert^2 + \operatorname{tr}\Sigma_a + \operatorname{tr}\Sigma_b
            - 2\operatorname{tr}\big(\Sigma_a\Sigma_b\big)^{1/2}.$$

    `scipy.linalg.sqrtm` of the non-symmetric product is avoided: with $S = \Sigma_a^{1/2}$, the symmetric PSD matrix
    $S\Sigma_b S$ is similar to $\Sigma_a\Sigma_b$, so $\operatorname{tr}(\Sigma_a\Sigma_b)^{1/2}$ is the sum of the
    square roots of its eigenvalues, which `torch.linalg.eigh` gives stably (float64).
    """
    mean_a, mean_b = mean_a.double(), mean_b.double()
    covariance_a, covariance_b = covariance_a.double(), covariance_b.double()
    sqrt_a = _sqrt_psd(covariance_a)
    product = sqrt_a @ covariance_b @ sqrt_a
    trace_sqrt_product = torch.linalg.eigvalsh((product + product.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + covariance_a.trace() + covariance_b.trace() - 2 * trace_sqrt_product
    return distance.clamp_min(0).item()


class InceptionTorchScript(nn.Module):
    """The standard FID Inception-v3 as the TorchScript file of StyleGAN3 / clean-fid (`inception-2015-12-05.pt`).

    Takes images in [0, 1] `(B, 3, H, W)` at any size (the graph resizes to 299 itself) and returns the 2048-d pool
    features. No torchvision needed.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.inception = torch.jit.load(str(path), map_location="cpu").eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The graph expects 8-bit pixel values (0..255), as images stored to disk would have.
        pixels = (images.clamp(0, 1) * 255).round()
        return self.inception(pixels, return_features=True)


def default_inception_path() -> Path:
    """Where the standard Inception file is looked up when none is given: torch hub's checkpoint folder."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILENAME


def resolve_fid_network(feature_extractor: str | None = None, inception_path: str | None = None) -> MetricNetwork:
    """Pick rFID's feature extractor.

    1. `feature_extractor` (`"package.module:factory"`; `factory()` returns a callable mapping images in [0, 1]
       `(B, 3, H, W)` to features `(B, F)`): used as given and labelled non-standard.
    2. The standard Inception file at `inception_path` (default: `default_inception_path()`).
    3. Nothing: rFID is skipped and the note says how to enable it.
    """
    if feature_extractor:
        return user_supplied(load_factory(feature_extractor)(), feature_extractor, "rFID")
    path = Path(inception_path) if inception_path else default_inception_path()
    if path.is_file():
        return MetricNetwork(InceptionTorchScript(path), f"{INCEPTION_FILENAME} (TorchScript)", standard=True)
    if inception_path:
        raise FileNotFoundError(f"no Inception TorchScript file at {inception_path}")
    return MetricNetwork(
        None,
        None,
        standard=False,
        note=(
            f"rFID skipped: the standard Inception weights were not found at {path} (download {INCEPTION_URL}); "
            "or pass a feature extractor 'package.module:factory' for a non-standard score"
        ),
    )
