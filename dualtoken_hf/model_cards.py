"""Model cards (`README.md` with Hub metadata) for the folders the command line writes.

Both cards state where the weights come from (`origin`), describe the model from its config, show how to use it from
the Hub without this package, and list `facts` (a dict, in order), if any, under "Details".
"""

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .configuration_dualtoken import DualTokenConfig, DualTokenVisionConfig


PAPER_URL = "https://arxiv.org/abs/2503.14324"
COMMON_TAGS = ["dualtoken", "image-tokenizer", "residual-quantization", "siglip", "custom_code"]

TOKENIZER_BODY = """
# DualToken vision tokenizer

{origin}

A [DualToken]({paper}) tokenizer: one SigLIP ViT whose layer {pixel_layer} feeds a **pixel** residual codebook
(reconstruction, generation) and whose layer {semantic_layer} feeds a **semantic** residual codebook (understanding).
{vision_summary}

## Usage

```python
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained("{repo}", trust_remote_code=True)

pixel_values = processor(Image.open("photo.jpg"), return_tensors="pt").pixel_values
with torch.no_grad():
    codes = model.encode(pixel_values)          # codes.pixel_codes, codes.semantic_codes: (B, h, w, D)
    images = model.decode(codes.pixel_codes)    # (B, 3, H, W) in [-1, 1]
processor.postprocess(images)[0].save("reconstruction.png")
```
"""

UNIFIED_BODY = """
# DualToken

{origin}

A unified [DualToken]({paper}) model: a `{llm}` language model ({llm_layers} layers, width {llm_width}) that reads
and writes images through a dual-codebook vision tokenizer. {vision_summary} An image enters the LLM as one embedding
per position; two depth-transformer heads predict the pixel and semantic codes of the next position, and only the
pixel codes are decoded to pixels.

## Usage

```python
from PIL import Image
from transformers import pipeline

# Text to image (classifier-free guidance, scale 3 as in the paper)
text_to_image = pipeline("text-to-image", model="{repo}", trust_remote_code=True)
text_to_image("a red fox in the snow", guidance_scale=3.0, seed=0)[0]["generated_image"].save("fox.png")

# Image to text
describe = pipeline("image-text-to-text", model="{repo}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image", "image": Image.open("photo.jpg")}},
                                        {{"type": "text", "text": "Describe this image."}}]}}]
print(describe(text=messages, max_new_tokens=64)[0]["generated_text"][-1]["content"])
```

"""


def _vision_summary(config: DualTokenVisionConfig) -> str:
    pixel, semantic = config.pixel_quantizer_config, config.semantic_quantizer_config
    return (
        f"A {config.image_size}x{config.image_size} image becomes {config.grid_size}x{config.grid_size} positions x "
        f"{pixel['depth']} pixel codes (vocabulary {pixel['codebook_size']}) and x {semantic['depth']} semantic codes "
        f"(vocabulary {semantic['codebook_size']})."
    )


def _save_card(folder: str | Path, card_data: ModelCardData, body: str, facts: dict | None) -> ModelCard:
    """Write the card; `facts`, when given, become a "Details" list."""
    if facts:
        body += "\n## Details\n\n" + "\n".join(f"- **{key}**: {value}" for key, value in facts.items()) + "\n"
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    card.save(Path(folder) / "README.md")
    return card


def write_tokenizer_card(
    folder: str | Path,
    config: DualTokenVisionConfig,
    origin: str,
    facts: dict | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    base_model: str | None = None,
    dataset: str | None = None,
) -> ModelCard:
    """
    Write the `README.md` of a tokenizer folder (pipeline tag `image-feature-extraction`).

    Args:
        folder: The saved tokenizer folder.
        config: Its config, for the architecture summary.
        origin: One sentence on where the weights come from (conversion, training, initialisation).
        facts: Details to list, in order (source checkpoint, epoch, ...).
        repo_id: Used in the usage snippet; defaults to the folder name.
        license: Hub license id of the weights.
        base_model: The SigLIP checkpoint or tokenizer the weights started from.
        dataset: A Hub dataset id the weights were trained on.
    """
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=[*COMMON_TAGS, "vision-tokenizer"],
        pipeline_tag="image-feature-extraction",
        base_model=base_model,
        datasets=[dataset] if dataset else None,
    )
    body = TOKENIZER_BODY.format(
        origin=origin,
        paper=PAPER_URL,
        pixel_layer=config.pixel_layer,
        semantic_layer=config.semantic_layer,
        vision_summary=_vision_summary(config),
        repo=repo_id or Path(folder).name,
    )
    return _save_card(folder, card_data, body, facts)


def write_unified_card(
    folder: str | Path,
    config: DualTokenConfig,
    origin: str,
    facts: dict | None = None,
    repo_id: str | None = None,
    license: str = "apache-2.0",
) -> ModelCard:
    """
    Write the `README.md` of a unified model folder (pipeline tag `any-to-any`, also tagged text-to-image and
    image-text-to-text). Arguments as for [`write_tokenizer_card`].
    """
    card_data = ModelCardData(
        library_name="transformers",
        license=license,
        tags=[*COMMON_TAGS, "multimodal", "text-to-image", "image-text-to-text", "image-generation"],
        pipeline_tag="any-to-any",
    )
    text_config = config.text_config
    body = UNIFIED_BODY.format(
        origin=origin,
        paper=PAPER_URL,
        llm=text_config.model_type,
        llm_layers=text_config.num_hidden_layers,
        llm_width=text_config.hidden_size,
        vision_summary=_vision_summary(config.vision_config),
        repo=repo_id or Path(folder).name,
    )
    return _save_card(folder, card_data, body, facts)


__all__ = ["write_tokenizer_card", "write_unified_card"]
