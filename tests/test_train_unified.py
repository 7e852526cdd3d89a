"""examples/train_unified.py on a tiny random unified model: each stage trains exactly its modules, the sequences
of its two tasks are those of inference, and a resumed run continues with the same losses."""

import json
from pathlib import Path

import datasets
import PIL.Image
import pytest
import torch
from accelerate.utils import set_seed
from transformers import AutoModelForCausalLM

from dualtoken_hf import DualTokenConfig, DualTokenVisionConfig, DualTokenVisionModel
from dualtoken_hf.hub.assemble import assemble_unified
from dualtoken_hf.hub.folders import load_processor, load_unified
from dualtoken_hf.hub.writing import save_tokenizer_folder, save_unified_folder
from dualtoken_hf.testing import build_tiny_processor, build_tiny_text_tokenizer
from dualtoken_hf.training import read_jsonl
from dualtoken_hf.training.unified import (
    CAPTION_DROPOUT,
    IGNORE_INDEX,
    MODULE_GROUPS,
    STAGES,
    CaptionPairs,
    SequenceBuilder,
    TaskMixture,
    collate_sequences,
)

from conftest import launch_on_two_cpu_processes, load_example


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train_unified.py"


train_unified = load_example(SCRIPT)


def script_args(stage: str, model_dir: Path | None, pairs_file: Path | None, output_dir: Path,
                *extra: str) -> list[str]:
    model = ["--model_name_or_path", str(model_dir)] if model_dir is not None else []
    data = ["--data_files", str(pairs_file)] if pairs_file is not None else []
    return [
        "--stage", stage, *model, *data, "--output_dir", str(output_dir),
        "--cache_dir", str(output_dir.parent / "cache"), "--total_batch_size", "2", "--max_train_steps", "2",
        "--learning_rate", "1e-3", *extra,
    ]


def run(stage: str, model_dir: Path | None, pairs_file: Path | None, output_dir: Path, *extra: str) -> dict:
    return train_unified.main(train_unified.parse_args(script_args(stage, model_dir, pairs_file, output_dir, *extra)))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_unified(folder).state_dict()


@pytest.mark.parametrize("stage", list(STAGES))
def test_each_stage_changes_its_modules_and_nothing_else(tmp_path, unified_dir, pairs_file, stage):
    # Every pair gives each task of the stage once: 4 examples per task, so 2 steps of 2 see both tasks in `joint`.
    extra = ("--total_batch_size", "4") if stage == "joint" else ()
    summary = run(stage, unified_dir, pairs_file, tmp_path / "out", *extra)
    before, after = weights(unified_dir), weights(tmp_path / "out")
    trained_prefixes = tuple(f"{prefix}." for group in STAGES[stage].trains for prefix in MODULE_GROUPS[group])
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    trained = {name for name in before if name.startswith(trained_prefixes)}
    if "language_model" in STAGES[stage].trains:
        trained.add("lm_head.weight")  # tied to the input embeddings
    assert changed <= trained, sorted(changed - trained)
    assert changed == trained, sorted(trained - changed)
    assert not any(name.startswith("vision_tokenizer.") for name in changed)
    logs = read_jsonl(tmp_path / "out" / "logs" / "train_unified.jsonl")
    assert [record["step"] for record in logs] == [1, 2] and summary["global_step"] == 2
    # Both tasks have text targets (the reply; end-of-image), only text-to-image has image targets.
    generates = "generate" in STAGES[stage].tasks
    assert logs[0]["loss/text_loss"] > 0
    assert (logs[0]["loss/pixel_loss"] > 0) == generates and (logs[0]["loss/semantic_loss"] > 0) == generates


# `generate` with half the captions dropped: the resumed run drops the same ones (step 3 is in the second epoch).
@pytest.mark.parametrize("stage, extra", [("understand", ()), ("generate", ("--caption_dropout", "0.5"))])
def test_a_resumed_run_continues_with_the_same_losses(tmp_path, unified_dir, pairs_file, stage, extra):
    uninterrupted = tmp_path / "uninterrupted"
    run(stage, unified_dir, pairs_file, uninterrupted, "--max_train_steps", "3", "--checkpointing_steps", "1", *extra)
    resumed = tmp_path / "resumed"
    run(stage, unified_dir, pairs_file, resumed, "--max_train_steps", "3",
        "--resume_from_checkpoint", str(uninterrupted / "checkpoint-1"), *extra)
    expected = read_jsonl(uninterrupted / "logs" / "train_unified.jsonl")
    continued = read_jsonl(resumed / "logs" / "train_unified.jsonl")
    assert [record["step"] for record in continued] == [2, 3]
    assert continued == expected[1:]
    resumed_weights = weights(resumed)
    for name, value in weights(uninterrupted).items():
        torch.testing.assert_close(resumed_weights[name], value, rtol=0, atol=0, msg=name)


