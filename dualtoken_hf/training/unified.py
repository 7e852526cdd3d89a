"""Training the unified model: which modules each stage trains, the paper's defaults, image-caption pairs and image
chats turned into sequences and mixed by task, the LoRA targets, and the training loop the example scripts share.

The four AdamW stages of the paper's later version (`../shared/paper/later-version-notes.md`):

| stage | trains | data | learning rate | batch |
|---|---|---|---|---|
| `align` | image projector (LLM frozen) | image-caption pairs (captioning) | 1e-3 | 64 |
| `understand` | image projector + LLM | understanding (captioning and/or image chats) | 2e-5 | 256 |
| `generate` | generation projectors + pixel and semantic heads (LLM frozen) | text-to-image | 1e-4 | 128 |
| `joint` | everything but the tokenizer | all three tasks | 1e-5 | 256 (the paper: 512, then 256) |

The vision tokenizer is never trained. Freezing goes by module name: a stage trains the parameters of its module
groups (`MODULE_GROUPS`) and nothing else. A model whose config has no generation projectors
(`generation_projector=False`, e.g. the `tiny` preset) runs every stage without them.

Three tasks (`TASKS`), each a sequence formatted as at inference ([`SequenceBuilder`]): `caption` and `generate`
use image-caption pairs ([`CaptionPairs`]: captioning, text-to-image), `chat` uses image chats ([`ImageChats`]:
LLaVA `conversations` or `messages` rows, one image each, the loss on the assistant turns). A stage trains the tasks
of its `Stage.tasks` that the given data feed ([`trained_tasks`]); [`TaskMixture`] lays out each epoch: every pair
once per task and every chat once, or, with task ratios, a deterministic draw of each task's share
(see [`TaskMixture`]).

Text-to-image examples drop their caption with a probability (`caption_dropout`) for classifier-free guidance: the
prompt becomes `unconditional_input_ids` of it, exactly the unconditional prompt `generate(generation_mode="image")`
runs beside it at inference.

[`PairsTrainer`] is the Accelerate loop on these data that `examples/train_unified.py` (one stage) and
`examples/finetune_lora.py` (LoRA adapters) share, with their common command-line arguments
([`add_data_arguments`], [`add_training_arguments`], [`add_hub_arguments`]) and the final upload
([`push_output_dir`]).
"""

import argparse
import dataclasses
import logging
import math
import re
from pathlib import Path

import datasets
import numpy as np
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DistributedDataParallelKwargs, ProjectConfiguration
from diffusers.optimization import SchedulerType, get_scheduler
from torch import nn
from tqdm.auto import tqdm

