"""Evaluate a DualToken tokenizer: reconstruction (PSNR, SSIM, LPIPS, rFID), codebook usage per depth for both
branches, semantic fidelity to a frozen teacher and zero-shot top-1 by text (paper Tables 1 and 3).

Everything is computed in memory on float images (the inputs and the reconstructions clamped to [-1, 1]), with no
8-bit or JPEG round trip. PSNR is the same in the model's [-1, 1] space with `data_range=2.0`; SSIM is computed on
[0, 1] images, as published numbers are (its luminance term is not shift-invariant).
"""

import math

import torch

from ..configuration_dualtoken import BRANCHES
from ..modeling_dualtoken_vision import DualTokenVisionModel
from .codebooks import CodeHistogram
from .fid import FeatureStatistics, frechet_distance
from .metrics import psnr, ssim
from .plugins import MetricNetwork
from .semantic import semantic_fidelity, teacher_outputs
from .zero_shot import zero_shot_correct


SCALAR_METRICS = (
    "psnr",
    "ssim",
    "lpips",
    "rfid",
    "zero_shot_top1",
    "teacher_zero_shot_top1",
    "semantic_feature_cosine",
    "semantic_feature_mse",
    "semantic_layer_cosine",
    "semantic_layer_mse",
    "semantic_pooled_cosine",
    "semantic_pooled_mse",
)


