"""Semantic fidelity: how close the tokenizer's semantic branch stays to a frozen SigLIP teacher (paper §3.2).

The teacher is the initial vision tower. Its output at the semantic layer is compared with the tokenizer's
`semantic_features` (the quantized semantic embeddings projected back to the SigLIP width) and with the tokenizer's
own unquantized semantic-layer output, and its pooled output with the tokenizer's `pooler_output`: the targets of the
paper's semantic loss.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import SiglipVisionModel

from ..configuration_dualtoken import DualTokenVisionConfig
from ..modeling_dualtoken_vision import DualTokenVisionModel, DualTokenVisionOutput


@dataclass
class TeacherOutput:
    """The frozen teacher's targets for one batch.

    features: `(B, h*w, hidden)` output of the block at the tokenizer's semantic layer.
    pooler_output: `(B, hidden)` pooled output of the whole tower.
    """

    features: torch.Tensor
    pooler_output: torch.Tensor


def load_teacher(path: str) -> SiglipVisionModel:
    """The teacher vision tower from a local folder: a DualToken tokenizer's SigLIP tower, or a SigLIP (vision)
    model."""
    config = json.loads((Path(path) / "config.json").read_text())
    if config.get("model_type") == DualTokenVisionConfig.model_type:
        return DualTokenVisionModel.from_pretrained(path, use_safetensors=True).siglip.eval()
    return SiglipVisionModel.from_pretrained(path, use_safetensors=True).eval()


@torch.no_grad()
def teacher_outputs(teacher: SiglipVisionModel, pixel_values: torch.Tensor, semantic_layer: int) -> TeacherOutput:
    """Run the teacher on normalized images and keep the semantic-layer features and the pooled output."""
    output = teacher(pixel_values=pixel_values.to(teacher.dtype), output_hidden_states=True)
    # hidden_states[0] is the patch embedding, hidden_states[i] the output of (1-indexed) block i.
    return TeacherOutput(features=output.hidden_states[semantic_layer], pooler_output=output.pooler_output)


def _per_image_cosine_and_mse(values: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity over the last dimension (averaged over positions, if any) and mean squared error, `(B,)`."""
    values, targets = values.float(), targets.float()
    cosine = F.cosine_similarity(values, targets, dim=-1)
    return cosine.reshape(cosine.shape[0], -1).mean(dim=1), (values - targets).pow(2).flatten(1).mean(dim=1)


def semantic_fidelity(
    encoded: DualTokenVisionOutput, teacher: TeacherOutput, semantic_layer: int
) -> dict[str, torch.Tensor]:
    """Per-image fidelity to the teacher, each `(B,)`: `{name}_cosine` and `{name}_mse` for

    - `semantic_feature`: the quantized semantic features (`encoded.semantic_features`) vs the teacher's
      semantic-layer output;
    - `semantic_layer`: the unquantized semantic-layer output vs the same (the target of the official eq. 4 loss;
      needs `encoded.hidden_states`);
    - `semantic_pooled`: the pooled outputs.
    """
    pairs = {
        "semantic_feature": (encoded.semantic_features, teacher.features),
        "semantic_layer": (encoded.hidden_states[semantic_layer], teacher.features),
        "semantic_pooled": (encoded.pooler_output, teacher.pooler_output),
    }
    fidelity = {}
    for name, (values, targets) in pairs.items():
        fidelity[f"{name}_cosine"], fidelity[f"{name}_mse"] = _per_image_cosine_and_mse(values, targets)
    return fidelity