def test_the_text_to_image_sequence_is_the_inference_prompt_then_image_targets():
    processor = build_tiny_processor()
    input_ids, labels = SequenceBuilder(processor).generate("a red fox")
    prompt = processor(text=["a red fox"], generation_mode="image")["input_ids"][0]
    assert input_ids[: len(prompt)] == prompt and prompt[-1] == processor.boi_token_id
    image = [processor.image_token_id] * processor.num_image_tokens + [processor.eoi_token_id]
    assert input_ids[len(prompt) :] == image
    assert labels == [IGNORE_INDEX] * len(prompt) + image


def test_a_dropped_caption_is_the_unconditional_prompt_generate_runs(unified_dir):
    """The prompts `generate(generation_mode="image")` feeds the LLM for a left-padded batch (conditional rows, then
    unconditional ones) against the training sequences of the same captions with the caption dropped."""
    model, processor = load_unified(unified_dir), load_processor(unified_dir)
    captions = ["a red fox", "a small grey cat on a mat"]
    prompts = processor(text=captions, generation_mode="image", return_tensors="pt")
    fed = []
    hook = model.get_input_embeddings().register_forward_hook(lambda module, args, output: fed.append(args[0]))
    try:
        model.generate(**prompts, generation_mode="image", guidance_scale=3.0, do_sample=False)
    finally:
        hook.remove()
    conditional, unconditional = fed[0].chunk(2)
    assert torch.equal(conditional, prompts["input_ids"])
    builder = SequenceBuilder(processor)
    examples = []
    for row, caption in enumerate(captions):
        attended = prompts["attention_mask"][row].bool()
        inference_prompt = unconditional[row][attended].tolist()
        assert inference_prompt == [processor.tokenizer.pad_token_id] * (len(inference_prompt) - 1) + [
            processor.boi_token_id]
        input_ids, labels = builder.generate(caption, drop_caption=True)
        assert input_ids[: len(inference_prompt)] == inference_prompt
        kept_ids, kept_labels = builder.generate(caption)
        assert input_ids[len(inference_prompt) :] == kept_ids[len(inference_prompt) :]
        assert labels == kept_labels
        examples.append({"input_ids": input_ids, "labels": labels, "skipped_images": 0})
    # Training attends to the dropped prompt as inference attends to the unconditional one: every token from the first.
    batch = collate_sequences(examples, processor.tokenizer.pad_token_id)
    for row in range(len(captions)):
        length = int(prompts["attention_mask"][row].sum())
        assert batch["attention_mask"][row, :length].all()


