"""`dualtoken_hf.evaluation.unified` (generation and understanding accuracy of a unified model) and the Fashion-MNIST
classifier script that labels generated images."""

import numpy as np
import pytest
import torch
from PIL import Image

from dualtoken_hf import (
    DualTokenConfig,
    DualTokenForConditionalGeneration,
    DualTokenImageProcessor,
    DualTokenProcessor,
    DualTokenVisionConfig,
)
from dualtoken_hf.evaluation import answer_label, generation_accuracy, understanding_accuracy
from dualtoken_hf.testing import build_tiny_text_tokenizer

from conftest import REPO, load_example


EXPERIMENTS = REPO / "examples" / "experiments"
SUBSET = REPO / "tests" / "data" / "fashion_mnist_subset.npz"
CLASS_NAMES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
IMAGE_SIZE = 32  # a 4 x 4 grid, as the mini Fashion-MNIST model's
QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def processor() -> DualTokenProcessor:
    vision_config = DualTokenVisionConfig.from_preset("tiny", siglip_config={"image_size": IMAGE_SIZE})
    return DualTokenProcessor(
        image_processor=DualTokenImageProcessor.from_vision_config(vision_config),
        tokenizer=build_tiny_text_tokenizer(),
        num_image_tokens=vision_config.grid_size**2,
    )


@pytest.fixture(scope="module")
def model(processor) -> DualTokenForConditionalGeneration:
    torch.manual_seed(0)
    vision_config = DualTokenVisionConfig.from_preset("tiny", siglip_config={"image_size": IMAGE_SIZE})
    config = DualTokenConfig.from_preset(
        "tiny",
        vision_config=vision_config,
        pad_token_id=processor.tokenizer.pad_token_id,
        image_token_id=processor.image_token_id,
        boi_token_id=processor.boi_token_id,
        eoi_token_id=processor.eoi_token_id,
    )
    return DualTokenForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Seven random uint8 RGB images."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (7, 3, IMAGE_SIZE, IMAGE_SIZE), generator=generator, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------- answer_label


@pytest.mark.parametrize(
    ("answer", "label"),
    [
        ("A sneaker.", 7),
        ("A T-shirt.", 0),
        ("a shirt", 6),
        ("It is a t-shirt/top", 0),
        ("a top", 0),
        ("An ankle boot.", 9),
        ("ANKLE BOOT", 9),
        ("Trousers.", 1),
        ("a dress, yes, a dress", 3),
    ],
)
def test_answer_label_reads_the_named_class(answer, label):
    assert answer_label(answer, CLASS_NAMES) == label


def test_answer_label_takes_the_longest_name_at_a_place():
    assert answer_label("An ankle boot.", ("ankle", "ankle boot")) == 1
    assert answer_label("An ankle.", ("ankle", "ankle boot")) == 0


@pytest.mark.parametrize(
    "answer",
    ["", "I do not know.", "a boot", "a sweat-shirt", "a sneakerish thing", "a shirt and a coat", "T-shirt or shirt"],
)
def test_answer_label_is_none_without_exactly_one_class(answer):
    assert answer_label(answer, CLASS_NAMES) is None


# ------------------------------------------------------------------------------------------ generation_accuracy


class RecordingProcessor:
    """The processor, recording the prompts of each call."""

    def __init__(self, processor):
        self.processor, self.prompts = processor, []

    def __call__(self, **kwargs):
        self.prompts.append(kwargs["text"])
        return self.processor(**kwargs)


def test_generation_accuracy_counts_the_classifier_labels(model, processor):
    recording = RecordingProcessor(processor)
    scripted = iter([0, 0, 1, 2, 0, 2])
    seen = []

    def classify(images):
        seen.append(images)
        return [next(scripted) for _ in range(len(images))]

    prompts_by_class = {0: ["a coat", "a red coat"], 2: ["a bag"]}
    report = generation_accuracy(
        model, recording, classify, prompts_by_class, images_per_class=3, guidance_scale=3.0, seed=0, batch_size=4
    )

    assert recording.prompts == [["a coat", "a red coat", "a coat", "a bag"], ["a bag", "a bag"]]
    assert [images.shape for images in seen] == [(4, 3, IMAGE_SIZE, IMAGE_SIZE), (2, 3, IMAGE_SIZE, IMAGE_SIZE)]
    assert report["labels"] == [0, 0, 0, 2, 2, 2]
    assert report["predictions"] == [0, 0, 1, 2, 0, 2]
    assert report["accuracy"] == pytest.approx(4 / 6)
    assert report["per_class_accuracy"] == {0: pytest.approx(2 / 3), 2: pytest.approx(2 / 3)}
    assert report["confusion"] == [[2, 1, 0], [0, 0, 0], [1, 0, 2]]
    assert report["num_images"] == 6


