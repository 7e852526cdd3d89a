"""Image generation with and without the depth-head key/value cache, side by side in one process.

The baseline is the official RQ-Transformer way (`use_depth_cache=False`): every depth step re-runs the head over
all earlier slots, O(D^2) slot evaluations per position. The cache makes it O(D). Both must give the same codes.
Two shapes: the paper's head (width 1024, 3 layers, D = 8) with K = 4096 on the tiny LLM, where the heads are all the
work (issue 11 target: >= 3.5x; the FLOPs allow ~4.1x), and the whole tiny preset, where per-call overhead rules.

    python benchmarks/depth_cache.py [--batch 8] [--grid-side 2] [--repeats 3]
"""

import argparse

import torch

import harness
from models import PAPER_HEAD, generation_prompts, unified_model


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=8, help="prompts (doubled by guidance)")
    parser.add_argument("--grid-side", type=int, default=2, help="positions per side of the paper-head run")
    parser.add_argument("--tiny-grid-side", type=int, default=8, help="positions per side of the tiny-preset run")
    parser.add_argument("--codebook-size", type=int, default=4096, help="K of the paper-head run")
    return parser.parse_args(argv)


def compare(model, batch: int, repeats: int) -> tuple[float, float, bool]:
    """Median seconds per position of (recomputed slots, depth cache), and whether both chose the same codes."""
    prompts = generation_prompts(model, batch)

    def generate(use_depth_cache):
        generator = torch.Generator().manual_seed(0)
        return model.generate(
            input_ids=prompts, generation_mode="image", guidance_scale=3.0, use_depth_cache=use_depth_cache,
            generator=generator, progress_bar=False,
        )

    seconds, codes = harness.time_interleaved(
        {"recomputed": lambda: generate(False), "cached": lambda: generate(True)}, repeats=repeats
    )
    positions = model.config.num_image_tokens
    same = torch.equal(codes["recomputed"], codes["cached"])
    return seconds["recomputed"] / positions, seconds["cached"] / positions, same


def roofline(model, batch: int, peak_gflops: float, bandwidth_gbs: float) -> str:
    """What the machine allows: per position both paths read every head weight once per depth (a single new slot
    cannot share a read with the next, which needs this slot's code), so the cached path is bound by memory
    bandwidth at small batches while the recomputed path does D(D+1)/2 slot evaluations on the same reads."""
    rows = 2 * batch  # guidance
    seconds = {"recomputed": 0.0, "cached": 0.0}
    for branch in ("pixel", "semantic"):
        head = getattr(model, f"{branch}_head")
        depth = head.depth
        layer_weights = sum(m.weight.numel() for m in head.layers.modules() if isinstance(m, torch.nn.Linear))
        classifier_weights = sum(c.weight.numel() for c in head.classifiers)
        weight_bytes = 4 * (depth * layer_weights + classifier_weights)
        flops = {
            "cached": 2 * rows * (depth * layer_weights + classifier_weights),
            "recomputed": 2 * rows * (depth * (depth + 1) // 2 * layer_weights + classifier_weights),
        }
        for path in seconds:
            seconds[path] += max(weight_bytes / bandwidth_gbs / 1e9, flops[path] / peak_gflops / 1e9)
    return (
        f"Bound on this machine (fp32 matmul peak {peak_gflops:.0f} GFLOP/s, copy bandwidth {bandwidth_gbs:.1f} "
        f"GB/s, every head weight read once per depth): recomputed >= {harness.ms(seconds['recomputed'])}, cached "
        f">= {harness.ms(seconds['cached'])} per position, so at most "
        f"{seconds['recomputed'] / seconds['cached']:.2f}x for the paper head."
    )


def main(args) -> str:
    harness.setup(args)
    depth = 8
    paper = unified_model(
        grid_side=args.grid_side, head=PAPER_HEAD, codes={"codebook_size": args.codebook_size, "depth": depth}
    )
    tiny = unified_model(grid_side=args.tiny_grid_side)
    rows = []
    bound = roofline(paper, args.batch, harness.matmul_peak_gflops(), harness.memory_bandwidth_gbs())
    with torch.inference_mode():
        for name, model in (
            (f"paper head (width 1024, D = {depth}, K = {args.codebook_size}), tiny LLM, "
             f"{args.grid_side}x{args.grid_side} grid", paper),
            (f"tiny preset (width 64, D = 4, K = 256), {args.tiny_grid_side}x{args.tiny_grid_side} grid", tiny),
        ):
            recomputed, cached, same = compare(model, args.batch, args.repeats)
            rows.append([name, harness.ms(recomputed), harness.ms(cached), f"{recomputed / cached:.2f}x", same])
    table = harness.markdown_table(
        ["setting", "recomputed slots (baseline) / position", "depth KV cache / position", "speed-up", "same codes"],
        rows,
    )
    return f"### Depth-head KV cache ({args.batch} prompts, guidance 3 doubles the batch)\n\n{table}\n\n{bound}"


if __name__ == "__main__":
    print(main(parse_args()))