from ..cli.parser import non_negative_float, non_negative_int, positive_float, positive_int
from ..hub.locking import LOCK_FILE
from ..image_processing_dualtoken import open_image
from ..modeling_dualtoken import unconditional_input_ids
from ..processing_dualtoken import DualTokenProcessor
from .checkpointing import (
    TrainingState,
    add_checkpoint_arguments,
    claim_output_dir,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from .data import MAX_CONSECUTIVE_UNREADABLE, without_global_rng
from .hub import OUTPUT_DIR_IGNORE_PATTERNS, HubUploader
from .nonfinite import NonFiniteGuard
from .schedules import warmup_warning
from .tracking import JSONLinesTracker
from .weights_only import check_weights_only


logger = logging.getLogger(__name__)
# The training loop's messages, from the main process only (needs the Accelerator, unlike the data's warnings).
run_logger = get_logger(__name__)

IGNORE_INDEX = -100
LOSS_TERMS = ("loss", "text_loss", "pixel_loss", "semantic_loss")
# What an --output_dir holds besides the final folder: checkpoints, logs, the run's summary and lock.
NOT_PUSHED = [*OUTPUT_DIR_IGNORE_PATTERNS, "train_summary.json", LOCK_FILE]
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CAPTION_PROMPT = "Describe this image."
TASKS = ("caption", "generate", "chat")
# The tasks each kind of data feeds.
PAIR_TASKS = ("caption", "generate")
CHAT_TASKS = ("chat",)
# LLaVA's image placeholder in the text of a conversation (`DEFAULT_IMAGE_TOKEN`).
IMAGE_PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
CONVERSATION_COLUMNS = ("conversations", "messages")
# The paper gives no rate; 10 % of captions dropped is the usual choice of autoregressive text-to-image models
# (LlamaGen, Janus).
CAPTION_DROPOUT = 0.1
# The tied output layer (`lm_head`, the input embeddings in every preset) trains with the LLM.
MODULE_GROUPS = {
    "image_projector": ("image_projector",),
    "language_model": ("language_model", "lm_head"),
    "generation_projectors": ("pixel_generation_projector", "semantic_generation_projector"),
    "pixel_head": ("pixel_head",),
    "semantic_head": ("semantic_head",),
}


@dataclasses.dataclass(frozen=True)
class Stage:
    """One training stage: the module groups it trains, the tasks it trains those of which the given data feed, and
    the paper's AdamW learning rate and global batch size."""

    name: str
    trains: tuple[str, ...]
    tasks: tuple[str, ...]
    learning_rate: float
    batch_size: int


STAGES = {
    "align": Stage("align", ("image_projector",), ("caption",), 1e-3, 64),
    "understand": Stage("understand", ("image_projector", "language_model"), ("caption", "chat"), 2e-5, 256),
    "generate": Stage("generate", ("generation_projectors", "pixel_head", "semantic_head"), ("generate",), 1e-4, 128),
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


def _configured_without(model: nn.Module, group: str) -> bool:
    """Whether `model`'s config leaves out the module group `group` (only the generation projectors are optional)."""
    return group == "generation_projectors" and not getattr(model.config, "generation_projector", False)


def apply_stage(model: nn.Module, stage: Stage) -> list[str]:
    """Freeze every parameter of `model` but those of the stage's module groups; returns the names of the trained
    ones. Raises `ValueError` when a group matches no parameter of the model, except the generation projectors of a
    model configured without them."""
    model.requires_grad_(False)
    trained = []
    parameters = list(model.named_parameters())
    for group in stage.trains:
        prefixes = MODULE_GROUPS[group]
        names = [name for name, _ in parameters if any(name.startswith(f"{prefix}.") for prefix in prefixes)]
        if not names and not _configured_without(model, group):
            raise ValueError(f"stage {stage.name!r} trains {group!r} (modules {prefixes}) but the model has no "
                             "parameter there")
        trained += names
    trained_set = set(trained)
    for name, parameter in parameters:
        if name in trained_set:
            parameter.requires_grad_(True)
    return trained


def conversation_messages(conversation: list[dict]) -> list[dict]:
    """
    A conversation in the messages format whatever its format: LLaVA turns (`{"from": "human"|"gpt"|"system",
    "value": str}`) or messages (`{"role": ..., "content": str or [{"type": "image"}, {"type": "text", "text": ...}]}`).
    Every text is split at `IMAGE_PLACEHOLDER` (`<image>`) into image items, so `"<image>\\nWhat is this?"` and
    `[{"type": "image"}, {"type": "text", "text": "\\nWhat is this?"}]` are the same message. A LLaVA conversation
    with no placeholder gets the image at the start of its first human turn, followed by a newline (LLaVA's
    convention). Raises `ValueError` for an unknown LLaVA role or content item.
    """
    if not conversation:
        raise ValueError("the conversation is empty")
    llava = "from" in conversation[0]
    messages = []
    for turn in conversation:
        if llava:
            if turn["from"] not in LLAVA_ROLES:
                raise ValueError(f"LLaVA turns come from {sorted(LLAVA_ROLES)}, got {turn['from']!r}")
            role, content = LLAVA_ROLES[turn["from"]], turn["value"]
        else:
            role, content = turn["role"], turn["content"]
        messages.append({"role": role, "content": _content_items(content)})
    if llava and not any(item["type"] == "image" for message in messages for item in message["content"]):
        first_user = next((message for message in messages if message["role"] == "user"), None)
        if first_user is None:
            raise ValueError("the LLaVA conversation has no human turn to put its image in")
        first_user["content"] = _content_items(IMAGE_PLACEHOLDER + "\n") + first_user["content"]
    return messages


def _content_items(content) -> list[dict]:
    """Message content (a string, or a list of image and text items) as image and text items, texts split at
    `IMAGE_PLACEHOLDER`."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    items = []
    for item in content:
        if item["type"] == "image":
            items.append({"type": "image"})
        elif item["type"] == "text":
            for index, text in enumerate(item["text"].split(IMAGE_PLACEHOLDER)):
                if index:
                    items.append({"type": "image"})
                if text:
                    items.append({"type": "text", "text": text})
        else:
            raise ValueError(f"message content items are 'image' or 'text', got type {item['type']!r}")
    return items


class SequenceBuilder:
    """Token ids and labels of the three tasks, formatted as at inference.

    - `chat`: a conversation (messages format, exactly one image item) rendered with the processor's chat template,
      the image placeholder expanded as the processor expands it; the loss is on the assistant turns (each with its
      `<|im_end|>`, the `{% generation %}` blocks of the template), not on the rest (image positions included).
    - `caption`: the chat of a user turn with the image and `CAPTION_PROMPT`, and the caption as the assistant's
      reply.
    - `generate`: the prompt `processor(text, generation_mode="image")` builds (a user turn with the caption, the
      assistant generation prompt, begin-of-image), then the image positions and end-of-image, which are the
      targets. With `drop_caption`, the prompt is its classifier-free guidance counterpart (`unconditional_input_ids`:
      padding, attended, up to begin-of-image).
    """

    def __init__(self, processor: DualTokenProcessor):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token_id = processor.image_token_id
        self.image_ids = [self.image_token_id] * processor.num_image_tokens + [processor.eoi_token_id]
        self.expanded_image_ids = self._ids(processor.replace_image_token({}, 0))

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def chat(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """Raises `ValueError` when the conversation has not exactly one image or no assistant turn."""
        rendered = self.tokenizer.apply_chat_template(
            messages, chat_template=self.processor.chat_template, tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )
        ids, assistant = rendered["input_ids"], rendered["assistant_masks"]
        images = [position for position, token in enumerate(ids) if token == self.image_token_id]
        if len(images) != 1:
            raise ValueError(f"a conversation takes exactly one image ({self.processor.image_token}), got "
                             f"{len(images)}")
        if not any(assistant):
            raise ValueError("the conversation has no assistant turn to train on")
        labels = [token if in_reply else IGNORE_INDEX for token, in_reply in zip(ids, assistant)]
        image = images[0]
        expanded = [IGNORE_INDEX] * len(self.expanded_image_ids)
        return (ids[:image] + self.expanded_image_ids + ids[image + 1 :],
                labels[:image] + expanded + labels[image + 1 :])

    def caption(self, caption: str) -> tuple[list[int], list[int]]:
        return self.chat([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": caption}]},
        ])

    def generate(self, caption: str, drop_caption: bool = False) -> tuple[list[int], list[int]]:
        prompt_ids = list(self.processor(text=[caption], generation_mode="image")["input_ids"][0])
        if drop_caption:
            prompt = torch.tensor([prompt_ids])
            unconditional = unconditional_input_ids(prompt, torch.ones_like(prompt), self.tokenizer.pad_token_id)
            prompt_ids = unconditional[0].tolist()
        return prompt_ids + self.image_ids, [IGNORE_INDEX] * len(prompt_ids) + self.image_ids


def codes_of(row: dict, branch: str) -> torch.LongTensor:
    """The `(h, w, D)` codes of one row of a pretokenized dataset (`examples/pretokenize.py`)."""
    return torch.tensor(row[f"{branch}_codes"], dtype=torch.long).view(row[f"{branch}_shape"])


class _ImageRows:
    """Rows with one image each: an image (a path, relative ones read from `image_root`, or a `datasets` image) or
    the codes of a pretokenized dataset (then the vision tokenizer does not run). An unreadable image is skipped for
    the next row, and counted. Subclasses name their `kind` and build a row's sequence (`_sequence`)."""

    def __init__(self, rows: datasets.Dataset, builder: SequenceBuilder, image_column: str, image_root: str | Path,
                 columns: tuple[str, ...]):
        self.rows, self.builder = rows, builder
        self.image_column, self.image_root = image_column, Path(image_root)
        self.pretokenized = "pixel_codes" in rows.column_names
        missing = [name for name in (*columns, None if self.pretokenized else image_column)
                   if name is not None and name not in rows.column_names]
        if missing:
            raise ValueError(f"columns {missing} not found in the {self.kind}; they have columns {rows.column_names}")

    def __len__(self) -> int:
        return len(self.rows)

    def _image(self, row: dict, position: int) -> dict | None:
        if self.pretokenized:
            return {"pixel_codes": codes_of(row, "pixel"), "semantic_codes": codes_of(row, "semantic")}
        if row[self.image_column] is None:
            raise ValueError(f"row {position} of the {self.kind} has no image ({self.image_column!r} is empty)")
        try:
            image = open_image(image_source(row[self.image_column], self.image_root))
        except ValueError as error:
            logger.warning("skipping unreadable image: %s", error)
            return None
        return {"pixel_values": self.builder.processor.image_processor(image, return_tensors="pt")["pixel_values"][0]}

    def example(self, position: int, task: str, drop_caption: bool = False) -> dict:
        """The `task` example of row `position`, or of the first row after it with a readable image
        (`skipped_images` counts those passed over)."""
        attempts = min(len(self), MAX_CONSECUTIVE_UNREADABLE)
        for skipped in range(attempts):
            row_position = (position + skipped) % len(self)
            row = self.rows[row_position]
            image = self._image(row, row_position)
            if image is not None:
                input_ids, labels = self._sequence(row, row_position, task, drop_caption)
                return {"input_ids": input_ids, "labels": labels, "skipped_images": skipped, **image}
        raise RuntimeError(f"no readable image among {attempts} consecutive rows of the {self.kind} from position "
                           f"{position}")


class CaptionPairs(_ImageRows):
    """Image-caption pairs (`text_column`), for captioning and text-to-image."""

    kind = "image-caption pairs"
    tasks = PAIR_TASKS

    def __init__(self, rows: datasets.Dataset, builder: SequenceBuilder, image_column: str = "image",
                 text_column: str = "text", image_root: str | Path = "."):
        super().__init__(rows, builder, image_column, image_root, (text_column,))
        self.text_column = text_column

    def _sequence(self, row, position, task, drop_caption):
        if task == "generate":
            return self.builder.generate(row[self.text_column], drop_caption=drop_caption)
        return self.builder.caption(row[self.text_column])


class ImageChats(_ImageRows):
    """Conversations about one image each (`conversation_column`: LLaVA `conversations` or `messages`, see
    [`conversation_messages`]; by default whichever of the two the rows have). A row whose conversation has not
    exactly one image placeholder, or no image, raises `ValueError` naming the row."""

    kind = "image chats"
    tasks = CHAT_TASKS

    def __init__(self, rows: datasets.Dataset, builder: SequenceBuilder, image_column: str = "image",
                 conversation_column: str | None = None, image_root: str | Path = "."):
        if conversation_column is None:
            found = [name for name in CONVERSATION_COLUMNS if name in rows.column_names]
            if len(found) != 1:
                raise ValueError(f"image chats need one conversation column among {list(CONVERSATION_COLUMNS)} "
                                 f"(or a conversation column named), got columns {rows.column_names}")
            conversation_column = found[0]
        super().__init__(rows, builder, image_column, image_root, (conversation_column,))
        self.conversation_column = conversation_column

    def _sequence(self, row, position, task, drop_caption):
        try:
            return self.builder.chat(conversation_messages(row[self.conversation_column]))
        except ValueError as error:
            raise ValueError(f"row {position} of the image chats: {error}") from error


def task_counts(ratios: dict[str, float], total: int) -> dict[str, int]:
    """`total` examples shared between tasks in proportion to `ratios` (largest remainders, ties to the first task),
    so the counts sum to `total` exactly."""
    weight = sum(ratios.values())
    shares = {task: total * ratio / weight for task, ratio in ratios.items()}
    counts = {task: math.floor(share) for task, share in shares.items()}
    by_remainder = sorted(ratios, key=lambda task: counts[task] - shares[task])
    for task in by_remainder[: total - sum(counts.values())]:
        counts[task] += 1
    return counts


class TaskMixture(torch.utils.data.Dataset):
    """
    The examples of one epoch over the tasks `tasks`: captioning and text-to-image from `pairs` ([`CaptionPairs`]),
    chat from `chats` ([`ImageChats`]).

    Without `ratios` and `examples_per_epoch`, an epoch is every pair once per pair task and every chat once: item
    `i < len(pairs) × k` is pair `i // k` in the `i % k`-th of its `k` tasks, the chats follow in order.

    With `ratios` (a positive weight for each task; default: each task's share of the epoch above), an epoch holds
    `examples_per_epoch` examples (default: as many as the epoch above), task `t` exactly
    `task_counts(ratios, examples_per_epoch)[t]` of them, in blocks by task. A task's rows are drawn as successive
    random permutations of its data (each row once before any row twice), from `(seed, epoch, task)` alone.

    A text-to-image item drops its caption with probability `caption_dropout`, decided by `(seed, epoch, index)`
    alone. Every draw depends on the seed, the epoch (`set_epoch`) and the item only, so every process lays out the
    same epoch, with any number of workers and after a resume.
    """

    def __init__(self, tasks: tuple[str, ...], pairs: CaptionPairs | None = None, chats: ImageChats | None = None,
                 ratios: dict[str, float] | None = None, examples_per_epoch: int | None = None,
                 caption_dropout: float = 0.0, seed: int = 0):
        unknown = [task for task in tasks if task not in TASKS]
        if unknown or not tasks:
            raise ValueError(f"tasks must be among {TASKS}, got {list(tasks)}")
        self.tasks = tuple(dict.fromkeys(tasks))
        self.sources = {}
        for task in self.tasks:
            source = pairs if task in PAIR_TASKS else chats
            if source is None or not len(source):
                raise ValueError(f"task {task!r} has no data: it needs "
                                 f"{'image-caption pairs' if task in PAIR_TASKS else 'image chats'}")
            self.sources[task] = source
        for source in (pairs, chats):
            if source is not None and source not in self.sources.values():
                raise ValueError(f"the {source.kind} feed none of the tasks {list(self.tasks)}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be a probability in [0, 1], got {caption_dropout}")
        if caption_dropout and "generate" not in self.tasks:
            raise ValueError(f"caption_dropout {caption_dropout} applies to text-to-image examples, but the tasks "
                             f"are {list(self.tasks)}")
        if ratios is not None:
            if set(ratios) != set(self.tasks):
                raise ValueError(f"task ratios must give one weight to each task {list(self.tasks)}, got {ratios}")
            if not all(ratio > 0 and math.isfinite(ratio) for ratio in ratios.values()):
                raise ValueError(f"task ratios must be positive numbers, got {ratios}")
        if examples_per_epoch is not None and examples_per_epoch < 1:
            raise ValueError(f"examples_per_epoch must be positive, got {examples_per_epoch}")
        self.caption_dropout, self.seed, self.epoch = caption_dropout, seed, 0
        self.mixed = ratios is not None or examples_per_epoch is not None
        default_counts = {task: len(self.sources[task]) for task in self.tasks}
        self.counts = task_counts(ratios or default_counts, examples_per_epoch or sum(default_counts.values()))
        self._lay_out()

    def __len__(self) -> int:
        return len(self._tasks)

    def set_epoch(self, epoch: int):
        """Lay out `epoch` (with ratios, each epoch draws other rows) and draw its caption dropout."""
        self.epoch = epoch
        self._lay_out()

    def _lay_out(self):
        """`self._tasks[i]` (an index into `self.tasks`) and `self._positions[i]` (a row of its data) of item `i`."""
        tasks, positions = [], []
        if not self.mixed:
            for source in dict.fromkeys(self.sources.values()):
                own = [index for index, task in enumerate(self.tasks) if self.sources[task] is source]
                tasks.append(np.tile(own, len(source)))
                positions.append(np.repeat(np.arange(len(source)), len(own)))
        else:
            for index, task in enumerate(self.tasks):
                size, count = len(self.sources[task]), self.counts[task]
                rng = np.random.default_rng([self.seed, self.epoch, index])
                rounds = [rng.permutation(size) for _ in range(math.ceil(count / size))]
                tasks.append(np.full(count, index))
                positions.append(np.concatenate(rounds)[:count] if rounds else np.zeros(0, dtype=np.int64))
        self._tasks, self._positions = np.concatenate(tasks), np.concatenate(positions)

    def item(self, index: int) -> tuple[str, int]:
        """The task of item `index` of the current epoch and the row of its data it reads."""
        return self.tasks[self._tasks[index]], int(self._positions[index])

    def drops_caption(self, index: int) -> bool:
        """Whether item `index` (a text-to-image one) of the current epoch drops its caption."""
        if not self.caption_dropout:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index]).random() < self.caption_dropout)

    def __getitem__(self, index: int) -> dict:
        task, position = self.item(index)
        drop_caption = task == "generate" and self.drops_caption(index)
        return self.sources[task].example(position, task, drop_caption)


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