def brightness_class(images: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in classifier: one of three classes from each image's summed pixels."""
    return (images.flatten(1).sum(dim=1) * 100).long() % 3


def test_generation_accuracy_is_reproducible_for_a_seed(model, processor):
    def run(seed):
        return generation_accuracy(
            model, processor, brightness_class, {0: ["a coat"], 1: ["a bag"]}, 2, 3.0, seed, batch_size=4,
            return_images=True,
        )

    first, again, other = run(0), run(0), run(1)
    assert torch.equal(first.pop("images"), again.pop("images"))
    assert first == again
    assert not torch.equal(other["images"], run(0)["images"])


def test_generation_accuracy_at_guidance_one_samples_the_conditional_model(model, processor):
    """Scale 1 skips the unconditional batch; the images are those of unguided sampling (up to the batch's float
    rounding, which differs with the batch size)."""
    report = generation_accuracy(model, processor, brightness_class, {0: ["a coat"]}, 2, 1.0, 0, 2, return_images=True)
    inputs = processor(text=["a coat"] * 2, generation_mode="image", return_tensors="pt")
    pixel_codes = model.generate(
        **inputs, generation_mode="image", guidance_scale=1.0, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(report["images"], model.decode_image_tokens(pixel_codes))


def test_generation_accuracy_passes_sampling_settings_to_generate(model, processor):
    report = generation_accuracy(model, processor, brightness_class, {0: ["a coat"]}, 2, 3.0, 0, 2,
                                 return_images=True, top_k=1)
    inputs = processor(text=["a coat"] * 2, generation_mode="image", return_tensors="pt")
    greedy = model.generate(**inputs, generation_mode="image", guidance_scale=3.0, do_sample=False)
    torch.testing.assert_close(report["images"], model.decode_image_tokens(greedy))
    assert report["sampling"] == {"top_k": 1}


def test_generation_accuracy_confusion_covers_the_classifiers_classes(model, processor):
    report = generation_accuracy(model, processor, lambda images: [4] * len(images), {1: ["a bag"]}, 1, 3.0, 0, 1)
    assert report["confusion"] == [[0] * 5, [0, 0, 0, 0, 1], *[[0] * 5] * 3]
    report = generation_accuracy(
        model, processor, lambda images: [1] * len(images), {1: ["a bag"]}, 1, 3.0, 0, 1, num_classes=3
    )
    assert report["confusion"] == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    assert report["accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"classes in \[0, 3\), got 5"):
        generation_accuracy(model, processor, lambda images: [5] * len(images), {1: ["a"]}, 1, 3.0, 0, 1, 3)


# --------------------------------------------------------------------------------------- understanding_accuracy


def scripted_answer(pixel_codes: torch.Tensor, semantic_codes: torch.Tensor) -> str:
    """A class name picked by the codes, or (one time in eleven) an answer that names no class."""
    index = int(pixel_codes.sum() + 2 * semantic_codes.sum()) % (len(CLASS_NAMES) + 1)
    return f"It is a {CLASS_NAMES[index]}." if index < len(CLASS_NAMES) else "I am not sure."


@pytest.fixture
def scripted_model(model, processor, monkeypatch):
    """The model with `generate` replaced by one that answers `scripted_answer` of each row's codes (encoding
    `pixel_values` when it gets images), followed by `<|im_end|>` and padding; it records its keyword arguments."""
    calls = []
    tokenizer = processor.tokenizer

    def generate(input_ids, attention_mask, pixel_values=None, pixel_codes=None, semantic_codes=None, **kwargs):
        calls.append({"pixel_values": pixel_values is not None, "rows": len(input_ids), **kwargs})
        if pixel_values is not None:
            pixel_codes, semantic_codes = model.encode_images(pixel_values)
        answers = [scripted_answer(*codes) + "<|im_end|>" for codes in zip(pixel_codes, semantic_codes)]
        answer_ids = tokenizer(answers, padding=True, padding_side="right", return_tensors="pt")["input_ids"]
        return torch.cat((input_ids, answer_ids), dim=1)

    monkeypatch.setattr(model, "generate", generate)
    model.calls = calls
    yield model
    del model.calls


def test_understanding_accuracy_reads_the_class_from_each_answer(scripted_model, processor, images):
    pixel_values = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    codes = scripted_model.encode_images(pixel_values)
    expected_answers = [scripted_answer(*row) for row in zip(*codes)]
    expected = [answer_label(answer, CLASS_NAMES) for answer in expected_answers]
    # Four answers right, the rest wrong (an unparseable answer is wrong whatever the label).
    labels = [prediction if index < 4 and prediction is not None else ((prediction or 0) + 1) % 10
              for index, prediction in enumerate(expected)]
    correct = sum(label == prediction for label, prediction in zip(labels, expected))

    report = understanding_accuracy(
        scripted_model, processor, list(images), labels, QUESTION, CLASS_NAMES, batch_size=3, max_new_tokens=12
    )

    assert report["answers"] == expected_answers
    assert report["predictions"] == expected
    assert report["accuracy"] == pytest.approx(correct / len(labels))
    assert report["unparseable"] == pytest.approx(expected.count(None) / len(labels))
    assert report["examples"][0] == {"class": CLASS_NAMES[labels[0]], "answer": expected_answers[0]}
    assert sum(map(sum, report["confusion"])) == len(labels) - expected.count(None)
    assert [(call["rows"], call["pixel_values"]) for call in scripted_model.calls] == [(3, True), (3, True), (1, True)]
    assert all(
        call["generation_mode"] == "text" and call["do_sample"] is False and call["max_new_tokens"] == 12
        for call in scripted_model.calls
    )


def test_understanding_accuracy_from_codes_matches_the_images(scripted_model, processor, images):
    pixel_values = processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
    codes = scripted_model.encode_images(pixel_values)
    labels = [0] * len(images)

    from_images = understanding_accuracy(scripted_model, processor, list(images), labels, QUESTION, CLASS_NAMES, 3, 12)
    from_codes = understanding_accuracy(scripted_model, processor, None, labels, QUESTION, CLASS_NAMES, 3, 12, codes)
    ablated = (codes[0], torch.zeros_like(codes[1]))
    without_semantic = understanding_accuracy(
        scripted_model, processor, None, labels, QUESTION, CLASS_NAMES, 3, 12, codes=ablated
    )

    assert from_codes == from_images
    assert not any(call["pixel_values"] for call in scripted_model.calls[3:])
    assert without_semantic["answers"] == [scripted_answer(*row) for row in zip(*ablated)]


def test_understanding_prompt_from_codes_is_the_processors_expansion(model, processor, images, monkeypatch):
    """The codes path builds the same token ids as the processor builds around real images."""
    prompts = []
    monkeypatch.setattr(model, "generate", lambda input_ids, **kwargs: prompts.append(input_ids) or input_ids)
    pixel_values = processor.image_processor(list(images[:2]), return_tensors="pt")["pixel_values"]
    codes = model.encode_images(pixel_values)
    understanding_accuracy(model, processor, list(images[:2]), [0, 1], QUESTION, CLASS_NAMES, 2, 4)
    understanding_accuracy(model, processor, None, [0, 1], QUESTION, CLASS_NAMES, 2, 4, codes=codes)
    assert torch.equal(prompts[0], prompts[1])
    assert (prompts[0] == processor.image_token_id).sum(dim=1).tolist() == [16, 16]


def test_understanding_accuracy_with_real_greedy_answers(model, processor, images):
    report = understanding_accuracy(model, processor, list(images), list(range(7)), QUESTION, CLASS_NAMES, 4, 3)
    predictions = [answer_label(answer, CLASS_NAMES) for answer in report["answers"]]
    assert report["predictions"] == predictions
    assert report["accuracy"] == pytest.approx(np.mean([p == label for p, label in zip(predictions, range(7))]))


def test_understanding_accuracy_needs_images_or_codes_and_one_label_each(model, processor, images):
    with pytest.raises(ValueError, match="either images or codes"):
        understanding_accuracy(model, processor, None, [0], QUESTION, CLASS_NAMES, 1, 4)
    with pytest.raises(ValueError, match="7 images .* and 2 labels"):
        understanding_accuracy(model, processor, list(images), [0, 1], QUESTION, CLASS_NAMES, 1, 4)
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        understanding_accuracy(model, processor, list(images[:1]), [10], QUESTION, CLASS_NAMES, 1, 4)


# ------------------------------------------------------------------------------------------ classifier script


@pytest.fixture(scope="module")
def classifier_script():
    """The script as a module; it imports `table3_mini` from its own folder, as when run from there."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(EXPERIMENTS))
        yield load_example(EXPERIMENTS / "fashion_mnist_classifier.py")


def test_classifier_input_reads_decoded_uint8_and_pil_images_alike(classifier_script):
    gray = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    expected = torch.from_numpy(gray)[:, None].float() / 255
    decoded = (torch.from_numpy(gray).float() / 127.5 - 1)[:, None].expand(-1, 3, -1, -1)
    pil_images = [Image.fromarray(image) for image in gray]
    to_input = classifier_script.to_classifier_input

    torch.testing.assert_close(to_input(gray), expected)
    torch.testing.assert_close(to_input(decoded), expected)
    torch.testing.assert_close(to_input(pil_images), expected)
    torch.testing.assert_close(to_input(torch.full((1, 3, 64, 64), 0.5)), torch.full((1, 1, 28, 28), 0.75))
    with pytest.raises(ValueError, match="C = 1 or 3"):
        to_input(torch.zeros(1, 2, 28, 28))


def test_quick_classifier_run_saves_a_classifier_with_its_test_accuracy(classifier_script, tmp_path):
    args = classifier_script.parse_args(
        ["--quick", "--data", str(SUBSET), "--threads", "1", "--output_dir", str(tmp_path)]
    )
    settings = classifier_script.main(args)

    classifier = classifier_script.load_classifier(tmp_path)
    with np.load(SUBSET) as arrays:
        test_images, test_labels = arrays["test_images"], arrays["test_labels"]
    predictions = classifier_script.classify(classifier, test_images).numpy()
    assert settings["test_accuracy"] == pytest.approx(float((predictions == test_labels).mean()))
    assert settings["steps"] == classifier_script.QUICK_STEPS
    assert settings["test_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert (tmp_path / "classifier.json").is_file()
