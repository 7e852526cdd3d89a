"""Zero-shot classification by text (CLIP/SigLIP protocol): an image gets the class whose prompt embeddings are the
most cosine-similar to its pooled image embedding.

Class embeddings are the mean over prompt templates of the L2-normalized text-tower `pooler_output`, normalized
again (CLIP's prompt ensembling). The image side is any `pooler_output` in the same space: a SigLIP vision tower's,
or the tokenizer's (computed from the quantized semantic features).
"""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, SiglipTextModel


DEFAULT_TEMPLATES = ("a photo of a {}.",)


def load_text_tower(path: str) -> tuple[SiglipTextModel, "AutoTokenizer"]:
    """A SigLIP text tower and its text tokenizer from a local folder (a full SigLIP checkpoint folder works too)."""
    return SiglipTextModel.from_pretrained(path, use_safetensors=True).eval(), AutoTokenizer.from_pretrained(path)


def load_class_names(path: str | None, class_folders: list[str]) -> list[str]:
    """Readable class names, one per class folder (folders sorted, as labels are assigned).

    `path` is a JSON object `{folder: name}`, a JSON list or a text file with one name per line (both in sorted
    folder order); `None` uses the folder names themselves.
    """
    if path is None:
        return list(class_folders)
    text = Path(path).read_text()
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        parsed = [line.strip() for line in text.splitlines() if line.strip()]
    names = [parsed[folder] for folder in class_folders] if isinstance(parsed, dict) else list(parsed)
    if len(names) != len(class_folders):
        raise ValueError(f"{path} names {len(names)} classes, but the data has {len(class_folders)} class folders")
    return names


def load_templates(path: str | None) -> list[str]:
    """Prompt templates with one `{}` for the class name: one per line of `path`, or `DEFAULT_TEMPLATES`."""
    if path is None:
        return list(DEFAULT_TEMPLATES)
    templates = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    bad = [template for template in templates if "{}" not in template]
    if not templates or bad:
        raise ValueError(f"every template in {path} must contain '{{}}' for the class name; got {bad or 'none'}")
    return templates


@torch.no_grad()
def class_text_embeddings(
    text_model: SiglipTextModel, text_tokenizer, class_names: list[str], templates: list[str] = DEFAULT_TEMPLATES
) -> torch.Tensor:
    """Unit-norm class embeddings `(num_classes, E)` from the text tower's `pooler_output` of every prompt.

    Prompts are padded to the tower's full length (`padding="max_length"`), as SigLIP was trained.
    """
    device = next(text_model.parameters()).device
    prompts = [template.format(name) for name in class_names for template in templates]
    inputs = text_tokenizer(
        prompts,
        padding="max_length",
        truncation=True,
        max_length=text_model.config.max_position_embeddings,
        return_tensors="pt",
    ).to(device)
    prompt_embeddings = F.normalize(text_model(input_ids=inputs["input_ids"]).pooler_output.float(), dim=-1)
    class_embeddings = prompt_embeddings.reshape(len(class_names), len(templates), -1).mean(dim=1)
    return F.normalize(class_embeddings, dim=-1)


def zero_shot_logits(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarities `(B, num_classes)` of pooled image embeddings `(B, E)` with unit-norm class embeddings."""
    return F.normalize(image_embeddings.float(), dim=-1) @ text_embeddings.to(image_embeddings.device).float().T


def zero_shot_correct(
    image_embeddings: torch.Tensor, labels: torch.Tensor, text_embeddings: torch.Tensor
) -> torch.Tensor:
    """Per-image top-1 hits `(B,)` (bool) of zero-shot classification."""
    predictions = zero_shot_logits(image_embeddings, text_embeddings).argmax(dim=-1)
    return predictions == labels.to(predictions.device)
