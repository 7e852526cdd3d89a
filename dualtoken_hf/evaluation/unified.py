"""Evaluation of a unified DualToken model on a labelled image set: generation accuracy (an image classifier labels
the images generated from class captions) and understanding accuracy (the class named in the model's answers to a
question about test images)."""

import re
from collections.abc import Callable, Sequence
from functools import lru_cache

import torch
from tqdm.auto import tqdm


NUM_EXAMPLE_ANSWERS = 8


@lru_cache(maxsize=8)
def _class_pattern(class_names: tuple[str, ...]) -> re.Pattern:
    """One regex whose alternatives are every name (and, for names such as "T-shirt/top", each "/" alternative),
    longest first, bounded by non-word, non-hyphen characters and allowing a plural "s"/"es"."""
    alternatives = {}
    for index, name in enumerate(class_names):
        for alias in (name, *name.split("/")):
            alias = alias.strip().lower()
            if alias:
                alternatives.setdefault(alias, index)
    ordered = sorted(alternatives, key=len, reverse=True)
    names = "|".join(
        f"(?P<c{alternatives[alias]}_{position}>{re.escape(alias)})" for position, alias in enumerate(ordered)
    )
    return re.compile(rf"(?<![\w-])(?:{names})(?:e?s)?(?![\w-])", re.IGNORECASE)


def answer_label(answer: str, class_names: Sequence[str]) -> int | None:
    """The index of the class that a free-text answer names, or `None` when it names none or two different ones.

    Matching is case-insensitive, on whole words (a hyphen counts as part of a word, so "T-shirt" does not name
    "shirt"), allows a plural ("trousers", "ankle boots"), and at each place takes the longest name that fits. A
    class name with "/" ("T-shirt/top") is named by the whole name or by any of its parts ("T-shirt", "top").

    Example: with the Fashion-MNIST names, "A T-shirt." -> 0, "an ankle boot" -> 9, "A boot." -> None,
    "a shirt or a coat" -> None.
    """
    named = {int(match.lastgroup[1:].split("_")[0]) for match in _class_pattern(tuple(class_names)).finditer(answer)}
    return named.pop() if len(named) == 1 else None


def _confusion_report(labels: list[int], predictions: list[int | None], num_classes: int) -> dict:
    """Accuracy, per-class accuracy (for the classes present) and confusion counts `[true][predicted]`; a `None`
    prediction is wrong and counted in no cell."""
    confusion = [[0] * num_classes for _ in range(num_classes)]
    for label, prediction in zip(labels, predictions):
        if prediction is not None:
            confusion[label][prediction] += 1
    totals = {label: labels.count(label) for label in sorted(set(labels))}
    correct = sum(label == prediction for label, prediction in zip(labels, predictions))
    return {
        "accuracy": correct / len(labels),
        "per_class_accuracy": {label: confusion[label][label] / total for label, total in totals.items()},
        "confusion": confusion,
        "num_images": len(labels),
    }


@torch.no_grad()
def generation_accuracy(
    model,
    processor,
    classify: Callable[[torch.Tensor], Sequence[int]],
    prompts_by_class: dict[int, list[str]],
    images_per_class: int,
    guidance_scale: float,
    seed: int,
    batch_size: int,
    num_classes: int | None = None,
    return_images: bool = False,
    **sampling,
) -> dict:
    """
    Text-to-image accuracy: generate images from each class's prompts and count those that `classify` puts in the
    prompt's class.

    Image i of a class uses that class's prompt `i % len(prompts)`. Images are generated in batches (classes in
    ascending order) with `model.generate(..., generation_mode="image")` from one `torch.Generator` seeded with
    `seed`, so the same seed and batch size give the same images; the pixel codes are decoded with
    `model.decode_image_tokens`.

    Args:
        model: a [`DualTokenForConditionalGeneration`].
        processor: its [`DualTokenProcessor`].
        classify: decoded images `(B, 3, H, W)` in [-1, 1] -> `B` class indices (a tensor, array or list).
        prompts_by_class: class index -> captions of that class (e.g. held-out phrasings).
        images_per_class: images generated per class.
        guidance_scale: classifier-free guidance scale; 1 is the unguided model.
        seed: seed of the sampling generator.
        batch_size: images per `generate` call.
        num_classes: the classifier's number of classes (the size of `confusion`); default: enough for every
            prompted class and every returned label.
        return_images: also return the decoded images.
        sampling: further sampling settings of `generate` (`temperature`, `top_k`, `top_p`).

    Returns:
        `dict` with `accuracy`, `per_class_accuracy` (class -> accuracy), `confusion` (counts, `[true][predicted]`,
        over `num_classes` classes), `num_images`, `labels` and `predictions` (per image, in generation order),
        `guidance_scale`, `seed` and, with `return_images`, `images` `(num_images, 3, H, W)`.
    """
    if images_per_class < 1 or batch_size < 1:
        raise ValueError(f"images_per_class and batch_size must be >= 1, got {images_per_class} and {batch_size}")
    empty = [label for label, prompts in prompts_by_class.items() if not prompts]
    if not prompts_by_class or empty:
        raise ValueError(f"prompts_by_class needs at least one prompt per class; classes without prompts: {empty}")
    if num_classes is not None and not max(prompts_by_class) < num_classes:
        raise ValueError(f"prompted classes must be in [0, num_classes={num_classes}), got {max(prompts_by_class)}")
    jobs = [
        (prompts_by_class[label][index % len(prompts_by_class[label])], label)
        for label in sorted(prompts_by_class)
        for index in range(images_per_class)
    ]
    # Scale 1 gives exactly the conditional logits, so the unconditional batch would only double the cost.
    model_guidance_scale = 0.0 if guidance_scale == 1 else guidance_scale
    generator = torch.Generator(device=model.device).manual_seed(seed)
    labels, predictions, images = [], [], []
    with tqdm(total=len(jobs), desc=f"generating (guidance {guidance_scale:g})", unit="image") as progress:
        for start in range(0, len(jobs), batch_size):
            prompts, batch_labels = zip(*jobs[start : start + batch_size])
            inputs = processor(text=list(prompts), generation_mode="image", return_tensors="pt").to(model.device)
            pixel_codes = model.generate(
                **inputs, generation_mode="image", guidance_scale=model_guidance_scale, generator=generator, **sampling
            )
            decoded = model.decode_image_tokens(pixel_codes).float().cpu()
            batch_predictions = [int(prediction) for prediction in classify(decoded)]
            if len(batch_predictions) != len(batch_labels):
                raise ValueError(f"classify returned {len(batch_predictions)} labels for {len(batch_labels)} images")
            limit = num_classes if num_classes is not None else float("inf")
            outside = [prediction for prediction in batch_predictions if not 0 <= prediction < limit]
            if outside:
                raise ValueError(f"classify must return classes in [0, {limit}), got {outside[0]}")
            labels += batch_labels
            predictions += batch_predictions
            if return_images:
                images.append(decoded)
            progress.update(len(batch_labels))

    report = _confusion_report(labels, predictions, num_classes or max(labels + predictions) + 1)
    report.update(labels=labels, predictions=predictions, guidance_scale=guidance_scale, seed=seed, sampling=sampling)
    if return_images:
        report["images"] = torch.cat(images)
    return report


