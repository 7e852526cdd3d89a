"""`dualtoken generate` and `dualtoken describe`: a unified model writing images and reading them."""

import torch

from ..hub.folders import load_processor, load_unified
from .codes import write_images
from .files import check_image_output, open_images


def run_generate(args) -> None:
    if not args.prompt.strip():
        raise ValueError("the prompt is empty")
    check_image_output(args.output)
    model, processor = load_unified(args.model).to(args.device), load_processor(args.model)
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


def run_describe(args) -> None:
    (image,) = open_images([args.image])
    model, processor = load_unified(args.model).to(args.device), load_processor(args.model)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": args.prompt}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    ).to(args.device)
    generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(processor.post_process_image_text_to_text(generated[:, inputs["input_ids"].shape[1] :])[0].strip())