def lora_target_modules(model: nn.Module, groups: tuple[str, ...]) -> str:
    """A PEFT `target_modules` regular expression matching every `nn.Linear` of the module groups (`MODULE_GROUPS`)
    of `model`, e.g. the LLM's attention and MLP projections for `("language_model",)`. Layer indices match any
    number, so the expression stays short whatever the depth. The tied output layer (`lm_head`) is left out."""
    leaves_of = {}  # parent pattern -> names of its linear layers, in model order
    for group in groups:
        prefixes = tuple(f"{prefix}." for prefix in MODULE_GROUPS[group] if prefix != "lm_head")
        names = [name for name, module in model.named_modules()
                 if isinstance(module, nn.Linear) and name.startswith(prefixes)]
        if not names:
            raise ValueError(f"module group {group!r} has no linear layer to adapt in this model")
        for name in names:
            parent, leaf = name.rsplit(".", 1)
            parent = r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in parent.split("."))
            leaf = r"\d+" if leaf.isdigit() else re.escape(leaf)
            leaves = leaves_of.setdefault(parent, [])
            if leaf not in leaves:
                leaves.append(leaf)
    return "|".join(rf"{parent}\.(?:{'|'.join(leaves)})" for parent, leaves in leaves_of.items())


# ------------------------------------------------------------------------------------------- the training loop


