import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from skimage import data
from torch import nn
from PIL import Image
from skimage.metrics import structural_similarity
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, SiglipTextConfig, SiglipTextModel

from dualtoken_hf import DualTokenImageProcessor, DualTokenVisionConfig, DualTokenVisionModel
from dualtoken_hf.evaluation import (
    CodeHistogram,
    FeatureStatistics,
    TokenizerEvaluator,
    class_text_embeddings,
    frechet_distance,
    load_class_names,
    zero_shot_correct,
)
from dualtoken_hf.evaluation.fid import resolve_fid_network
from dualtoken_hf.evaluation.perceptual import build_perceptual_loss, resolve_perceptual_network


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "evaluate_tokenizer.py"


def photo_pair() -> tuple[torch.Tensor, torch.Tensor]:
    """A real 64x64 photo in [0, 1] and the same photo with a constant offset plus noise, clamped."""
    image = torch.from_numpy(data.astronaut()[::8, ::8].copy()).permute(2, 0, 1).float()[None] / 255
    noise = torch.from_numpy(np.random.default_rng(0).normal(0, 0.05, image.shape)).float()
    return image, (image + 0.1 + noise).clamp(0, 1)


# Reconstruction metrics, as the evaluator computes them (images in [0, 1], data_range 1).


def evaluator_metrics(images: torch.Tensor, reconstructions: torch.Tensor) -> dict:
    """The PSNR / SSIM the evaluator reports for 64x64 inputs in [0, 1] whose reconstructions are given."""
    model = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).eval()
    model.decode = lambda codes: reconstructions * 2 - 1
    evaluator = TokenizerEvaluator(model)
    evaluator.update(images * 2 - 1)
    report = evaluator.report()
    return {"psnr": report["psnr"], "ssim": report["ssim"]}


def test_evaluator_psnr_of_constant_offset_is_exact():
    images = torch.full((1, 3, 64, 64), 0.25)
    images[..., ::2, :] = 0.5
    metrics = evaluator_metrics(images, images + 0.1)
    assert metrics["psnr"] == pytest.approx(10 * math.log10(1.0 / 0.1**2), abs=1e-4)


