"""The full-size tokenizer (`paper` preset) against its floors: encode, nearest-code search, decode, encode memory.

Floors (issue 11, targets 1, 2 and 5):
- encode (`codes_only=True`): a plain transformers `SiglipVisionModel` forward of the blocks a tokens-only encode
  needs (up to the semantic layer; they are the tokenizer's own modules) plus the quantizers' distance matmuls,
  2 branches x D depths of bare `addmm` (positions x C) @ (C x K). At batch 1 the encode that also pools the
  quantized semantics (the default) is shown beside them.
- nearest-code search: one branch's D bare `addmm` against the official search (`||r||^2 + ||e||^2 - 2 r.e` in one
  addmm, then argmin, as the official code) and against the package's quantizer.
- decode: diffusers' `VQModel.decode` with the pixel decoder's channels and blocks.

    python benchmarks/tokenizer.py [--batches 1 8] [--repeats 3] [--threads 1]
"""

import argparse
import contextlib
import inspect

import torch

import harness
from models import siglip_tokens_floor, tokenizer_model, vqmodel_floor


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--preset", default="paper", help="tokenizer preset (`tiny` for a quick check)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument(
        "--large-batch-repeats", type=int, default=1,
        help="repeats for batches above 1 (8 full-size images take about a minute per variant on one core)",
    )
    parser.add_argument("--bf16", action="store_true", help="also time bf16 autocast at batch 1 where the CPU allows")
    return parser.parse_args(argv)


def official_nearest_codes(quantizer, latents: torch.Tensor) -> torch.LongTensor:
    """The official residual search (eval): per depth, distances in one addmm, argmin, subtract the embedding."""
    residual = latents.reshape(-1, quantizer.code_dim).float()
    codes = []
    for d in range(quantizer.depth):
        codebook = quantizer.codebook[0 if quantizer.shared_codebook else d].float()
        codebook_t = codebook.t()
        distances = torch.addmm(
            residual.pow(2).sum(1, keepdim=True) + codebook_t.pow(2).sum(0, keepdim=True), residual, codebook_t,
            alpha=-2.0,
        )
        codes.append(distances.argmin(dim=-1))
        residual = residual - codebook[codes[-1]]
    return torch.stack(codes, dim=-1)


def distance_matmuls(quantizers, positions: int):
    """The bare distance matmuls of the given quantizers: D `addmm` of (positions x C) @ (C x K) each."""
    operands = []
    for quantizer in quantizers:
        codebook_t = quantizer.codebook[0].float().t()
        operands.append((torch.randn(1, quantizer.codebook_size), torch.randn(positions, quantizer.code_dim),
                         codebook_t, quantizer.depth))

    def run():
        for bias, residual, codebook_t, depth in operands:
            for _ in range(depth):
                torch.addmm(bias, residual, codebook_t, alpha=-2.0)

    return run


def encode_rows(model, floor, images, repeats, warmup, all_outputs, autocast=contextlib.nullcontext):
    """Median seconds of the tokens-only encode (`codes_only=True`; a package without it encodes everything), the
    floor, and with `all_outputs` the encode that also pools the quantized semantics."""
    quantizers = (model.pixel_quantizer, model.semantic_quantizer)
    matmuls = distance_matmuls(quantizers, images.shape[0] * model.config.grid_size**2)
    codes_only = {"codes_only": True} if "codes_only" in inspect.signature(model.encode).parameters else {}

    def encode(**kwargs):
        with autocast():
            return model.encode(images, **kwargs)

    def tokens_floor():
        with autocast():
            floor(pixel_values=images)
            matmuls()

    variants = {"encode, codes only (ours)": lambda: encode(**codes_only), "floor": tokens_floor}
    if all_outputs:
        variants["encode with pooled semantics (ours)"] = encode
    seconds, _ = harness.time_interleaved(variants, repeats=repeats, warmup=warmup)
    return seconds