def _understanding_prompt(processor, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@torch.no_grad()
def understanding_accuracy(
    model,
    processor,
    images,
    labels: Sequence[int],
    question: str,
    class_names: Sequence[str],
    batch_size: int,
    max_new_tokens: int,
    codes: tuple[torch.LongTensor, torch.LongTensor] | None = None,
) -> dict:
    """
    Image-understanding accuracy: ask `question` about each image (greedy decoding) and read the class its answer
    names with [`answer_label`].

    Each image is asked in its own chat turn (`processor.apply_chat_template`, image first, then the question, with
    the assistant generation prompt); the answer is the decoded continuation
    (`processor.post_process_image_text_to_text`, special tokens dropped, stripped).

    Args:
        model: a [`DualTokenForConditionalGeneration`].
        processor: its [`DualTokenProcessor`].
        images: the images (a list, an array or a tensor; anything the processor takes, sliced per batch), or
            `None` with `codes`.
        labels: the true class of each image.
        question: e.g. `"What is in this image?"`.
        class_names: names that answers are matched against (index = class).
        batch_size: images per `generate` call.
        max_new_tokens: longest answer.
        codes: `(pixel_codes, semantic_codes)`, each `(N, h, w, D)`, read instead of `images` (e.g. with one branch's
            codes replaced, for an ablation).

    Returns:
        `dict` with `accuracy` (an answer naming no class or two classes is wrong), `unparseable` (the fraction of
        such answers), `per_class_accuracy`, `confusion` (`[true][predicted]`, unparseable answers left out),
        `num_images`, `answers` and `predictions` (class or `None`) per image, and `examples` (the first answers
        with their true class name).
    """
    labels = [int(label) for label in labels]
    if not all(0 <= label < len(class_names) for label in labels):
        raise ValueError(f"labels must be class indices in [0, {len(class_names)}), got {min(labels)}..{max(labels)}")
    if (images is None) == (codes is None):
        raise ValueError("pass either images or codes=(pixel_codes, semantic_codes), not both or neither")
    if codes is not None:
        pixel_codes, semantic_codes = codes
        if pixel_codes.shape != semantic_codes.shape:
            raise ValueError(
                f"pixel_codes and semantic_codes must have one shape, got {tuple(pixel_codes.shape)} and "
                f"{tuple(semantic_codes.shape)}"
            )
    num_images = len(images) if images is not None else len(codes[0])
    if num_images != len(labels):
        raise ValueError(f"got {num_images} images (or codes) and {len(labels)} labels")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}")

    prompt = _understanding_prompt(processor, question)
    # With codes there are no images for the processor to expand the placeholder for, so expand it here as it would.
    expanded_prompt = prompt.replace(processor.image_token, processor.replace_image_token({}, image_idx=0))
    answers = []
    for start in tqdm(range(0, num_images, batch_size), desc="answering", unit="batch"):
        stop = min(start + batch_size, num_images)
        if codes is None:
            inputs = processor(text=[prompt] * (stop - start), images=images[start:stop], return_tensors="pt")
        else:
            inputs = processor.tokenizer([expanded_prompt] * (stop - start), return_tensors="pt", padding=True)
            inputs["pixel_codes"], inputs["semantic_codes"] = (branch[start:stop] for branch in codes)
        inputs = inputs.to(model.device)
        generated = model.generate(**inputs, generation_mode="text", do_sample=False, max_new_tokens=max_new_tokens)
        replies = processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])
        answers += [reply.strip() for reply in replies]

    predictions = [answer_label(answer, class_names) for answer in answers]
    report = _confusion_report(labels, predictions, len(class_names))
    report.update(
        unparseable=sum(prediction is None for prediction in predictions) / num_images,
        answers=answers,
        predictions=predictions,
        examples=[
            {"class": class_names[label], "answer": answer}
            for label, answer in zip(labels[:NUM_EXAMPLE_ANSWERS], answers[:NUM_EXAMPLE_ANSWERS])
        ],
    )
    return report
