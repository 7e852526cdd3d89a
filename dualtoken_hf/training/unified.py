"""Training the unified model: which modules each stage trains, the paper's defaults, image-caption pairs turned into
captioning and text-to-image sequences, the LoRA targets, and the training loop the example scripts share.

The four AdamW stages of the paper's later version (`../shared/paper/later-version-notes.md`):

| stage | trains | data | learning rate | batch |
|---|---|---|---|---|
| `align` | image projector (LLM frozen) | image-caption (captioning) | 1e-3 | 64 |
| `understand` | image projector + LLM | understanding (captioning) | 2e-5 | 256 |
| `generate` | pixel and semantic heads (LLM frozen) | text-to-image | 1e-4 | 128 |
| `joint` | everything but the tokenizer | both | 1e-5 | 256 (the paper: 512, then 256) |

The vision tokenizer is never trained. Freezing goes by module name: a stage trains the parameters of its module
groups (`MODULE_GROUPS`) and nothing else.

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
TASKS = ("caption", "generate")
# The paper gives no rate; 10 % of captions dropped is the usual choice of autoregressive text-to-image models
# (LlamaGen, Janus).
CAPTION_DROPOUT = 0.1
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
      targets. With `drop_caption`, the prompt is its classifier-free guidance counterpart (`unconditional_input_ids`:
      padding, attended, up to begin-of-image).
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


class CaptionPairsDataset(torch.utils.data.Dataset):
    """
    Image-caption pairs, each used once per task of the stage: item `i` is pair `i // len(tasks)` in task
    `tasks[i % len(tasks)]`. Rows hold an image (a path, relative ones read from `image_root`, or a `datasets`
    image) or the codes of a pretokenized dataset (then the vision tokenizer does not run). An unreadable image is
    skipped for the next pair and counted in `skipped_images`.

    A text-to-image item drops its caption with probability `caption_dropout`, decided by `(seed, epoch, index)`
    alone (`set_epoch`), so the same items are dropped on every process, with any number of workers and after a
    resume.
    """

    def __init__(self, pairs: datasets.Dataset, tasks: tuple[str, ...], builder: SequenceBuilder,
                 image_column: str = "image", text_column: str = "text", image_root: str | Path = ".",
                 caption_dropout: float = 0.0, seed: int = 0):
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise ValueError(f"tasks must be among {TASKS}, got {unknown}")
        if not 0.0 <= caption_dropout <= 1.0:
            raise ValueError(f"caption_dropout must be a probability in [0, 1], got {caption_dropout}")
        if caption_dropout and "generate" not in tasks:
            raise ValueError(f"caption_dropout {caption_dropout} applies to text-to-image examples, but the tasks "
                             f"are {tasks}")
        self.pairs, self.tasks, self.builder = pairs, tasks, builder
        self.caption_dropout, self.seed, self.epoch = caption_dropout, seed, 0
        self.image_column, self.text_column, self.image_root = image_column, text_column, Path(image_root)
        self.pretokenized = "pixel_codes" in pairs.column_names
        missing = [name for name in (text_column, None if self.pretokenized else image_column)
                   if name is not None and name not in pairs.column_names]
        if missing:
            raise ValueError(f"columns {missing} not found; the data has columns {pairs.column_names}")

    def __len__(self) -> int:
        return len(self.pairs) * len(self.tasks)

    def set_epoch(self, epoch: int):
        """Draw the caption dropout of `epoch` (each epoch drops other captions)."""
        self.epoch = epoch

    def drops_caption(self, index: int) -> bool:
        """Whether item `index` (a text-to-image one) of the current epoch drops its caption."""
        if not self.caption_dropout:
            return False
        return bool(np.random.default_rng([self.seed, self.epoch, index]).random() < self.caption_dropout)

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
                caption = row[self.text_column]
                if self.tasks[task] == "generate":
                    input_ids, labels = self.builder.generate(caption, drop_caption=self.drops_caption(index))
                else:
                    input_ids, labels = self.builder.caption(caption)
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


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data arguments of the scripts that train on image-caption pairs."""
    data = parser.add_argument_group("data")
    data.add_argument("--data_files", nargs="+", help="Image-caption pairs: JSON / JSON Lines / parquet files.")
    data.add_argument("--pretokenized_dir", help="A dataset written by examples/pretokenize.py (its --output_dir).")
    data.add_argument("--image_column", default="image")
    data.add_argument("--text_column", default="text")
    data.add_argument("--image_root", help="Folder of relative image paths (default: that of the first data file).")
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