def search_rows(model, repeats):
    """One branch (the pixel quantizer) at batch 1: bare matmuls vs the official search vs the package's quantizer."""
    quantizer = model.pixel_quantizer
    side = model.config.grid_size
    latents = torch.randn(1, side, side, quantizer.code_dim)
    seconds, results = harness.time_interleaved(
        {
            "D bare addmm (floor)": distance_matmuls([quantizer], side * side),
            "official search": lambda: official_nearest_codes(quantizer, latents),
            "package quantizer": lambda: quantizer(latents).codes,
        },
        repeats=repeats,
    )
    identical = torch.equal(results["official search"], results["package quantizer"].reshape(-1, quantizer.depth))
    return seconds, identical


def decode_rows(model, vqmodel, codes, repeats, warmup):
    side = model.pixel_decoder.latent_size
    latents = torch.randn(codes.shape[0], model.pixel_decoder.config.hidden_size, side, side)
    seconds, _ = harness.time_interleaved(
        {
            "decode (ours)": lambda: model.decode(codes),
            "VQModel.decode": lambda: vqmodel.decode(latents, force_not_quantize=True).sample,
        },
        repeats=repeats,
        warmup=warmup,
    )
    return seconds


def main(args) -> str:
    harness.setup(args)
    model = tokenizer_model(args.preset)
    side, depth = model.config.grid_size, model.pixel_quantizer.depth
    images = torch.randn(max(args.batches), 3, model.config.image_size, model.config.image_size).clamp(-1, 1)
    codes = torch.randint(0, model.pixel_quantizer.codebook_size, (max(args.batches), side, side, depth))
    floor, vqmodel = siglip_tokens_floor(model), vqmodel_floor(model)

    with torch.inference_mode():
        weights_rss = harness.rss_mib()
        harness.reset_peak_rss()
        model.encode(images[:1])
        encode_peak = harness.peak_rss_mib()
        harness.reset_peak_rss()
        model.decode(codes[:1])
        decode_peak = harness.peak_rss_mib()

        encode, decode = [], []
        for batch in args.batches:
            repeats, warmup = (args.repeats, 1) if batch == 1 else (args.large_batch_repeats, 0)
            seconds = encode_rows(model, floor, images[:batch], repeats, warmup, all_outputs=batch == 1)
            for name, value in seconds.items():
                encode.append([name, batch, harness.ms(value / batch), harness.ratio(value, seconds["floor"])])
            seconds = decode_rows(model, vqmodel, codes[:batch], repeats, warmup)
            for name, value in seconds.items():
                decode.append([name, batch, harness.ms(value / batch), harness.ratio(value, seconds["VQModel.decode"])])
        if args.bf16 and harness.bf16_matmul_supported():
            seconds = encode_rows(
                model, floor, images[:1], args.repeats, 1, all_outputs=False,
                autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16),
            )
            for name, value in seconds.items():
                encode.append([f"{name}, **bf16 autocast**", 1, harness.ms(value), harness.ratio(value, seconds["floor"])])
        search, identical = search_rows(model, args.repeats)

    k, c = model.pixel_quantizer.codebook_size, model.pixel_quantizer.code_dim
    header = ["variant", "batch", "per image", "vs floor"]
    return "\n\n".join(
        [
            f"### Encode, `{args.preset}` tokenizer (fp32, {side}x{side} positions, D = {depth}, K = {k}, C = {c})",
            harness.markdown_table(header, encode),
            "### Nearest-code search, one branch, batch 1",
            harness.markdown_table(
                ["variant", "time", "vs floor"],
                [[name, harness.ms(value), harness.ratio(value, search["D bare addmm (floor)"])]
                 for name, value in search.items()],
            ),
            f"Official search and package quantizer give identical codes: {identical}.",
            f"### Decode, `{args.preset}` pixel decoder (fp32)",
            harness.markdown_table(header[:3] + ["vs VQModel"], decode),
            f"### Memory, `{args.preset}` tokenizer",
            harness.markdown_table(
                ["", "RSS"],
                [
                    ["model built (weights resident)", f"{weights_rss:.0f} MiB"],
                    ["peak during encode, batch 1", f"{encode_peak:.0f} MiB"],
                    ["peak during decode, batch 1", f"{decode_peak:.0f} MiB"],
                ],
            ),
        ]
    )


if __name__ == "__main__":
    print(main(parse_args()))