def test_caption_dropout_depends_on_seed_epoch_and_item_only(pairs_file):
    pairs = datasets.Dataset.from_list([{"image": str(pairs_file.parent / "0.png"), "text": f"caption {index}"}
                                        for index in range(64)])
    builder = SequenceBuilder(build_tiny_processor())

    def dropped(seed: int, epoch: int) -> list[bool]:
        dataset = TaskMixture(("caption", "generate"), CaptionPairs(pairs, builder), caption_dropout=0.25, seed=seed)
        dataset.set_epoch(epoch)
        return [dataset.drops_caption(index) for index in range(1, len(dataset), 2)]

    first = dropped(seed=0, epoch=0)
    assert first == dropped(seed=0, epoch=0)
    assert first != dropped(seed=0, epoch=1) and first != dropped(seed=1, epoch=0)
    assert 6 <= sum(first) <= 26  # 16 expected of 64
    dataset = TaskMixture(("caption", "generate"), CaptionPairs(pairs, builder), caption_dropout=0.25)
    index = 2 * first.index(True) + 1
    assert (dataset[index]["input_ids"], dataset[index]["labels"]) == builder.generate(
        pairs[index // 2]["text"], drop_caption=True)
    kept = 2 * first.index(False) + 1
    assert dataset[kept]["input_ids"] == builder.generate(pairs[kept // 2]["text"])[0]
    assert dataset[index - 1]["input_ids"] == builder.caption(pairs[index // 2]["text"])[0]  # captioning never drops


def test_caption_dropout_defaults_to_the_stages_with_text_to_image(tmp_path, pairs_file):
    def caption_dropout(stage: str, *extra: str) -> float:
        args = train_unified.parse_args(script_args(stage, tmp_path, pairs_file, tmp_path / "out", *extra))
        return args.caption_dropout

    assert {stage: caption_dropout(stage) for stage in STAGES} == {
        "align": 0.0, "understand": 0.0, "generate": CAPTION_DROPOUT, "joint": CAPTION_DROPOUT}
    assert caption_dropout("joint", "--caption_dropout", "0") == 0.0
    for stage, value in [("align", "0.1"), ("generate", "1.5")]:
        with pytest.raises(SystemExit):
            caption_dropout(stage, "--caption_dropout", value)


def test_the_caption_sequence_has_its_loss_on_the_reply_only():
    processor = build_tiny_processor()
    input_ids, labels = SequenceBuilder(processor).caption("a red fox")
    targets = [token for token, label in zip(input_ids, labels) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(targets) == "a red fox<|im_end|>"
    assert input_ids.count(processor.image_token_id) == processor.num_image_tokens
    assert all(label == IGNORE_INDEX for token, label in zip(input_ids, labels) if token == processor.image_token_id)


def test_pretokenized_codes_train_exactly_like_the_images_they_come_from(tmp_path, unified_dir, pairs_file):
    pretokenize = load_example(ROOT / "examples" / "pretokenize.py")
    pretokenize.main(pretokenize.parse_args([
        "--tokenizer_model_name_or_path", str(unified_dir), "--data_files", str(pairs_file),
        "--output_dir", str(tmp_path / "codes"), "--cache_dir", str(tmp_path / "cache"),
    ]))
    run("generate", unified_dir, pairs_file, tmp_path / "from_images")
    run("generate", unified_dir, None, tmp_path / "from_codes", "--pretokenized_dir", str(tmp_path / "codes"))
    from_images = read_jsonl(tmp_path / "from_images" / "logs" / "train_unified.jsonl")
    from_codes = read_jsonl(tmp_path / "from_codes" / "logs" / "train_unified.jsonl")
    assert len(from_codes) == len(from_images) == 2
    for images_record, codes_record in zip(from_images, from_codes):
        assert codes_record == pytest.approx(images_record, rel=1e-5)


@pytest.mark.slow
def test_a_two_process_ddp_run_of_a_stage_trains_its_modules(tmp_path, unified_dir, pairs_file):
    output_dir = tmp_path / "out"
    args = script_args("align", unified_dir, pairs_file, output_dir, "--total_batch_size", "4")
    launch_on_two_cpu_processes(SCRIPT, args, timeout=240)
    summary = json.loads((output_dir / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 2
    before, after = weights(unified_dir), weights(output_dir)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.startswith("image_projector.")}


def test_an_unreadable_image_gives_the_next_pair_and_is_counted(tmp_path, pairs_file):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    pairs = datasets.Dataset.from_list([{"image": str(broken), "text": "broken"},
                                        {"image": str(pairs_file.parent / "1.png"), "text": "a small grey cat"}])
    builder = SequenceBuilder(build_tiny_processor())
    dataset = TaskMixture(("caption", "generate"), CaptionPairs(pairs, builder))
    assert len(dataset) == 4
    first, second = dataset[0], dataset[1]
    assert first["skipped_images"] == second["skipped_images"] == 1
    assert (first["input_ids"], first["labels"]) == builder.caption("a small grey cat")
    assert (second["input_ids"], second["labels"]) == builder.generate("a small grey cat")
    expected = builder.processor.image_processor(PIL.Image.open(pairs_file.parent / "1.png"), return_tensors="pt")
    torch.testing.assert_close(first["pixel_values"], expected["pixel_values"][0])


@pytest.fixture(scope="module")
def llm_and_tokenizer(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny causal LM folder with its text tokenizer, and a (random-weight) vision tokenizer folder."""
    folder = tmp_path_factory.mktemp("parts")
    build_tiny_text_tokenizer(folder / "llm")
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(DualTokenConfig.from_preset("tiny").text_config).save_pretrained(folder / "llm")
    save_tokenizer_folder(DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")), folder / "tokenizer")
    return folder / "llm", folder / "tokenizer"


def test_an_llm_read_from_a_gguf_file_is_assembled_and_saved_dequantized(tmp_path, llm_and_tokenizer, monkeypatch):
    """transformers dequantizes a GGUF LLM to float and records `quantization_config` (quant_method gguf) in its
    config; carried into the unified config, it made the reloaded model refuse to be saved again."""
    import dualtoken_hf.hub.assemble as assemble

    llm_dir, tokenizer_dir = llm_and_tokenizer
    read_from = []
    load_model, load_text_tokenizer = AutoModelForCausalLM.from_pretrained, assemble.AutoTokenizer.from_pretrained

    def model_from_gguf(path, gguf_file=None, **kwargs):
        read_from.append(gguf_file)
        model = load_model(path)
        model.config.quantization_config = {"quant_method": "gguf", "gguf_file": gguf_file, "dequantize": False}
        return model

    def text_tokenizer_from_gguf(path, gguf_file=None):
        read_from.append(gguf_file)
        return load_text_tokenizer(path)

    monkeypatch.setattr(assemble.AutoModelForCausalLM, "from_pretrained", model_from_gguf)
    monkeypatch.setattr(assemble.AutoTokenizer, "from_pretrained", text_tokenizer_from_gguf)
    model, processor = assemble_unified(DualTokenVisionModel.from_pretrained(tokenizer_dir), llm_dir, "tiny",
                                        gguf_file="llm.Q4_1.gguf")
    assert read_from == ["llm.Q4_1.gguf", "llm.Q4_1.gguf"]
    save_unified_folder(model, processor, tmp_path / "assembled")
    assert "quantization_config" not in json.loads((tmp_path / "assembled" / "config.json").read_text())["text_config"]
    reloaded = load_unified(tmp_path / "assembled")
    save_unified_folder(reloaded, processor, tmp_path / "again")
    assert torch.equal(weights(tmp_path / "again")["image_projector.linear_1.weight"],
                       model.state_dict()["image_projector.linear_1.weight"])


def test_stage_one_starts_from_an_llm_and_a_trained_tokenizer(tmp_path, llm_and_tokenizer, pairs_file):
    llm_dir, tokenizer_dir = llm_and_tokenizer
    run("align", None, pairs_file, tmp_path / "out", "--llm_model_name_or_path", str(llm_dir),
        "--tokenizer_model_name_or_path", str(tokenizer_dir), "--preset", "tiny")
    set_seed(0)  # the script's seed: the same new projector and heads
    assembled, _ = assemble_unified(DualTokenVisionModel.from_pretrained(tokenizer_dir), llm_dir, "tiny")
    before, after = assembled.state_dict(), weights(tmp_path / "out")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == {name for name in before if name.startswith("image_projector.")}
    for name, value in DualTokenVisionModel.from_pretrained(tokenizer_dir).state_dict().items():
        assert torch.equal(after[f"vision_tokenizer.{name}"], value), name
    for name, value in AutoModelForCausalLM.from_pretrained(llm_dir).model.state_dict().items():
        assert torch.equal(after[f"language_model.{name}"], value), name
    processor = load_processor(tmp_path / "out")
    assert processor.image_token_id == load_unified(tmp_path / "out").config.image_token_id
    assert f"the LLM {llm_dir} and the tokenizer {tokenizer_dir}" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("start", [
    (),  # nothing to start from
    ("--llm_model_name_or_path", "llm"),  # an LLM without a tokenizer
    ("--model_name_or_path", "unified", "--tokenizer_model_name_or_path", "tokenizer"),  # both ways at once
])
def test_a_run_starts_from_a_unified_folder_or_from_an_llm_and_a_tokenizer(tmp_path, pairs_file, start):
    with pytest.raises(SystemExit):
        train_unified.parse_args(script_args("align", None, pairs_file, tmp_path / "out", *start))


def test_the_final_folder_is_pushed_with_its_card_naming_the_repository(tmp_path, unified_dir, pairs_file,
                                                                          monkeypatch):
    pushed = []
    monkeypatch.setattr(train_unified, "push_output_dir", lambda args, commit_message: pushed.append(
        (args.hub_model_id, sorted(path.name for path in Path(args.output_dir).iterdir()))))
    run("align", unified_dir, pairs_file, tmp_path / "out", "--max_train_steps", "1", "--push_to_hub",
        "--hub_model_id", "me/dualtoken-align")
    [(repo_id, files)] = pushed
    assert repo_id == "me/dualtoken-align" and {"README.md", "config.json", "train_summary.json"} <= set(files)
    assert "me/dualtoken-align" in (tmp_path / "out" / "README.md").read_text()
    with pytest.raises(SystemExit):
        train_unified.parse_args(script_args("align", unified_dir, pairs_file, tmp_path / "out", "--push_to_hub"))


def test_the_stage_table_is_the_papers():
    table = {name: (stage.trains, stage.tasks, stage.learning_rate, stage.batch_size) for name, stage in STAGES.items()}
    assert table == {
        "align": (("image_projector",), ("caption",), 1e-3, 64),
        "understand": (("image_projector", "language_model"), ("caption", "chat"), 2e-5, 256),
        "generate": (("generation_projectors", "pixel_head", "semantic_head"), ("generate",), 1e-4, 128),
        "joint": (("image_projector", "language_model", "generation_projectors", "pixel_head", "semantic_head"),
                  ("caption", "generate", "chat"), 1e-5, 256),
    }
