"""Image generation with and without the depth-head key/value cache, side by side in one process.

The baseline is the official RQ-Transformer way (`use_depth_cache=False`): every depth step re-runs the head over
all earlier slots, O(D^2) slot evaluations per position. The cache makes it O(D). Both must give the same codes.

    python benchmarks/depth_cache.py [--depth 8] [--positions-side 8] [--repeats 3]
"""

import argparse
import platform
import statistics
import time

import torch

from dualtoken_hf import DualTokenConfig, DualTokenForConditionalGeneration, DualTokenVisionConfig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=8, help="residual depth D (paper: 8)")
    parser.add_argument("--positions-side", type=int, default=8, help="grid side: side^2 positions per image")
    parser.add_argument("--head-width", type=int, default=256)
    parser.add_argument("--codebook-size", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4, help="prompts (doubled by guidance)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return parser.parse_args(argv)


def build_model(args) -> DualTokenForConditionalGeneration:
    quantizer = {"depth": args.depth, "codebook_size": args.codebook_size}
    vision = DualTokenVisionConfig.from_preset(
        "tiny",
        siglip_config={"image_size": args.positions_side * 8},
        pixel_quantizer_config=quantizer,
        semantic_quantizer_config=quantizer,
    )
    config = DualTokenConfig.from_preset(
        "tiny",
        vision_config=vision,
        depth_head_config={"hidden_size": args.head_width, "intermediate_size": 4 * args.head_width},
    )
    torch.manual_seed(0)
    return DualTokenForConditionalGeneration(config).eval()


def timed_generation(model, input_ids, use_depth_cache: bool) -> tuple[float, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    codes = model.generate(
        input_ids=input_ids, generation_mode="image", use_depth_cache=use_depth_cache, generator=generator
    )
    return time.perf_counter() - start, codes


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    input_ids = torch.tensor([[21, 22, 23, model.config.boi_token_id]] * args.batch)
    timed_generation(model, input_ids, True)  # warm-up
    times = {True: [], False: []}
    codes = {}
    for _ in range(args.repeats):  # interleaved so background load hits both alike
        for use_cache in (True, False):
            seconds, codes[use_cache] = timed_generation(model, input_ids, use_cache)
            times[use_cache].append(seconds)
    positions = args.positions_side**2
    cached, recomputed = statistics.median(times[True]), statistics.median(times[False])
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    print(f"D={args.depth}, {positions} positions, batch {args.batch} (x2 guidance), head width {args.head_width}, "
          f"K={args.codebook_size}, median of {args.repeats}")
    print("| variant | s / image batch | ms / position |")
    print("|---|---|---|")
    print(f"| recomputed slots (official head, baseline) | {recomputed:.3f} | {1000 * recomputed / positions:.1f} |")
    print(f"| depth KV cache (ours) | {cached:.3f} | {1000 * cached / positions:.1f} |")
    print(f"speed-up {recomputed / cached:.2f}x; identical codes: {torch.equal(codes[True], codes[False])}")


if __name__ == "__main__":
    main(parse_args())
