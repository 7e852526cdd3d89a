"""Understanding prefill: a prompt holding one image against the same LLM fed as many plain-text tokens.

The image comes as codes (what a tokenized dataset or a cached image gives; encoding pixels is the tokenizer's
cost, see tokenizer.py), so the difference is the code-embedding lookups and the projector (issue 11, target 4:
<= 1.1x). Model: `MID_LLM` with the paper's codebooks (K = 32768, C = 256, D = 8) on the paper's 27 x 27 grid.

    python benchmarks/prefill.py [--grid-side 27] [--repeats 3]
"""

import argparse

import torch

import harness
from models import MID_LLM, PAPER_CODES, unified_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--grid-side", type=int, default=27)
    parser.add_argument("--text-tokens", type=int, default=32, help="text tokens around the image")
    parser.add_argument("--tiny", action="store_true", help="tiny LLM and codebooks (a quick check)")
    return parser.parse_args(argv)


def main(args) -> str:
    harness.setup(args)
    if args.tiny:
        model = unified_model(grid_side=args.grid_side)
    else:
        model = unified_model(llm=MID_LLM, grid_side=args.grid_side, codes=PAPER_CODES)
    config = model.config
    quantizer = model.vision_tokenizer.pixel_quantizer
    positions = config.num_image_tokens
    half = args.text_tokens // 2
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, 256, (1, args.text_tokens + positions + 2), generator=generator)
    image = torch.tensor([[config.boi_token_id] + [config.image_token_id] * positions + [config.eoi_token_id]])
    with_image = torch.cat((text[:, :half], image, text[:, half : args.text_tokens]), dim=1)
    codes = {
        f"{branch}_codes": torch.randint(0, quantizer.codebook_size, (1, config.vision_config.grid_size,
                                                                        config.vision_config.grid_size,
                                                                        quantizer.depth), generator=generator)
        for branch in ("pixel", "semantic")
    }
    with torch.inference_mode():
        seconds, _ = harness.time_interleaved(
            {
                "text only": lambda: model(input_ids=text, logits_to_keep=1),
                "one image (as codes) + text": lambda: model(input_ids=with_image, **codes, logits_to_keep=1),
            },
            repeats=args.repeats,
        )
    base = seconds["text only"]
    table = harness.markdown_table(
        ["prompt", "prefill", "vs text only"],
        [[name, harness.ms(value), harness.ratio(value, base)] for name, value in seconds.items()],
    )
    llm = model.config.text_config
    return (
        f"### Understanding prefill ({text.shape[1]} tokens, {positions} of them image positions; "
        f"LLM {llm.num_hidden_layers} x {llm.hidden_size})\n\n{table}"
    )


if __name__ == "__main__":
    print(main(parse_args()))