def parse_task_ratios(value: str) -> dict[str, float]:
    """`caption=1,generate=2,chat=1` as `{"caption": 1.0, "generate": 2.0, "chat": 1.0}` (an argparse type)."""
    ratios = {}
    for part in value.split(","):
        task, _, ratio = (piece.strip() for piece in part.partition("="))
        try:
            weight = float(ratio)
        except ValueError:
            weight = math.nan
        if task not in TASKS or task in ratios or not (weight > 0 and math.isfinite(weight)):
            raise argparse.ArgumentTypeError(f"expected task=weight pairs separated by commas, each task of {TASKS} "
                                             f"at most once with a positive weight, got {value!r}")
        ratios[task] = weight
    return ratios


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data arguments of the scripts that train on image-caption pairs and image chats."""
    data = parser.add_argument_group("data")
    data.add_argument("--data_files", nargs="+",
                      help="Image-caption pairs: JSON / JSON Lines / parquet files with an image and a text column.")
    data.add_argument("--pretokenized_dir",
                      help="Image-caption pairs written by examples/pretokenize.py (its --output_dir).")
    data.add_argument("--chat_files", nargs="+",
                      help="Image chats: JSON / JSON Lines / parquet files with an image and a conversation (LLaVA "
                           "'conversations' or 'messages'), exactly one image per conversation.")
    data.add_argument("--chat_pretokenized_dir",
                      help="Image chats written by examples/pretokenize.py (the conversation column kept).")
    data.add_argument("--image_column", default="image")
    data.add_argument("--text_column", default="text")
    data.add_argument("--conversation_column",
                      help=f"The chats' conversation column (default: whichever of {list(CONVERSATION_COLUMNS)} they "
                           "have).")
    data.add_argument("--image_root",
                      help="Folder of the pairs' relative image paths (default: that of the first of --data_files).")
    data.add_argument("--chat_image_root",
                      help="Folder of the chats' relative image paths (default: that of the first of --chat_files).")
    data.add_argument("--task_ratios", type=parse_task_ratios,
                      help="Mix the trained tasks in these proportions, e.g. caption=1,generate=2,chat=1 (one weight "
                           "per trained task). Default: every pair once per task and every chat once per epoch.")
    data.add_argument("--examples_per_epoch", type=positive_int,
                      help="Examples of one epoch, drawn by --task_ratios (or in the default proportions). Default: "
                           "as many as every pair once per task and every chat once.")
    data.add_argument("--cache_dir", help="datasets cache folder.")
    data.add_argument("--dataloader_num_workers", type=non_negative_int, default=0)
    data.add_argument("--caption_dropout", type=non_negative_float, default=None,
                      help="Probability that a text-to-image example drops its caption for classifier-free guidance "
                           f"(default: {CAPTION_DROPOUT} when there are text-to-image examples, else 0).")


def add_training_arguments(parser: argparse.ArgumentParser, learning_rate_help: str, batch_size_help: str,
                           log_name: str) -> None:
    """The optimisation, checkpointing and logging arguments of [`PairsTrainer`]; `--learning_rate` and
    `--total_batch_size` default to `None` (the caller's default, which the help texts state)."""
    training = parser.add_argument_group("training")
    training.add_argument("--output_dir", required=True)
    training.add_argument("--seed", type=non_negative_int, default=0)
    training.add_argument("--learning_rate", type=positive_float, default=None, help=learning_rate_help)
    training.add_argument("--total_batch_size", type=positive_int, default=None, help=batch_size_help)
    training.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    training.add_argument("--adam_weight_decay", type=float, default=0.0)
    schedules = [kind.value for kind in SchedulerType if kind is not SchedulerType.PIECEWISE_CONSTANT]
    training.add_argument("--lr_scheduler", default="constant", choices=schedules)
    training.add_argument("--lr_warmup_steps", type=non_negative_int, default=0)
    training.add_argument("--max_grad_norm", type=positive_float, default=None)
    training.add_argument("--num_train_epochs", type=positive_int, default=1)
    training.add_argument("--max_train_steps", type=positive_int, default=None,
                          help="Optimiser steps; overrides --num_train_epochs.")
    training.add_argument("--gradient_checkpointing", action="store_true")
    training.add_argument("--mixed_precision", choices=["no", "bf16"], default=None,
                          help="Defaults to the accelerate config.")
    add_checkpoint_arguments(training)
    training.add_argument("--report_to", default="jsonl",
                          help=f"Comma-separated trackers besides <output_dir>/logs/{log_name}.jsonl (always "
                               "written): tensorboard, wandb, ... or all.")


def trained_tasks(tasks: tuple[str, ...], args: argparse.Namespace) -> tuple[str, ...]:
    """The tasks of `tasks` that the data of `args` feed: captioning and text-to-image with image-caption pairs,
    chat with image chats."""
    has_pairs = bool(args.data_files or args.pretokenized_dir)
    has_chats = bool(args.chat_files or args.chat_pretokenized_dir)
    return tuple(task for task in tasks if (has_pairs if task in PAIR_TASKS else has_chats))


def check_data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, tasks: tuple[str, ...]) -> None:
    """Exit through `parser.error` on invalid data sources (each given one must feed a task of `tasks`), task ratios
    or caption dropout; fill in the caption dropout's default (`CAPTION_DROPOUT` when text-to-image is trained,
    else 0)."""
    for files, pretokenized in (("--data_files", "--pretokenized_dir"), ("--chat_files", "--chat_pretokenized_dir")):
        if getattr(args, files[2:]) and getattr(args, pretokenized[2:]):
            parser.error(f"give at most one of {files} and {pretokenized}")
        if getattr(args, files[2:]):
            try:
                data_files_builder(getattr(args, files[2:]))
            except ValueError as error:
                parser.error(f"{files}: {error}")
    has_pairs = bool(args.data_files or args.pretokenized_dir)
    has_chats = bool(args.chat_files or args.chat_pretokenized_dir)
    if not has_pairs and not has_chats:
        parser.error("give image-caption pairs (--data_files or --pretokenized_dir) and/or image chats "
                     "(--chat_files or --chat_pretokenized_dir)")
    trained = trained_tasks(tasks, args)
    if has_pairs and not set(trained) & set(PAIR_TASKS):
        parser.error(f"image-caption pairs feed {list(PAIR_TASKS)}, none of the tasks {list(tasks)}")
    if has_chats and not set(trained) & set(CHAT_TASKS):
        parser.error(f"image chats feed {list(CHAT_TASKS)}, none of the tasks {list(tasks)}")
    if has_pairs and has_chats and bool(args.pretokenized_dir) != bool(args.chat_pretokenized_dir):
        parser.error("pairs and chats must both be images or both pretokenized codes (a batch holds one or the other)")
    if args.task_ratios is not None and set(args.task_ratios) != set(trained):
        parser.error(f"--task_ratios must give one weight to each trained task {list(trained)}, got "
                     f"{sorted(args.task_ratios)}")
    generates = "generate" in trained
    if args.caption_dropout is None:
        args.caption_dropout = CAPTION_DROPOUT if generates else 0.0
    elif args.caption_dropout > 1:
        parser.error(f"--caption_dropout is a probability in [0, 1], got {args.caption_dropout}")
    elif args.caption_dropout and not generates:
        parser.error(f"--caption_dropout applies to text-to-image examples; the tasks {list(trained)} have none")