def test_evaluator_ssim_matches_skimage_on_a_photo():
    image, perturbed = photo_pair()
    metrics = evaluator_metrics(image, perturbed)
    expected_ssim = structural_similarity(
        perturbed[0].permute(1, 2, 0).double().numpy(),
        image[0].permute(1, 2, 0).double().numpy(),
        data_range=1.0,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    mse = (perturbed.double() - image.double()).pow(2).mean().item()
    assert metrics["ssim"] == pytest.approx(expected_ssim, abs=1e-5)
    assert metrics["psnr"] == pytest.approx(10 * math.log10(1.0 / mse), abs=1e-4)


# rFID


def test_frechet_distance_of_identical_feature_sets_is_zero():
    features = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    statistics = FeatureStatistics()
    statistics.update(features[:120])
    statistics.update(features[120:])
    assert frechet_distance(statistics.mean, statistics.covariance, statistics.mean, statistics.covariance) == (
        pytest.approx(0.0, abs=1e-8)
    )


def test_feature_statistics_match_numpy():
    features = torch.randn(50, 6, generator=torch.Generator().manual_seed(1)).double()
    statistics = FeatureStatistics()
    for chunk in features.split(7):
        statistics.update(chunk)
    np.testing.assert_allclose(statistics.mean.numpy(), features.mean(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(statistics.covariance.numpy(), np.cov(features.numpy(), rowvar=False), atol=1e-12)


def test_frechet_distance_of_shifted_scaled_gaussians_matches_closed_form():
    # N(mu, S) vs N(mu + delta, c S): d^2 = |delta|^2 + (1 - sqrt(c))^2 tr(S).
    generator = torch.Generator().manual_seed(2)
    root = torch.randn(5, 5, generator=generator, dtype=torch.float64)
    covariance = root @ root.T + 0.1 * torch.eye(5, dtype=torch.float64)
    mean, delta, scale = torch.randn(5, generator=generator, dtype=torch.float64), torch.full((5,), 0.5), 4.0
    expected = delta.pow(2).sum() + (1 - math.sqrt(scale)) ** 2 * covariance.trace()
    distance = frechet_distance(mean, covariance, mean + delta, scale * covariance)
    assert distance == pytest.approx(expected.item(), rel=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_for_non_commuting_covariances():
    linalg = pytest.importorskip("scipy.linalg")
    generator = torch.Generator().manual_seed(3)
    a, b = (torch.randn(6, 6, generator=generator, dtype=torch.float64) for _ in range(2))
    covariance_a, covariance_b = a @ a.T, b @ b.T
    mean_a, mean_b = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    sqrt_product = linalg.sqrtm(covariance_a.numpy() @ covariance_b.numpy()).real
    expected = 6.0 + np.trace(covariance_a.numpy()) + np.trace(covariance_b.numpy()) - 2 * np.trace(sqrt_product)
    assert frechet_distance(mean_a, covariance_a, mean_b, covariance_b) == pytest.approx(expected, rel=1e-8)


def test_rfid_is_skipped_with_a_reason_without_inception_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    network = resolve_fid_network()
    assert network.network is None and "rFID skipped" in network.note


def mean_color_features():
    """A pluggable rFID feature extractor for the tests: per-channel means and standard deviations."""
    return lambda images: torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def pixel_features():
    """A pluggable perceptual network for the tests: the pixels themselves are the one feature map."""
    return nn.Identity()


def unit_channels(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map / (feature_map.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)


def test_pluggable_networks_are_labelled_non_standard():
    fid = resolve_fid_network(f"{__name__}:mean_color_features")
    perceptual = resolve_perceptual_network(f"{__name__}:pixel_features")
    assert not fid.standard and "non-standard" in fid.note
    assert not perceptual.standard and "non-standard" in perceptual.note
    images, references = torch.rand(3, 3, 8, 8) * 2 - 1, torch.rand(3, 3, 8, 8) * 2 - 1
    expected = (unit_channels(images) - unit_channels(references)).pow(2).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(perceptual.network(images, references), expected)


# Perceptual networks: one loader for the LPIPS metric and the training loss


def test_perceptual_network_none_gives_no_network():
    assert build_perceptual_loss("none") is None
    skipped = resolve_perceptual_network("none")
    assert skipped.network is None and "'none'" in skipped.note


def test_lpips_without_its_package_fails_training_and_is_skipped_by_evaluation(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # makes `import lpips` fail, as where it is not installed
    with pytest.raises(ImportError, match="'lpips' needs the `lpips` package"):
        build_perceptual_loss("lpips")
    skipped = resolve_perceptual_network()
    assert skipped.network is None and skipped.note.startswith("LPIPS skipped: the lpips package could not be used")


class FakeLPIPS(nn.Module):
    """Stands in for `lpips.LPIPS`: remembers its backbone and, like it, returns distances of shape (B, 1, 1, 1)."""

    def __init__(self, net: str, verbose: bool):
        super().__init__()
        self.net = net

    def forward(self, images, references):
        return (images - references).abs().mean(dim=(1, 2, 3), keepdim=True)


def test_lpips_gives_one_distance_per_image_with_the_asked_backbone(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", SimpleNamespace(LPIPS=FakeLPIPS))
    images, references = torch.zeros(2, 3, 4, 4), torch.stack([torch.zeros(3, 4, 4), torch.ones(3, 4, 4)])
    evaluation = resolve_perceptual_network()
    assert evaluation.standard and evaluation.name == "lpips (alex)" and evaluation.network.lpips.net == "alex"
    assert evaluation.network(images, references).tolist() == [0.0, 1.0]
    assert build_perceptual_loss("lpips").lpips.net == "vgg"  # the training loss, as in the official recipe


def test_perceptual_network_from_a_factory_gives_lpips_style_distances_per_image(tmp_path, monkeypatch):
    (tmp_path / "tiny_features.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class TwoMaps(nn.Module):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.first = nn.Conv2d(3, 4, 3, padding=1)
                self.second = nn.Conv2d(4, 6, 3, stride=2, padding=1)
                self.dropout = nn.Dropout(0.5)

            def forward(self, images):
                first = self.first(images)
                return [first, self.dropout(self.second(first))]

        def build():
            return TwoMaps()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    loss = build_perceptual_loss("tiny_features:build")
    images, references = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    assert loss(images, images).tolist() == [0.0, 0.0]
    assert not any(parameter.requires_grad for parameter in loss.parameters())
    assert not loss.feature_extractor.training  # eval mode: the dropout is off, the distance deterministic

    maps = zip(loss.feature_extractor(images), loss.feature_extractor(references))
    expected = sum((unit_channels(a) - unit_channels(b)).pow(2).sum(1).mean(dim=(1, 2)) for a, b in maps)
    torch.testing.assert_close(loss(images, references), expected)


@pytest.mark.parametrize("name", ["vgg", "module_without_factory:", ":factory"])
def test_perceptual_network_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="'lpips', 'none' or 'package.module:factory'"):
        build_perceptual_loss(name)


def test_perceptual_factory_must_build_a_module():
    with pytest.raises(ValueError, match="must return an nn.Module"):
        build_perceptual_loss(f"{__name__}:mean_color_features")


# Codebooks


def test_code_histogram_matches_codebook_statistics_on_all_codes():
    quantizer = DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).pixel_quantizer
    codes = torch.randint(0, 40, (6, 8, 8, quantizer.depth), generator=torch.Generator().manual_seed(4))
    histogram = CodeHistogram(quantizer)
    histogram.update(codes[:4])
    histogram.update(codes[4:])
    expected = quantizer.codebook_statistics(codes)
    statistics = histogram.statistics()
    for name in ("usage", "perplexity", "dead_codes"):
        np.testing.assert_allclose(statistics[name], expected[name].double().numpy(), rtol=1e-6)


# Zero-shot


def tiny_text_tower(class_names: list[str], hidden: int = 8) -> tuple[SiglipTextModel, PreTrainedTokenizerFast]:
    """A random one-layer SigLIP text tower with a word-level tokenizer of the class names."""
    vocab = {"<pad>": 0, "<unk>": 1, **{name: index + 2 for index, name in enumerate(class_names)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    text_tokenizer = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>")
    config = SiglipTextConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        intermediate_size=hidden,
        num_hidden_layers=1,
        num_attention_heads=1,
        max_position_embeddings=4,
        projection_size=hidden,
    )
    torch.manual_seed(0)
    return SiglipTextModel(config).eval(), text_tokenizer


def test_zero_shot_is_perfect_on_a_separable_case():
    class_names = ["cat", "dog", "fox"]
    text_model, tokenizer = tiny_text_tower(class_names)
    text_embeddings = class_text_embeddings(text_model, tokenizer, class_names, templates=["a {}", "{}"])
    assert torch.allclose(text_embeddings.norm(dim=-1), torch.ones(3))
    # Pooled image embeddings near their class's text embedding (any scale: the comparison is by cosine).
    labels = torch.tensor([0, 1, 2, 2, 1, 0])
    noise = 0.05 * torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    image_embeddings = text_embeddings[labels] * 3 + noise
    assert zero_shot_correct(image_embeddings, labels, text_embeddings).all()
    assert not zero_shot_correct(image_embeddings, (labels + 1) % 3, text_embeddings).any()


def test_class_names_follow_sorted_folders(tmp_path):
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"n02": "dog", "n01": "cat"}))
    assert load_class_names(str(mapping), ["n01", "n02"]) == ["cat", "dog"]
    listing = tmp_path / "names.txt"
    listing.write_text("cat\ndog\n")
    assert load_class_names(str(listing), ["n01", "n02"]) == ["cat", "dog"]


# The script, end to end


@pytest.fixture(scope="module")
def tiny_tokenizer_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tokenizer")
    torch.manual_seed(0)
    DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).save_pretrained(folder)
    DualTokenImageProcessor.from_preset("tiny").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "coffee", "chelsea"):
        (folder / name).mkdir()
        Image.fromarray(getattr(data, name)()).save(folder / name / f"{name}.png")
    (folder / "coffee" / "broken.jpg").write_bytes(b"not an image")
    return folder


@torch.no_grad()
def expected_zero_shot_top1(model_folder, image_folder, text_model, text_tokenizer) -> dict[str, float]:
    """Top-1 accuracy, recomputed here, of the tokenizer's pooled output and of its own tower's (the teacher the
    script gets) against the class prompts: a cosine argmax over "a photo of a {class}." per class folder."""
    model = DualTokenVisionModel.from_pretrained(model_folder).eval()
    processor = DualTokenImageProcessor.from_pretrained(model_folder)
    folders = sorted(path.name for path in Path(image_folder).iterdir())
    images = [Image.open(next((Path(image_folder) / name).glob("*.png"))) for name in folders]
    pixel_values = processor(images, return_tensors="pt").pixel_values
    inputs = text_tokenizer([f"a photo of a {name}." for name in folders], padding="max_length", truncation=True,
                            max_length=text_model.config.max_position_embeddings, return_tensors="pt")
    prompts = torch.nn.functional.normalize(text_model(input_ids=inputs["input_ids"]).pooler_output, dim=-1)
    pooled = {"tokenizer": model.encode(pixel_values).pooler_output,
              "teacher": model.siglip(pixel_values).pooler_output}
    labels = torch.arange(len(folders))
    return {name: (torch.nn.functional.normalize(values, dim=-1) @ prompts.T).argmax(dim=-1).eq(labels).float()
            .mean().item() for name, values in pooled.items()}


def test_evaluation_script_writes_json_and_markdown(tiny_tokenizer_folder, photo_folder, tmp_path):
    output = tmp_path / "eval.json"
    text_model, text_tokenizer = tiny_text_tower(["astronaut", "chelsea", "coffee"], hidden=64)
    text_model.save_pretrained(tmp_path / "text")
    text_tokenizer.save_pretrained(tmp_path / "text")
    command = [
        sys.executable,
        str(SCRIPT),
        "--model", str(tiny_tokenizer_folder),
        "--data_dir", str(photo_folder),
        "--output", str(output),
        "--batch_size", "2",
        "--teacher", str(tiny_tokenizer_folder),
        "--text_model", str(tmp_path / "text"),
        "--fid_feature_extractor", "tests.test_evaluation:mean_color_features",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(output.read_text())
    assert report["num_images"] == 3 and report["num_unreadable"] == 1
    assert isinstance(report["psnr"], float) and isinstance(report["ssim"], float)
    assert isinstance(report["rfid"], float) and report["metric_networks"]["rfid"]["standard"] is False
    # The teacher is the tokenizer's own tower: identical up to the semantic layer, then the codebook intervenes.
    assert report["semantic_layer_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert report["semantic_layer_mse"] == pytest.approx(0.0, abs=1e-8)
    assert report["semantic_pooled_cosine"] < 1.0
    expected = expected_zero_shot_top1(tiny_tokenizer_folder, photo_folder, text_model, text_tokenizer)
    assert report["zero_shot_top1"] == pytest.approx(expected["tokenizer"], abs=1e-6)
    assert report["teacher_zero_shot_top1"] == pytest.approx(expected["teacher"], abs=1e-6)
    assert len(report["codebooks"]["pixel"]["usage"]) == 4 and len(report["codebooks"]["semantic"]["perplexity"]) == 4
    markdown = output.with_suffix(".md").read_text()
    assert "| psnr |" in markdown and "| pixel | 1 |" in markdown
