"""The data of examples/train_unified.py beyond image-caption pairs: image chats (LLaVA `conversations` or `messages`,
the loss on the assistant turns only) and the task mixture of a stage (`--task_ratios`), on a tiny random model."""

import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch

from dualtoken_hf.hub.folders import load_unified
from dualtoken_hf.testing import build_tiny_processor, build_tiny_unified
from dualtoken_hf.training import read_jsonl
from dualtoken_hf.training.unified import (
    IGNORE_INDEX,
    CaptionPairs,
    ImageChats,
    SequenceBuilder,
    TaskMixture,
    conversation_messages,
    task_counts,
    trained_tasks,
)

from conftest import load_example


ROOT = Path(__file__).resolve().parents[1]
train_unified = load_example(ROOT / "examples" / "train_unified.py")

LLAVA_CHAT = [
    {"from": "human", "value": "<image>\nWhat is in this image?"},
    {"from": "gpt", "value": "A red fox."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "In the snow."},
]
MESSAGES_CHAT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nWhat is in this image?"}]},
    {"role": "assistant", "content": "A red fox."},
    {"role": "user", "content": [{"type": "text", "text": "Where is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "In the snow."}]},
]
# The same with string contents only (a column of `datasets` holds one type).
STRING_MESSAGES_CHAT = [
    {"role": "user", "content": "<image>\nWhat is in this image?"}, {"role": "assistant", "content": "A red fox."},
    {"role": "user", "content": "Where is it?"}, {"role": "assistant", "content": "In the snow."},
]


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


@pytest.fixture(scope="module")
def unified_dir(tmp_path_factory) -> Path:
    return Path(build_tiny_unified(tmp_path_factory.mktemp("unified")))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Four images with a caption each (`pairs.jsonl`) and a LLaVA chat about each (`chats.jsonl`), image paths
    relative to the files."""
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    answers = ["A red fox.", "A small grey cat.", "A cup of hot coffee.", "A tall rocket."]
    with open(folder / "pairs.jsonl", "w") as pairs, open(folder / "chats.jsonl", "w") as chats:
        for index, answer in enumerate(answers):
            PIL.Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(folder / f"{index}.png")
            pairs.write(json.dumps({"image": f"{index}.png", "text": answer.lower().rstrip(".")}) + "\n")
            conversation = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": answer},
                            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": f"Yes, {index}."}]
            chats.write(json.dumps({"id": f"chat-{index}", "image": f"{index}.png",
                                    "conversations": conversation}) + "\n")
    return folder


def labelled(input_ids: list[int], labels: list[int]) -> list[int]:
    assert all(label in (token, IGNORE_INDEX) for token, label in zip(input_ids, labels, strict=True))
    return [label for label in labels if label != IGNORE_INDEX]


def test_the_chat_loss_is_on_the_assistant_turns_only(processor):
    input_ids, labels = SequenceBuilder(processor).chat(conversation_messages(LLAVA_CHAT))
    assert processor.tokenizer.decode(labelled(input_ids, labels)) == "A red fox.<|im_end|>In the snow.<|im_end|>"
    # The inputs are the processor's own rendering of the conversation, its image placeholder expanded.
    text = processor.apply_chat_template(MESSAGES_CHAT, tokenize=False)
    assert input_ids == processor(text=text, images=PIL.Image.new("RGB", (32, 32)))["input_ids"][0]
    assert input_ids.count(processor.image_token_id) == processor.num_image_tokens
    image_end = input_ids.index(processor.eoi_token_id)
    assert set(labels[: image_end + 1]) == {IGNORE_INDEX}


def test_both_conversation_formats_give_identical_ids(processor):
    builder = SequenceBuilder(processor)
    expected = builder.chat(conversation_messages(LLAVA_CHAT))
    assert builder.chat(conversation_messages(MESSAGES_CHAT)) == expected
    assert builder.chat(conversation_messages(STRING_MESSAGES_CHAT)) == expected


def test_a_llava_conversation_without_a_placeholder_gets_the_image_first(processor):
    builder = SequenceBuilder(processor)
    without = [{"from": "human", "value": "What is in this image?"}, *LLAVA_CHAT[1:]]
    assert builder.chat(conversation_messages(without)) == builder.chat(conversation_messages(LLAVA_CHAT))
    with pytest.raises(ValueError, match="exactly one image"):  # the messages format places its image itself
        builder.chat(conversation_messages([{"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello"}]))


def test_a_chat_without_exactly_one_image_is_a_value_error_naming_the_row(processor, data_dir):
    image = str(data_dir / "0.png")
    rows = datasets.Dataset.from_list([
        {"image": image, "messages": STRING_MESSAGES_CHAT},
        {"image": image, "messages": [{"role": "user", "content": "<image> and <image>?"},
                                      {"role": "assistant", "content": "Two."}]},
        {"image": image, "messages": [{"role": "user", "content": "No image?"},
                                      {"role": "assistant", "content": "No."}]},
        {"image": None, "messages": STRING_MESSAGES_CHAT},
    ])
    chats = TaskMixture(("chat",), chats=ImageChats(rows, SequenceBuilder(processor)))
    assert chats[0]["input_ids"] == SequenceBuilder(processor).chat(conversation_messages(LLAVA_CHAT))[0]
    for row, message in [(1, ": a conversation takes exactly one image .*, got 2"),
                         (2, ": a conversation takes exactly one image .*, got 0"), (3, " has no image")]:
        with pytest.raises(ValueError, match=f"^row {row} of the image chats{message}"):
            chats[row]


def mixture(processor, seed: int = 0, **kwargs) -> TaskMixture:
    """Ten pairs and six chats, never read: only the layout matters."""
    pairs = datasets.Dataset.from_dict({"image": ["unused.png"] * 10, "text": [f"pair {i}" for i in range(10)]})
    chats = datasets.Dataset.from_dict({"image": ["unused.png"] * 6, "conversations": [LLAVA_CHAT] * 6})
    builder = SequenceBuilder(processor)
    return TaskMixture(("caption", "generate", "chat"), CaptionPairs(pairs, builder), ImageChats(chats, builder),
                       seed=seed, **kwargs)


def epoch_items(dataset: TaskMixture, epoch: int) -> list[tuple[str, int]]:
    dataset.set_epoch(epoch)
    return [dataset.item(index) for index in range(len(dataset))]


def test_an_epoch_is_every_pair_once_per_task_and_every_chat_once_by_default(processor):
    dataset = mixture(processor)
    items = epoch_items(dataset, 0)
    assert len(dataset) == 2 * 10 + 6
    assert Counter(items) == Counter([(task, pair) for pair in range(10) for task in ("caption", "generate")] +
                                     [("chat", chat) for chat in range(6)])
    assert items[:4] == [("caption", 0), ("generate", 0), ("caption", 1), ("generate", 1)]
    assert epoch_items(dataset, 1) == items


def test_task_ratios_give_exact_counts_drawn_from_the_seed_and_epoch(processor):
    ratios = {"caption": 1, "generate": 2, "chat": 1}
    assert task_counts(ratios, 41) == {"caption": 10, "generate": 21, "chat": 10}
    dataset = mixture(processor, ratios=ratios, examples_per_epoch=40)
    items = epoch_items(dataset, 0)
    assert len(items) == 40 and Counter(task for task, _ in items) == {"caption": 10, "generate": 20, "chat": 10}
    # Ten chats drawn from six: every chat once before any twice.
    assert sorted(Counter(row for task, row in items if task == "chat").values()) == [1, 1, 2, 2, 2, 2]
    assert sorted(row for task, row in items if task == "caption") == list(range(10))
    assert epoch_items(mixture(processor, ratios=ratios, examples_per_epoch=40), 0) == items
    other_epoch = epoch_items(dataset, 1)
    assert other_epoch != items and Counter(task for task, _ in other_epoch) == Counter(task for task, _ in items)
    assert epoch_items(mixture(processor, seed=1, ratios=ratios, examples_per_epoch=40), 0) != items
    # Without --examples_per_epoch, an epoch is as long as the default one.
    assert len(mixture(processor, ratios=ratios)) == 26


def test_caption_dropout_follows_the_items_of_the_mixed_epoch(processor, data_dir):
    pairs = datasets.Dataset.from_list([{"image": str(data_dir / "0.png"), "text": f"caption {i}"} for i in range(8)])
    builder = SequenceBuilder(processor)
    dataset = TaskMixture(("caption", "generate"), CaptionPairs(pairs, builder), ratios={"caption": 1, "generate": 3},
                          caption_dropout=0.5, seed=3)
    dataset.set_epoch(2)
    for index in range(len(dataset)):
        task, row = dataset.item(index)
        if task == "generate":
            expected = builder.generate(f"caption {row}", drop_caption=dataset.drops_caption(index))
        else:
            expected = builder.caption(f"caption {row}")
        assert (dataset[index]["input_ids"], dataset[index]["labels"]) == expected
    assert {dataset.drops_caption(index) for index in range(len(dataset)) if dataset.item(index)[0] == "generate"} == {
        True, False}


def script_args(stage: str, model_dir: Path, output_dir: Path, *data: str) -> list[str]:
    return ["--stage", stage, "--model_name_or_path", str(model_dir), "--output_dir", str(output_dir),
            "--cache_dir", str(output_dir.parent / "cache"), "--total_batch_size", "2", "--max_train_steps", "2",
            "--learning_rate", "1e-3", *data]


def run(stage: str, model_dir: Path, output_dir: Path, *data: str) -> list[dict]:
    train_unified.main(train_unified.parse_args(script_args(stage, model_dir, output_dir, *data)))
    return read_jsonl(output_dir / "logs" / "train_unified.jsonl")


@pytest.mark.parametrize("stage, data, message", [
    ("align", ("--chat_files", "chats.jsonl"), "image chats feed"),
    ("generate", ("--data_files", "pairs.jsonl", "--chat_files", "chats.jsonl"), "image chats feed"),
    ("joint", ("--data_files", "pairs.jsonl", "--task_ratios", "caption=1,generate=1,chat=1"), "one weight to each"),
    ("joint", ("--data_files", "pairs.jsonl", "--task_ratios", "caption=1,generate=0"), "positive weight"),
    ("understand", ("--pretokenized_dir", "codes", "--chat_files", "chats.jsonl"), "both be images or both pretokenized"),
    ("understand", (), "give image-caption pairs"),
])
def test_data_a_stage_cannot_train_is_refused(tmp_path, capsys, stage, data, message):
    with pytest.raises(SystemExit):
        train_unified.parse_args(script_args(stage, tmp_path, tmp_path / "out", *data))
    assert message in capsys.readouterr().err


def test_a_stage_trains_the_tasks_its_data_feed(tmp_path):
    args = train_unified.parse_args(script_args("joint", tmp_path, tmp_path / "out", "--chat_files", "chats.jsonl"))
    assert args.caption_dropout == 0.0  # no text-to-image without pairs
    assert trained_tasks(("caption", "generate", "chat"), args) == ("chat",)


def test_a_joint_run_on_pairs_and_chats_by_ratio_resumes_with_the_same_losses(tmp_path, unified_dir, data_dir):
    # Two steps of two examples per epoch: step 3 is in the second epoch, which draws other rows.
    data = ("--data_files", str(data_dir / "pairs.jsonl"), "--chat_files", str(data_dir / "chats.jsonl"),
            "--task_ratios", "caption=1,generate=2,chat=1", "--examples_per_epoch", "4", "--max_train_steps", "3")
    expected = run("joint", unified_dir, tmp_path / "uninterrupted", *data, "--checkpointing_steps", "1")
    continued = run("joint", unified_dir, tmp_path / "resumed", *data, "--resume_from_checkpoint",
                    str(tmp_path / "uninterrupted" / "checkpoint-1"))
    assert [record["step"] for record in continued] == [2, 3] and continued == expected[1:]
    assert any(record["loss/pixel_loss"] > 0 for record in expected)
    resumed = load_unified(tmp_path / "resumed").state_dict()
    for name, value in load_unified(tmp_path / "uninterrupted").state_dict().items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=0, msg=name)


def test_a_chat_from_pretokenized_codes_trains_exactly_like_the_image(tmp_path, unified_dir, data_dir):
    pretokenize = load_example(ROOT / "examples" / "pretokenize.py")
    pretokenize.main(pretokenize.parse_args([
        "--tokenizer_model_name_or_path", str(unified_dir), "--data_files", str(data_dir / "chats.jsonl"),
        "--output_dir", str(tmp_path / "codes"), "--cache_dir", str(tmp_path / "cache"),
    ]))
    from_images = run("understand", unified_dir, tmp_path / "from_images",
                      "--chat_files", str(data_dir / "chats.jsonl"))
    from_codes = run("understand", unified_dir, tmp_path / "from_codes",
                     "--chat_pretokenized_dir", str(tmp_path / "codes"))
    assert len(from_codes) == len(from_images) == 2 and from_images[0]["loss/text_loss"] > 0
    for images_record, codes_record in zip(from_images, from_codes):
        assert codes_record == pytest.approx(images_record, rel=1e-5)