def check_data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, tasks: tuple[str, ...]) -> None:
    """Exit through `parser.error` on an invalid data source or caption dropout; fill in the caption dropout's
    default (`CAPTION_DROPOUT` when `tasks` hold text-to-image, else 0)."""
    if (args.data_files is None) == (args.pretokenized_dir is None):
        parser.error("give exactly one of --data_files and --pretokenized_dir")
    generates = "generate" in tasks
    if args.caption_dropout is None:
        args.caption_dropout = CAPTION_DROPOUT if generates else 0.0
    elif args.caption_dropout > 1:
        parser.error(f"--caption_dropout is a probability in [0, 1], got {args.caption_dropout}")
    elif args.caption_dropout and not generates:
        parser.error(f"--caption_dropout applies to text-to-image examples; the tasks {list(tasks)} have none")
    if args.data_files:
        try:
            data_files_builder(args.data_files)
        except ValueError as error:
            parser.error(f"--data_files: {error}")


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


def load_pairs(args: argparse.Namespace) -> datasets.Dataset:
    """The image-caption pairs of `--data_files` (images left undecoded) or of `--pretokenized_dir`."""
    if args.pretokenized_dir:
        return datasets.load_dataset("parquet", data_dir=str(Path(args.pretokenized_dir) / "data"), split="train",
                                     cache_dir=args.cache_dir)
    pairs = datasets.load_dataset(data_files_builder(args.data_files), data_files={"train": args.data_files},
                                  split="train", cache_dir=args.cache_dir)
    if isinstance(pairs.features.get(args.image_column), datasets.Image):
        pairs = pairs.cast_column(args.image_column, datasets.Image(decode=False))
    return pairs


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
    The Accelerate training loop on image-caption pairs, for a model whose trained parameters are already chosen
    (`requires_grad`): AdamW on them, tqdm, every loss term (`LOSS_TERMS`) logged per optimiser step to
    `<output_dir>/logs/<log_name>.jsonl` (and `--report_to`), atomic checkpoints with the data position and an exact
    `--resume_from_checkpoint`, steps with a non-finite loss on any process skipped and counted.

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
        image_root = args.image_root or (Path(args.data_files[0]).parent if args.data_files else ".")
        with accelerator.main_process_first():
            pairs = load_pairs(args)
        dataset = CaptionPairsDataset(pairs, tasks, SequenceBuilder(processor), args.image_column, args.text_column,
                                      image_root, caption_dropout=args.caption_dropout, seed=args.seed)
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
        """Train the parameters of `model` that require gradients on the pairs of `args` (one example per pair and
        task of `tasks`) until `--max_train_steps` (or `--num_train_epochs`); `description` labels the progress
        bar."""
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
    "DATA_FILE_BUILDERS",
    "IGNORE_INDEX",
    "LOSS_TERMS",
    "MODULE_GROUPS",
    "STAGES",
    "TASKS",
    "CaptionPairsDataset",
    "PairsTrainer",
    "SequenceBuilder",
    "Stage",
    "TrainingResult",
    "add_data_arguments",
    "add_hub_arguments",
    "add_training_arguments",
    "apply_stage",
    "check_data_arguments",
    "check_hub_arguments",
    "codes_of",
    "collate_sequences",
    "data_files_builder",
    "image_source",
    "load_pairs",
    "lora_target_modules",
    "per_process_batch_size",
    "push_output_dir",
]
