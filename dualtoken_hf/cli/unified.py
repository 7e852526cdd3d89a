"""`dualtoken generate` and `dualtoken describe`: a unified model writing images and reading them."""

import torch

from ..hub.folders import load_processor, load_unified
from ..pretrained import mini_dualtoken_path
from .codes import write_images
from .files import check_image_output, open_images


def load_model_and_processor(args):
    """The unified model of `--model` (default: the mini DualToken shipped with the package) on `--device`, and
    its processor."""
    path = args.model or mini_dualtoken_path()
    return load_unified(path).to(args.device), load_processor(path)


def run_generate(args) -> None:
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    check_image_output(args.output)
    model, processor = load_model_and_processor(args)
    inputs = processor(text=[args.prompt], generation_mode="image", return_tensors="pt").to(args.device)
    generator = torch.Generator(args.device).manual_seed(args.seed) if args.seed is not None else None
    pixel_codes = model.generate(
        **inputs,
        generation_mode="image",
        guidance_scale=args.guidance_scale,
        num_images_per_prompt=args.num_images,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        generator=generator,
        progress_bar=True,
    )
    write_images(processor.postprocess(model.decode_image_tokens(pixel_codes)), args.output)


def _check_answer_fits(text_config, prompt_length: int, max_new_tokens: int) -> None:
    """The prompt (image positions included) and `max_new_tokens` must fit the LLM's positions."""
    context = getattr(text_config, "max_position_embeddings", None)
    if context is None:
        return
    left = context - prompt_length
    if left < 1:
        raise ValueError(
            f"the prompt takes {prompt_length} positions (the image's included), which leaves none of the model's "
            f"context of {context} (max_position_embeddings) for the answer: shorten --prompt"
        )
    if max_new_tokens > left:
        raise ValueError(
            f"--max-new-tokens must be at most {left} for this prompt (the model's context of {context} positions "
            f"minus the prompt's {prompt_length}), got {max_new_tokens}"
        )


def run_describe(args) -> None:
    (image,) = open_images([args.image])
    model, processor = load_model_and_processor(args)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.prompt}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(args.device)
    _check_answer_fits(model.config.text_config, inputs["input_ids"].shape[1], args.max_new_tokens)
    generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])[0].strip())
