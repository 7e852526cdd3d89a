"""The unified model's training stages and their data: which modules each stage trains, the paper's defaults, and
image-caption pairs turned into captioning and text-to-image sequences.

The four AdamW stages of the paper's later version (`../shared/paper/later-version-notes.md`):

| stage | trains | data | learning rate | batch |
|---|---|---|---|---|
| `align` | image projector (LLM frozen) | image-caption (captioning) | 1e-3 | 64 |
| `understand` | image projector + LLM | understanding (captioning) | 2e-5 | 256 |
| `generate` | pixel and semantic heads (LLM frozen) | text-to-image | 1e-4 | 128 |
| `joint` | everything but the tokenizer | both | 1e-5 | 256 (the paper: 512, then 256) |

The vision tokenizer is never trained. Freezing goes by module name: a stage trains the parameters of its module
groups (`MODULE_GROUPS`) and nothing else.
"""

import dataclasses
import logging
from pathlib import Path

import datasets
import torch
from torch import nn

from ..image_processing_dualtoken import open_image
from ..processing_dualtoken import DualTokenProcessor
from .data import MAX_CONSECUTIVE_UNREADABLE


logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CAPTION_PROMPT = "Describe this image."
TASKS = ("caption", "generate")
# The tied output layer (`lm_head`, the input embeddings in every preset) trains with the LLM.
MODULE_GROUPS = {
    "image_projector": ("image_projector",),
    "language_model": ("language_model", "lm_head"),
    "pixel_head": ("pixel_head",),
    "semantic_head": ("semantic_head",),
}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: the module groups it trains, the tasks its data feeds, and the paper's AdamW learning
    rate and global batch size."""

    name: str
    trains: tuple[str, ...]
    tasks: tuple[str, ...]
    learning_rate: float
    batch_size: int


STAGES = {
    "align": Stage("align", ("image_projector",), ("caption",), 1e-3, 64),
    "understand": Stage("understand", ("image_projector", "language_model"), ("caption",), 2e-5, 256),
    "generate": Stage("generate", ("pixel_head", "semantic_head"), ("generate",), 1e-4, 128),
    "joint": Stage("joint", tuple(MODULE_GROUPS), TASKS, 1e-5, 256),
}


def data_files_builder(data_files: list[str]) -> str:
    """The `datasets` builder of data files (`json` for .json/.jsonl, `parquet`); all must be of one kind."""
    suffixes = sorted({Path(path).suffix.lower() for path in data_files})
    builders = {DATA_FILE_BUILDERS.get(suffix) for suffix in suffixes}
    if None in builders or len(builders) != 1:
        raise ValueError(f"data files must all be of one kind among {sorted(DATA_FILE_BUILDERS)}, got {suffixes}")
    return builders.pop()


def image_source(value, image_root: str | Path):
    """A data row's image for `open_image`: a relative path is read from `image_root` (the data's folder, not
    wherever the script runs); anything else is returned as it is."""
    if isinstance(value, str) and not Path(value).is_absolute():
        return str(Path(image_root) / value)
    return value


def apply_stage(model: nn.Module, stage: Stage) -> list[str]:
    """Freeze every parameter of `model` but those of the stage's module groups; returns the names of the trained
    ones. Raises `ValueError` when a group matches no parameter of the model."""
    model.requires_grad_(False)
    trained = []
    parameters = list(model.named_parameters())
    for group in stage.trains:
        prefixes = MODULE_GROUPS[group]
        names = [name for name, _ in parameters if any(name.startswith(f"{prefix}.") for prefix in prefixes)]
        if not names:
            raise ValueError(f"stage {stage.name!r} trains {group!r} (modules {prefixes}) but the model has no "
                             "parameter there")
        trained += names
    trained_set = set(trained)
    for name, parameter in parameters:
        if name in trained_set:
            parameter.requires_grad_(True)
    return trained


class SequenceBuilder:
    """Token ids and labels of the two tasks an image-caption pair gives, formatted as at inference.

    - `caption`: a user turn with the image and `CAPTION_PROMPT`, the caption as the assistant's reply; the loss
      is on the reply only (the image positions are inputs).
    - `generate`: the prompt `processor(text, generation_mode="image")` builds (a user turn with the caption, the
      assistant generation prompt, begin-of-image), then the image positions and end-of-image, which are the
      targets.
    """

    def __init__(self, processor: DualTokenProcessor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = processor.image_token_id
        self.image_ids = [self.image_token_id] * processor.num_image_tokens + [processor.eoi_token_id]

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def caption(self, caption: str) -> tuple[list[int], list[int]]:
        user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
        reply = [{"role": "assistant", "content": [{"type": "text", "text": caption}]}]
        prompt = self.processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        conversation = self.processor.apply_chat_template(user + reply, tokenize=False)
        if not conversation.startswith(prompt):
            raise ValueError("the chat template renders a conversation that does not start with its generation prompt")
        expanded = prompt.replace(self.processor.image_token, self.processor.replace_image_token({}, 0))
        prompt_ids, reply_ids = self._ids(expanded), self._ids(conversation[len(prompt) :])
        return prompt_ids + reply_ids, [IGNORE_INDEX] * len(prompt_ids) + reply_ids

    def generate(self, caption: str) -> tuple[list[int], list[int]]:
        prompt_ids = list(self.processor(text=[caption], generation_mode="image")["input_ids"][0])
        return prompt_ids + self.image_ids, [IGNORE_INDEX] * len(prompt_ids) + self.image_ids


def codes_of(row: dict, branch: str) -> torch.LongTensor:
    """The `(h, w, D)` codes of one row of a pretokenized dataset (`examples/pretokenize.py`)."""
    return torch.tensor(row[f"{branch}_codes"], dtype=torch.long).view(row[f"{branch}_shape"])


class CaptionPairsDataset(torch.utils.data.Dataset):
    """
    Image-caption pairs, each used once per task of the stage: item `i` is pair `i // len(tasks)` in task
    `tasks[i % len(tasks)]`. Rows hold an image (a path, relative ones read from `image_root`, or a `datasets`
    image) or the codes of a pretokenized dataset (then the vision tokenizer does not run). An unreadable image is
    skipped for the next pair and counted in `skipped_images`.
    """

    def __init__(self, pairs: datasets.Dataset, tasks: tuple[str, ...], builder: SequenceBuilder,
                 image_column: str = "image", text_column: str = "text", image_root: str | Path = "."):
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise ValueError(f"tasks must be among {TASKS}, got {unknown}")
        self.pairs, self.tasks, self.builder = pairs, tasks, builder
        self.image_column, self.text_column, self.image_root = image_column, text_column, Path(image_root)
        self.pretokenized = "pixel_codes" in pairs.column_names
        missing = [name for name in (text_column, None if self.pretokenized else image_column)
                   if name is not None and name not in pairs.column_names]
        if missing:
            raise ValueError(f"columns {missing} not found; the data has columns {pairs.column_names}")

    def __len__(self) -> int:
        return len(self.pairs) * len(self.tasks)

    def _image(self, row: dict) -> dict | None:
        if self.pretokenized:
            return {"pixel_codes": codes_of(row, "pixel"), "semantic_codes": codes_of(row, "semantic")}
        try:
            image = open_image(image_source(row[self.image_column], self.image_root))
        except ValueError as error:
            logger.warning("skipping unreadable image: %s", error)
            return None
        return {"pixel_values": self.builder.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]}

    def __getitem__(self, index: int) -> dict:
        pair, task = divmod(index, len(self.tasks))
        attempts = min(len(self.pairs), MAX_CONSECUTIVE_UNREADABLE)
        for skipped in range(attempts):
            row = self.pairs[(pair + skipped) % len(self.pairs)]
            image = self._image(row)
            if image is not None:
                input_ids, labels = getattr(self.builder, self.tasks[task])(row[self.text_column])
                return {"input_ids": input_ids, "labels": labels, "skipped_images": skipped, **image}
        raise RuntimeError(f"no readable image among {attempts} consecutive pairs from position {pair}")


def collate_sequences(examples: list[dict], pad_token_id: int) -> dict:
    """Right-pad `input_ids` (with `pad_token_id`) and `labels` (with -100) into `(B, L)` tensors with their
    `attention_mask`; stack the examples' images (`pixel_values`, or `pixel_codes` and `semantic_codes`) in order."""
    length = max(len(example["input_ids"]) for example in examples)
    batch = {
        "input_ids": torch.tensor([e["input_ids"] + [pad_token_id] * (length - len(e["input_ids"])) for e in examples]),
        "labels": torch.tensor([e["labels"] + [IGNORE_INDEX] * (length - len(e["labels"])) for e in examples]),
        "attention_mask": torch.tensor([[1] * len(e["input_ids"]) + [0] * (length - len(e["input_ids"]))
                                        for e in examples]),
        "skipped_images": torch.tensor([example["skipped_images"] for example in examples]),
    }
    for name in ("pixel_values", "pixel_codes", "semantic_codes"):
        if name in examples[0]:
            batch[name] = torch.stack([example[name] for example in examples])
    return batch


__all__ = [
    "CAPTION_PROMPT",
    "DATA_FILE_BUILDERS",
    "IGNORE_INDEX",
    "MODULE_GROUPS",
    "STAGES",
    "TASKS",
    "CaptionPairsDataset",
    "SequenceBuilder",
    "Stage",
    "apply_stage",
    "codes_of",
    "collate_sequences",
    "data_files_builder",
    "image_source",
]
