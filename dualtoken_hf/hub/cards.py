"""Model cards (`README.md` with Hub metadata) filled in from the templates of the top-level `model_cards/` folder.

There is one template per folder kind: `tokenizer.md`, `unified.md` and `lora_adapter.md`. They are Jinja templates,
rendered by `huggingface_hub.ModelCard.from_template` with the Hub metadata (`card_data`), the model's config and a
[`CardDetails`]. The folder writers of `dualtoken_hf.hub.writing` call the tokenizer and unified cards; a fine-tuning
script calls [`write_lora_card`] beside `PeftModel.save_pretrained`.
"""

import site
import sys
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..configuration_dualtoken import DualTokenConfig, DualTokenVisionConfig


PAPER_URL = "https://arxiv.org/abs/2503.14324"
COMMON_TAGS = ["dualtoken", "image-tokenizer", "residual-quantization", "siglip", "custom_code"]
TOKENIZER_TEMPLATE = "tokenizer.md"
UNIFIED_TEMPLATE = "unified.md"
LORA_TEMPLATE = "lora_adapter.md"
# A source checkout or editable install reads the repository's folder; a wheel installs it under
# `<prefix>/share/dualtoken_hf/model_cards` (setup.cfg `[options.data_files]`), the user base for `pip install --user`.
TEMPLATE_DIRS = (
    Path(__file__).resolve().parents[2] / "model_cards",
    Path(sys.prefix) / "share" / "dualtoken_hf" / "model_cards",
    Path(site.USER_BASE or sys.prefix) / "share" / "dualtoken_hf" / "model_cards",
)


@dataclass
class CardDetails:
    """
    What a model card says beyond the model's config.

    Args:
        origin: One sentence on where the weights come from (conversion, training, initialisation, export).
        facts: Details to list, in order (source checkpoint, epoch, ...); entries whose value is `None` are left out.
        repo_id: Hub id used in the usage snippet; defaults to the folder name.
        license: Hub license id of the weights.
        base_model: The checkpoint the weights started from (required for a LoRA adapter).
        dataset: A Hub dataset id the weights were trained on.
    """

    origin: str = "Saved with `dualtoken_hf`."
    facts: dict | None = None
    repo_id: str | None = None
    license: str = "apache-2.0"
    base_model: str | None = None
    dataset: str | None = None


def template_path(name: str) -> Path:
    """The card template `name` from the first of `TEMPLATE_DIRS` that holds it."""
    for folder in TEMPLATE_DIRS:
        if (folder / name).is_file():
            return folder / name
    searched = ", ".join(str(folder) for folder in TEMPLATE_DIRS)
    raise FileNotFoundError(f"model card template {name!r} not found; searched {searched}")


def _write_card(
    folder: str | Path,
    template: str,
    details: CardDetails,
    tags: list[str],
    pipeline_tag: str,
    library_name: str = "transformers",
    **variables,
) -> ModelCard:
    """Render `template` with `variables` and the Hub metadata, save it as `folder/README.md`."""
    card_data = ModelCardData(
        library_name=library_name,
        license=details.license,
        tags=[*COMMON_TAGS, *tags],
        pipeline_tag=pipeline_tag,
        base_model=details.base_model,
        datasets=[details.dataset] if details.dataset else None,
    )
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path(template)),
        origin=details.origin,
        facts=details.facts,
        repo_id=details.repo_id or Path(folder).name,
        paper_url=PAPER_URL,
        **variables,
    )
    card.save(Path(folder) / "README.md")
    return card


def write_tokenizer_card(folder: str | Path, config: DualTokenVisionConfig, details: CardDetails) -> ModelCard:
    """Write the `README.md` of a tokenizer folder (template `tokenizer.md`, pipeline tag `image-feature-extraction`),
    describing the model from `config`."""
    return _write_card(
        folder, TOKENIZER_TEMPLATE, details, ["vision-tokenizer"], "image-feature-extraction", config=config
    )


def write_unified_card(folder: str | Path, config: DualTokenConfig, details: CardDetails) -> ModelCard:
    """Write the `README.md` of a unified model folder (template `unified.md`, pipeline tag `any-to-any`, also tagged
    text-to-image and image-text-to-text), describing the model from `config`."""
    tags = ["multimodal", "text-to-image", "image-text-to-text", "image-generation"]
    return _write_card(folder, UNIFIED_TEMPLATE, details, tags, "any-to-any", config=config)


def write_lora_card(folder: str | Path, lora_config, details: CardDetails) -> ModelCard:
    """
    Write the `README.md` of a LoRA adapter folder of the unified model (template `lora_adapter.md`, `library_name:
    peft`). `lora_config` is the adapter's `peft.LoraConfig` (rank, alpha, dropout, target modules and modules saved
    in full are listed); `details.base_model`, the unified model the adapter applies to, is required.
    """
    if not details.base_model:
        raise ValueError("a LoRA adapter card needs details.base_model (the unified model the adapter applies to)")
    tags = ["multimodal", "lora", "peft", "text-to-image", "image-text-to-text"]
    return _write_card(
        folder, LORA_TEMPLATE, details, tags, "any-to-any", library_name="peft", lora_config=lora_config
    )


__all__ = ["CardDetails", "template_path", "write_lora_card", "write_tokenizer_card", "write_unified_card"]
