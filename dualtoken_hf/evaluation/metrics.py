"""Reconstruction metrics on image tensors: PSNR and SSIM, one value per image, for evaluation reports and training
logs alike.

Both take `(B, 3, H, W)` float tensors on one scale and that scale's `data_range` (max - min): 2.0 for the model's
[-1, 1] space, 1.0 for [0, 1], 255.0 for 0..255. Clamp reconstructions to the range first (decoder outputs are not
clamped); the metrics do not clamp. PSNR is the same on every scale; SSIM is not (its luminance term compares
absolute means), so compute it on [0, 1] or 0..255 images to compare with published numbers.
"""

import torch
import torch.nn.functional as F


def _check_pair(images: torch.Tensor, references: torch.Tensor):
    if images.shape != references.shape or images.ndim != 4:
        raise ValueError(
            f"images and references must be (B, C, H, W) tensors of one shape, got {tuple(images.shape)} and "
            f"{tuple(references.shape)}"
        )


def psnr(images: torch.Tensor, references: torch.Tensor, data_range: float) -> torch.Tensor:
    """Peak signal-to-noise ratio `10 log10(data_range^2 / MSE)` per image, in dB, shape `(B,)` (inf if equal)."""
    _check_pair(images, references)
    mse = (images.double() - references.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def _gaussian_window(sigma: float, truncate: float, dtype, device) -> torch.Tensor:
    # scipy.ndimage's kernel, as skimage uses it: radius int(truncate * sigma + 0.5), normalised to sum 1.
    radius = int(truncate * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def _filter(images: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter per channel: keeps only positions whose window lies inside the image,
    exactly the region skimage averages after cropping its padded result."""
    channels = images.shape[1]
    size = window.numel()
    rows = window.view(1, 1, size, 1).expand(channels, 1, size, 1)
    columns = window.view(1, 1, 1, size).expand(channels, 1, 1, size)
    return F.conv2d(F.conv2d(images, rows, groups=channels), columns, groups=channels)


def ssim(
    images: torch.Tensor,
    references: torch.Tensor,
    data_range: float,
    sigma: float = 1.5,
    use_sample_covariance: bool = False,
) -> torch.Tensor:
    """
    Structural similarity per image, shape `(B,)`: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, averaged over positions and channels.

    Matches `skimage.metrics.structural_similarity(image, reference, data_range=data_range, channel_axis=-1,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`; `use_sample_covariance=True` matches skimage's
    default normalisation of the (co)variances by N / (N - 1) instead. Images need sides of at least 11 pixels.
    """
    _check_pair(images, references)
    window = _gaussian_window(sigma, truncate=3.5, dtype=torch.float64, device=images.device)
    if min(images.shape[-2:]) < window.numel():
        raise ValueError(f"ssim needs images of at least {window.numel()}x{window.numel()}, got {tuple(images.shape)}")
    x, y = images.double(), references.double()
    mean_x, mean_y = _filter(x, window), _filter(y, window)
    covariance_norm = window.numel() ** 2 / (window.numel() ** 2 - 1) if use_sample_covariance else 1.0
    variance_x = covariance_norm * (_filter(x * x, window) - mean_x**2)
    variance_y = covariance_norm * (_filter(y * y, window) - mean_y**2)
    covariance = covariance_norm * (_filter(x * y, window) - mean_x * mean_y)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ssim_map = ((2 * mean_x * mean_y + c1) * (2 * covariance + c2)) / (
        (mean_x**2 + mean_y**2 + c1) * (variance_x + variance_y + c2)
    )
    return ssim_map.flatten(1).mean(dim=1).float()
