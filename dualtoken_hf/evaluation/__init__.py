"""Evaluation of DualToken tokenizers: reconstruction (PSNR, SSIM, LPIPS, rFID), codebook usage, semantic fidelity
to a frozen teacher and zero-shot classification by text. Not needed by Hub folders, so never imported by the
Hub-facing modules."""

from .codebooks import CodeHistogram
from .data import ImageFolder
from .fid import FeatureStatistics, frechet_distance, resolve_fid_network
from .perceptual import resolve_perceptual_network
from .plugins import MetricNetwork, load_factory
from .semantic import TeacherOutput, load_teacher, semantic_fidelity, teacher_outputs
from .tokenizer import TokenizerEvaluator, report_to_markdown, to_unit_range
from .zero_shot import (
    class_text_embeddings,
    load_class_names,
    load_templates,
    load_text_tower,
    zero_shot_correct,
    zero_shot_logits,
)


__all__ = [
    "CodeHistogram",
    "FeatureStatistics",
    "ImageFolder",
    "MetricNetwork",
    "TeacherOutput",
    "TokenizerEvaluator",
    "class_text_embeddings",
    "frechet_distance",
    "load_class_names",
    "load_factory",
    "load_teacher",
    "load_templates",
    "load_text_tower",
    "report_to_markdown",
    "resolve_fid_network",
    "resolve_perceptual_network",
    "semantic_fidelity",
    "teacher_outputs",
    "to_unit_range",
    "zero_shot_correct",
    "zero_shot_logits",
]
