"""Evaluation of DualToken tokenizers: reconstruction (PSNR, SSIM, LPIPS, rFID), codebook usage, semantic fidelity
to a frozen teacher and zero-shot classification by text. The metrics and perceptual networks are also the ones
training logs and optimises (`dualtoken_hf.training` imports them from here). Not needed by Hub folders, so never
imported by the Hub-facing modules."""

from .codebooks import CodeHistogram
from .data import ImageFolder
from .fid import FeatureStatistics, frechet_distance, resolve_fid_network
from .metrics import psnr, ssim
from .perceptual import (
    PERCEPTUAL_LOSS_HELP,
    FeaturePerceptualLoss,
    LPIPSPerceptualLoss,
    build_perceptual_loss,
    resolve_perceptual_network,
)
from .plugins import MetricNetwork, load_factory
from .semantic import TeacherOutput, load_teacher, semantic_fidelity, teacher_outputs
from .tokenizer import TokenizerEvaluator, report_to_markdown
from .unified import answer_label, generation_accuracy, understanding_accuracy
from .zero_shot import (
    class_text_embeddings,
    load_class_names,
    load_templates,
    load_text_tower,
    zero_shot_correct,
    zero_shot_logits,
)


__all__ = [
    "PERCEPTUAL_LOSS_HELP",
    "CodeHistogram",
    "FeaturePerceptualLoss",
    "FeatureStatistics",
    "ImageFolder",
    "LPIPSPerceptualLoss",
    "MetricNetwork",
    "TeacherOutput",
    "TokenizerEvaluator",
    "answer_label",
    "build_perceptual_loss",
    "class_text_embeddings",
    "frechet_distance",
    "generation_accuracy",
    "load_class_names",
    "load_factory",
    "load_teacher",
    "load_templates",
    "load_text_tower",
    "psnr",
    "report_to_markdown",
    "resolve_fid_network",
    "resolve_perceptual_network",
    "semantic_fidelity",
    "ssim",
    "teacher_outputs",
    "understanding_accuracy",
    "zero_shot_correct",
    "zero_shot_logits",
]