class TokenizerEvaluator:
    """Accumulates a tokenizer's metrics over batches; `report()` gives the JSON-ready summary.

    Args:
        model: The tokenizer under evaluation.
        fid_network: rFID's feature extractor (see `resolve_fid_network`); `None` or an empty one skips rFID.
        perceptual_network: LPIPS' network (see `resolve_perceptual_network`); `None` or an empty one skips LPIPS.
        teacher: A frozen SigLIP vision tower for semantic fidelity (see `load_teacher`); `None` skips it.
        text_embeddings: Unit-norm class embeddings `(num_classes, E)` from `class_text_embeddings` for zero-shot
            top-1; `None` skips it.
    """

    def __init__(
        self,
        model: DualTokenVisionModel,
        fid_network: MetricNetwork | None = None,
        perceptual_network: MetricNetwork | None = None,
        teacher=None,
        text_embeddings: torch.Tensor | None = None,
    ):
        if (teacher is not None or text_embeddings is not None) and not model.siglip.use_head:
            raise ValueError("semantic fidelity and zero-shot need the tokenizer's pooling head (vision_use_head=True)")
        self.model = model.eval()
        self.fid_network = fid_network
        self.perceptual_network = perceptual_network
        self.teacher = teacher.eval() if teacher is not None else None
        self.text_embeddings = text_embeddings
        self.per_image: dict[str, list[torch.Tensor]] = {}
        self.num_images = 0
        self.input_statistics = FeatureStatistics()
        self.reconstruction_statistics = FeatureStatistics()
        self.histograms = {branch: CodeHistogram(model.quantizer(branch)) for branch in BRANCHES}

    def _record(self, name: str, values: torch.Tensor):
        self.per_image.setdefault(name, []).append(values.detach().float().reshape(-1).cpu())

    @torch.no_grad()
    def update(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        """Add a batch of normalized images `(B, 3, H, W)` in [-1, 1]; `labels` `(B,)` (class indices, -1 for
        unlabelled images) are needed for zero-shot top-1."""
        device = self.model.device
        pixel_values = pixel_values.to(device)
        encoded = self.model.encode(pixel_values, output_hidden_states=self.teacher is not None)
        reconstruction = self.model.decode(encoded.pixel_codes)
        self.num_images += pixel_values.shape[0]
        self._update_reconstruction(pixel_values, reconstruction)
        for branch in BRANCHES:
            self.histograms[branch].update(encoded.branch_codes(branch))
        teacher = None
        if self.teacher is not None:
            semantic_layer = self.model.config.semantic_layer
            teacher = teacher_outputs(self.teacher, pixel_values, semantic_layer)
            for name, values in semantic_fidelity(encoded, teacher, semantic_layer).items():
                self._record(name, values)
        if self.text_embeddings is not None and labels is not None:
            self._update_zero_shot(encoded.pooler_output, teacher, labels.to(device))

    def _update_reconstruction(self, pixel_values: torch.Tensor, reconstruction: torch.Tensor):
        images, reconstructed = pixel_values.float().clamp(-1, 1), reconstruction.float().clamp(-1, 1)
        self._record("psnr", psnr(reconstructed, images, data_range=2.0))
        self._record("ssim", ssim((reconstructed + 1) / 2, (images + 1) / 2, data_range=1.0))
        if self.perceptual_network is not None and self.perceptual_network.network is not None:
            self._record("lpips", self.perceptual_network.network(reconstructed, images))
        if self.fid_network is not None and self.fid_network.network is not None:
            # The FID network reads images in [0, 1].
            self.input_statistics.update(self.fid_network.network((images + 1) / 2))
            self.reconstruction_statistics.update(self.fid_network.network((reconstructed + 1) / 2))

    def _update_zero_shot(self, pooler_output: torch.Tensor, teacher, labels: torch.Tensor):
        labelled = labels >= 0
        if not labelled.any():
            return
        labels = labels[labelled]
        self._record("zero_shot_top1", zero_shot_correct(pooler_output[labelled], labels, self.text_embeddings))
        if teacher is not None:
            hits = zero_shot_correct(teacher.pooler_output[labelled], labels, self.text_embeddings)
            self._record("teacher_zero_shot_top1", hits)

    def _rfid(self) -> float | None:
        if self.input_statistics.count < 2:
            return None
        return frechet_distance(
            self.input_statistics.mean,
            self.input_statistics.covariance,
            self.reconstruction_statistics.mean,
            self.reconstruction_statistics.covariance,
        )

    def report(self) -> dict:
        """Scalar metrics at the top level (`null` when skipped; zero-shot as a fraction), per-depth codebook
        statistics under `"codebooks"`, the networks behind LPIPS and rFID under `"metric_networks"`, and `"notes"`
        saying what was skipped and why."""
        report = {"num_images": self.num_images}
        for name in SCALAR_METRICS:
            values = self.per_image.get(name)
            report[name] = torch.cat(values).mean().item() if values else None
        report["rfid"] = self._rfid()
        report["codebooks"] = {branch: histogram.statistics() for branch, histogram in self.histograms.items()}
        report["metric_networks"] = {
            "rfid": self.fid_network.describe() if self.fid_network else None,
            "lpips": self.perceptual_network.describe() if self.perceptual_network else None,
        }
        report["notes"] = self._notes(report)
        return report

    def _notes(self, report: dict) -> list[str]:
        notes = [network.note for network in (self.fid_network, self.perceptual_network) if network and network.note]
        if self.teacher is None:
            notes.append("semantic fidelity skipped: no teacher given")
        if self.text_embeddings is None:
            notes.append("zero-shot top-1 skipped: no text tower / class names given")
        elif report["zero_shot_top1"] is None:
            notes.append("zero-shot top-1 skipped: no labelled images (put images in one folder per class)")
        return notes


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    return str(value)


def report_to_markdown(report: dict, title: str = "Tokenizer evaluation") -> str:
    """A markdown rendering of `TokenizerEvaluator.report()` (plus any extra top-level scalars): a metric table, a
    per-depth codebook table and the notes."""
    lines = [f"## {title}", "", "| metric | value |", "|---|---|"]
    for name, value in report.items():
        if value is None or isinstance(value, (int, float)):
            lines.append(f"| {name} | {_format(value)} |")
    lines += ["", "| branch | depth | usage | perplexity | dead codes |", "|---|---|---|---|---|"]
    for branch, statistics in report.get("codebooks", {}).items():
        rows = zip(statistics["usage"], statistics["perplexity"], statistics["dead_codes"])
        for depth, (usage, perplexity, dead_codes) in enumerate(rows, start=1):
            lines.append(f"| {branch} | {depth} | {usage:.4f} | {perplexity:.2f} | {dead_codes} |")
    networks = {name: entry for name, entry in report.get("metric_networks", {}).items() if entry and entry["name"]}
    if networks:
        lines += [""] + [
            f"- {name}: {entry['name']} ({'standard' if entry['standard'] else 'non-standard'})"
            for name, entry in networks.items()
        ]
    if report.get("notes"):
        lines += ["", "Notes:"] + [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"
