"""PSNR and SSIM agree with scikit-image, per image."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dualtoken_hf.evaluation import psnr, ssim


@pytest.fixture
def pair():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 40, 37, generator=generator) * 2 - 1
    noisy = (images + 0.2 * torch.randn(2, 3, 40, 37, generator=generator)).clamp(-1, 1)
    return images, noisy


def channels_last(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).double().numpy()


def test_psnr_matches_skimage_per_image(pair):
    images, noisy = pair
    expected = [peak_signal_noise_ratio(channels_last(a), channels_last(b), data_range=2.0)
                for a, b in zip(images, noisy)]
    assert psnr(noisy, images, data_range=2.0).tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("use_sample_covariance", [False, True])
def test_ssim_matches_skimage_gaussian_ssim_per_image(pair, use_sample_covariance):
    images, noisy = pair
    expected = [
        structural_similarity(channels_last(a), channels_last(b), data_range=2.0, channel_axis=-1,
                              gaussian_weights=True, sigma=1.5, use_sample_covariance=use_sample_covariance)
        for a, b in zip(noisy, images)
    ]
    ours = ssim(noisy, images, data_range=2.0, use_sample_covariance=use_sample_covariance)
    assert ours.tolist() == pytest.approx(expected, abs=1e-6)


def test_identical_images_score_ssim_one_and_psnr_inf(pair):
    images, _ = pair
    assert ssim(images, images, data_range=2.0).tolist() == pytest.approx([1.0, 1.0])
    assert torch.isinf(psnr(images, images, data_range=2.0)).all()


def test_metrics_reject_mismatched_shapes(pair):
    images, _ = pair
    with pytest.raises(ValueError, match="one shape"):
        psnr(images, images[:1], data_range=2.0)
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(images[..., :8, :8], images[..., :8, :8], data_range=2.0)