def describe_training_data(args: argparse.Namespace) -> str:
    """The data sources of `args`, for a model card."""
    sources = {"pairs": [args.pretokenized_dir] if args.pretokenized_dir else args.data_files,
               "chats": [args.chat_pretokenized_dir] if args.chat_pretokenized_dir else args.chat_files}
    return "; ".join(f"{kind}: {' '.join(given)}" for kind, given in sources.items() if given)


def add_hub_arguments(parser: argparse.ArgumentParser) -> None:
    """`--push_to_hub` and its repository options; check them with [`check_hub_arguments`]."""
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload the final folder at the end.")
    hub.add_argument("--hub_model_id", help="Repository to push to, 'user/name'.")
    hub.add_argument("--hub_token")
    hub.add_argument("--hub_private_repo", action="store_true")


def check_hub_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit through `parser.error` when `--push_to_hub` has no repository."""
    if args.push_to_hub and not args.hub_model_id:
        parser.error("--push_to_hub needs --hub_model_id")


def push_output_dir(args: argparse.Namespace, commit_message: str) -> None:
    """Upload the final folder in `--output_dir` (not its checkpoints, logs, summary or lock) to `--hub_model_id`
    through huggingface_hub; raises `RuntimeError` when the upload failed (the folder stays on disk)."""
    uploader = HubUploader(args.hub_model_id, token=args.hub_token, private=args.hub_private_repo or None)
    uploader.upload(args.output_dir, commit_message=commit_message, ignore_patterns=NOT_PUSHED)
    if not all(uploader.wait()):
        raise RuntimeError(f"pushing {args.output_dir} to {args.hub_model_id} failed (see the log); the folder is "
                           "saved there")


def load_rows(data_files: list[str] | None, pretokenized_dir: str | None, image_column: str,
              cache_dir: str | None = None) -> datasets.Dataset:
    """The rows of JSON / JSON Lines / parquet `data_files` (images left undecoded), or of a dataset written by
    `examples/pretokenize.py` in `pretokenized_dir`."""
    if pretokenized_dir:
        return datasets.load_dataset("parquet", data_dir=str(Path(pretokenized_dir) / "data"), split="train",
                                     cache_dir=cache_dir)
    rows = datasets.load_dataset(data_files_builder(data_files), data_files={"train": data_files}, split="train",
                                 cache_dir=cache_dir)
    if isinstance(rows.features.get(image_column), datasets.Image):
        rows = rows.cast_column(image_column, datasets.Image(decode=False))
    return rows


def image_root_of(image_root: str | None, data_files: list[str] | None) -> Path:
    """`image_root` if given, else the folder of the first data file (relative image paths are the data's)."""
    return Path(image_root or (Path(data_files[0]).parent if data_files else "."))


def per_process_batch_size(total: int, accelerator: Accelerator, accumulation: int) -> int:
    """The per-process batch of a global batch of `total` examples; `ValueError` when it does not divide."""
    share = accelerator.num_processes * accumulation
    if total % share:
        raise ValueError(f"--total_batch_size {total} must be a multiple of processes × accumulation steps "
                         f"({accelerator.num_processes} × {accumulation} = {share})")
    return total // share


def _step_logs(accelerator, micro_batch_logs: list[dict], state: TrainingState) -> dict[str, float]:
    """Each logged value averaged over the micro-batches of the step and over processes."""
    names = list(micro_batch_logs[0])
    means = torch.stack([torch.stack([log[name] for log in micro_batch_logs]).mean() for name in names])
    means = accelerator.reduce(means, reduction="mean")
    logs = {name: value.item() for name, value in zip(names, means)}
    logs["data/skipped_images"] = state.skipped_images
    return logs


@dataclasses.dataclass
class TrainingResult:
    """What [`PairsTrainer.train`] ends with: the prepared model, the run's state, the last step's logs, and the
    learning rate and global batch size it trained with."""

    model: nn.Module
    state: TrainingState
    logs: dict
    learning_rate: float
    total_batch_size: int


class PairsTrainer:
    """
    The Accelerate training loop on image-caption pairs and image chats ([`TaskMixture`]), for a model whose trained
    parameters are already chosen (`requires_grad`): AdamW on them, tqdm, every loss term (`LOSS_TERMS`) logged per
    optimiser step to `<output_dir>/logs/<log_name>.jsonl` (and `--report_to`), atomic checkpoints with the data
    position and an exact `--resume_from_checkpoint`, steps with a non-finite loss on any process skipped and counted.

    A context manager: it holds the lock on `--output_dir` until the caller has written its final folder.

    Args:
        args: the namespace of [`add_data_arguments`] and [`add_training_arguments`] (checked by
            [`check_data_arguments`]).
        log_name: name of the run (JSON Lines log file, trackers).
        find_unused_parameters: DDP option for runs whose batches may leave trained modules out of the graph.
    """

    def __init__(self, args: argparse.Namespace, log_name: str, find_unused_parameters: bool = False):
        self.args, self.log_name = args, log_name
        self.output_dir = Path(args.output_dir)
        logging_dir = self.output_dir / "logs"
        self.jsonl_tracker = JSONLinesTracker(log_name, logging_dir)
        trackers = [self.jsonl_tracker] + [name for name in args.report_to.split(",") if name and name != "jsonl"]
        self.accelerator = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=args.mixed_precision,
            log_with=trackers,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(logging_dir)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)],
        )
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
        if not self.accelerator.is_local_main_process:
            transformers.utils.logging.set_verbosity_error()
        self._lock = None

    def __enter__(self) -> "PairsTrainer":
        self._lock = claim_output_dir(self.accelerator, self.output_dir)
        return self

    def __exit__(self, *exc_info):
        if self._lock is not None:
            self._lock.release()

    def _dataloader(self, processor, model, tasks: tuple[str, ...], total_batch_size: int):
        args, accelerator = self.args, self.accelerator
        pad_token_id = processor.tokenizer.pad_token_id
        if args.caption_dropout and pad_token_id != model.config.pad_token_id:
            raise ValueError(f"dropped captions are padding: the processor's pad token id {pad_token_id} must be "
                             f"the model's {model.config.pad_token_id}")
        builder = SequenceBuilder(processor)
        pairs = chats = None
        with accelerator.main_process_first():
            if args.data_files or args.pretokenized_dir:
                rows = load_rows(args.data_files, args.pretokenized_dir, args.image_column, args.cache_dir)
                pairs = CaptionPairs(rows, builder, args.image_column, args.text_column,
                                     image_root_of(args.image_root, args.data_files))
            if args.chat_files or args.chat_pretokenized_dir:
                rows = load_rows(args.chat_files, args.chat_pretokenized_dir, args.image_column, args.cache_dir)
                chats = ImageChats(rows, builder, args.image_column, args.conversation_column,
                                   image_root_of(args.chat_image_root, args.chat_files))
        dataset = TaskMixture(trained_tasks(tasks, args), pairs, chats, ratios=args.task_ratios,
                              examples_per_epoch=args.examples_per_epoch, caption_dropout=args.caption_dropout,
                              seed=args.seed)
        batch_size = per_process_batch_size(total_batch_size, accelerator, args.gradient_accumulation_steps)
        if len(dataset) < batch_size * accelerator.num_processes:
            raise ValueError(f"{len(dataset)} training examples cannot fill one batch of {batch_size} on each "
                             f"of {accelerator.num_processes} processes; lower --total_batch_size")
        dataloader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, drop_last=True,
            collate_fn=lambda examples: collate_sequences(examples, pad_token_id),
            num_workers=args.dataloader_num_workers,
        )
        return dataset, dataloader

    def _save_checkpoint(self, state: TrainingState):
        path = save_checkpoint(self.accelerator, self.output_dir, state)
        if self.accelerator.is_main_process:
            run_logger.info(f"saved {path}")
            for folder in prune_checkpoints(self.output_dir, self.args.checkpoints_total_limit):
                run_logger.info(f"removed old checkpoint {folder}")
        self.accelerator.wait_for_everyone()

    def train(self, model: nn.Module, processor: DualTokenProcessor, tasks: tuple[str, ...], learning_rate: float,
              total_batch_size: int, description: str) -> TrainingResult:
        """Train the parameters of `model` that require gradients on the data of `args` (the tasks of `tasks` it
        feeds, laid out by [`TaskMixture`]) until `--max_train_steps` (or `--num_train_epochs`); `description` labels
        the progress bar."""
        args, accelerator = self.args, self.accelerator
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad],
                                      lr=learning_rate, weight_decay=args.adam_weight_decay)
        train_dataset, train_dataloader = self._dataloader(processor, model, tasks, total_batch_size)
        if args.max_train_steps is None:
            batches_per_process = len(train_dataloader) / accelerator.num_processes
            args.max_train_steps = args.num_train_epochs * math.ceil(batches_per_process /
                                                                     args.gradient_accumulation_steps)
        warning = warmup_warning(args.lr_warmup_steps, args.max_train_steps)
        if warning and args.lr_scheduler != "constant":
            run_logger.warning(warning)
        # Prepared schedulers step once per process (Accelerate's convention), hence the factor.
        lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                     num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                     num_training_steps=args.max_train_steps * accelerator.num_processes)
        model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            model, optimizer, train_dataloader, lr_scheduler
        )
        accelerator.init_trackers(self.log_name, config={
            key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in vars(args).items() if key != "hub_token"
        })

        state = TrainingState()
        checkpoint = None
        if args.resume_from_checkpoint:
            checkpoint = resolve_checkpoint(self.output_dir, args.resume_from_checkpoint)
        if checkpoint is not None:
            check_weights_only(checkpoint)
            accelerator.load_state(str(checkpoint))
            state = TrainingState.load(checkpoint)
            run_logger.info(f"resumed from {checkpoint} at step {state.global_step}")
        if args.resume_from_checkpoint and accelerator.is_main_process:
            self.jsonl_tracker.truncate(state.global_step)

        run_logger.info(f"training {args.max_train_steps} steps of {total_batch_size} examples at lr {learning_rate}")
        progress_bar = tqdm(range(args.max_train_steps), initial=state.global_step, desc=description,
                            disable=not accelerator.is_local_main_process)
        nonfinite_guard = NonFiniteGuard([], args.max_consecutive_nonfinite)
        trained_parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
        logs, micro_batch_logs = {}, []
        while state.global_step < args.max_train_steps:
            batches = state.epoch_batches(accelerator, train_dataloader, train_dataset)
            for batch in without_global_rng(batches):
                skipped_images = batch.pop("skipped_images")
                nonfinite_guard.before_forward()
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        outputs = model(**batch)
                    accelerator.backward(outputs.loss)
                nonfinite_guard.observe(outputs.loss)
                micro_batch_logs.append({f"loss/{name}": getattr(outputs, name).detach().float()
                                         for name in LOSS_TERMS})
                state.skipped_images += int(skipped_images.sum())
                state.batches_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue

                state.global_step += 1
                if not nonfinite_guard.skip_step(accelerator, state):
                    if args.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(trained_parameters, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                logs = _step_logs(accelerator, micro_batch_logs, state)
                micro_batch_logs = []
                logs["train/learning_rate"] = lr_scheduler.get_last_lr()[0]
                logs["train/nonfinite_steps"] = state.nonfinite_steps
                accelerator.log(logs, step=state.global_step)
                progress_bar.update(1)
                progress_bar.set_postfix(loss=logs["loss/loss"])
                if state.global_step % args.checkpointing_steps == 0:
                    self._save_checkpoint(state)
                if state.global_step >= args.max_train_steps:
                    break
            else:
                state.end_epoch()
        accelerator.wait_for_everyone()
        return TrainingResult(model, state, logs, learning_rate, total_batch_size)

    def end(self):
        """End the trackers and the process group, once the final folder is written."""
        self.accelerator.end_training()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


__all__ = [
    "CAPTION_DROPOUT",
    "CAPTION_PROMPT",
    "CHAT_TASKS",
    "CONVERSATION_COLUMNS",
    "DATA_FILE_BUILDERS",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "LOSS_TERMS",
    "MODULE_GROUPS",
    "PAIR_TASKS",
    "STAGES",
    "TASKS",
    "CaptionPairs",
    "ImageChats",
    "PairsTrainer",
    "SequenceBuilder",
    "Stage",
    "TaskMixture",
    "TrainingResult",
    "add_data_arguments",
    "add_hub_arguments",
    "add_training_arguments",
    "apply_stage",
    "check_data_arguments",
    "check_hub_arguments",
    "codes_of",
    "collate_sequences",
    "conversation_messages",
    "data_files_builder",
    "describe_training_data",
    "image_root_of",
    "image_source",
    "load_rows",
    "lora_target_modules",
    "parse_task_ratios",
    "per_process_batch_size",
    "push_output_dir",
    "task_counts",
    "trained_tasks",
]
