"""Image generation on a mid-size LLM with the paper's heads: where each position's time goes, the LLM steps with
transformers' caches, transformers' Janus beside it, and memory over many images.

Model: `MID_LLM` (Qwen2, 12 layers x 768) with both depth heads at the paper's shape (width 1024, 3 layers, D = 8,
K = 32768, C = 256) on a small grid (`--grid-side`, 3x3 by default: every position costs the same after the first,
so the per-position figures hold for 27x27; the full grid only grows the LLM's attention context).

- breakdown: per position, the LLM step, each head's slot inputs, layers and classifiers, the projector, and the
  rest (guidance, sampling, loop); each part's GFLOP/s against the machine's measured matmul peak;
- LLM steps alone: transformers' `DynamicCache` (what `generate` uses) against `StaticCache` (and `torch.compile`
  with `--compile`);
- Janus: transformers' `JanusForConditionalGeneration` (one code per position, its real head shape) on a Llama of
  the same size and the same grid and batch;
- memory: peak RSS of one generation, then RSS over `--images` generations in a row.

    python benchmarks/generation.py [--batch 8] [--grid-side 3] [--images 20] [--compile]
"""

import argparse
import statistics
import time
from collections import defaultdict

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache, StaticCache

import harness
from models import MID_LLM, PAPER_CODES, PAPER_HEAD, generation_prompts, janus_model, unified_model


BRANCHES = ("pixel", "semantic")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser)
    parser.add_argument("--batch", type=int, default=8, help="prompts (doubled by guidance)")
    parser.add_argument("--grid-side", type=int, default=3)
    parser.add_argument("--images", type=int, default=20, help="generations in a row for the memory check")
    parser.add_argument("--llm-steps", type=int, default=32, help="decoding steps of the LLM-cache comparison")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on the static-cache steps")
    parser.add_argument("--tiny", action="store_true", help="tiny LLM, heads and codebooks (a quick check)")
    return parser.parse_args(argv)


class PartProfiler:
    """Wall time (and optionally FLOPs) of named groups of modules, from forward hooks. Calls of the LLM with more
    than one new position are the prefill and are kept apart from the per-position steps."""

    def __init__(self, model, count_flops: bool = False):
        self.count_flops = count_flops
        self.seconds = defaultdict(float)
        self.flops = defaultdict(int)
        self.handles = []
        parts = {"LLM step": [model.language_model], "projector": [model.image_projector]}
        for branch in BRANCHES:
            head = getattr(model, f"{branch}_head")
            parts[f"{branch} head: slot inputs"] = [head.input_projection, head.code_projection]
            parts[f"{branch} head: layers"] = [*head.layers, head.norm]
            parts[f"{branch} head: classifiers"] = list(head.classifiers)
        for part, modules in parts.items():
            for module in modules:
                self._watch(module, part)

    def _watch(self, module: nn.Module, part: str):
        state = {}

        def before(module, args, kwargs):
            embeds = kwargs.get("inputs_embeds")
            state["part"] = "LLM prefill" if embeds is not None and embeds.shape[1] > 1 else part
            if self.count_flops:
                state["counter"] = FlopCounterMode(display=False)
                state["counter"].__enter__()
            state["start"] = time.perf_counter()

        def after(module, args, kwargs, output):
            self.seconds[state["part"]] += time.perf_counter() - state["start"]
            if self.count_flops:
                state["counter"].__exit__(None, None, None)
                self.flops[state["part"]] += state["counter"].get_total_flops()

        self.handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
        self.handles.append(module.register_forward_hook(after, with_kwargs=True))

    def remove(self):
        for handle in self.handles:
            handle.remove()


def generate(model, prompts, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return model.generate(
        input_ids=prompts, generation_mode="image", guidance_scale=3.0, generator=generator, progress_bar=False,
        **kwargs,
    )


def breakdown(model, prompts, peak: float) -> tuple[str, dict]:
    """Per-position table of one generation (the median of nothing: one timed run after a warm-up, hooks on)."""
    generate(model, prompts)
    counting = PartProfiler(model, count_flops=True)
    generate(model, prompts)
    counting.remove()
    timing = PartProfiler(model)
    start = time.perf_counter()
    generate(model, prompts)
    total = time.perf_counter() - start
    timing.remove()

    positions = model.config.num_image_tokens
    steps = positions - 1  # the last position needs no LLM step
    per_position = {part: seconds / (steps if part in ("LLM step", "projector") else positions)
                    for part, seconds in timing.seconds.items() if part != "LLM prefill"}
    flops = {part: count / (steps if part in ("LLM step", "projector") else positions)
             for part, count in counting.flops.items() if part != "LLM prefill"}
    position_total = (total - timing.seconds["LLM prefill"]) / positions
    per_position["guidance, sampling, loop (rest)"] = position_total - sum(per_position.values())
    rows = []
    for part, seconds in per_position.items():
        gflop = flops.get(part, 0) / 1e9
        rate = f"{gflop / seconds:.0f}" if gflop else "-"
        share = f"{100 * gflop / seconds / peak:.0f} %" if gflop else "-"
        rows.append([part, harness.ms(seconds), f"{100 * seconds / position_total:.0f} %", f"{gflop:.3g}", rate, share])
    rows.append(["**position total**", harness.ms(position_total), "100 %", "", "", ""])
    table = harness.markdown_table(["part", "per position", "share", "GFLOP", "GFLOP/s", "of peak"], rows)
    llm = per_position["LLM step"] + per_position["projector"]
    summary = {"position": position_total, "llm": llm, "prefill": timing.seconds["LLM prefill"]}
    return table, summary


def llm_steps(language_model, rows: int, steps: int, repeats: int, compile_steps: bool) -> str:
    """LLM decoding steps alone (inputs_embeds, as image generation feeds them) with each cache."""
    config = language_model.config
    prompt_length = 8
    prompt = torch.randn(rows, prompt_length, config.hidden_size)
    step_inputs = torch.randn(steps, rows, 1, config.hidden_size)
    compiled = torch.compile(language_model, dynamic=False) if compile_steps else None

    def decode(cache, model=language_model):
        mask = torch.ones(rows, prompt_length, dtype=torch.long)
        position_ids = torch.arange(prompt_length).repeat(rows, 1)
        language_model(inputs_embeds=prompt, attention_mask=mask, position_ids=position_ids, cache=cache, use_cache=True)
        start = time.perf_counter()
        for inputs in step_inputs:
            mask = torch.cat((mask, mask.new_ones(rows, 1)), dim=1)
            position_ids = position_ids[:, -1:] + 1
            hidden = model(inputs_embeds=inputs, attention_mask=mask, position_ids=position_ids, cache=cache,
                           use_cache=True).last_hidden_state
        return time.perf_counter() - start, hidden

    length = prompt_length + steps
    variants = {
        "DynamicCache (generate today)": lambda: decode(DynamicCache(config=config)),
        "StaticCache": lambda: decode(StaticCache(config=config, max_cache_len=length)),
    }
    if compiled is not None:
        variants["StaticCache + torch.compile"] = lambda: decode(StaticCache(config=config, max_cache_len=length),
                                                                 compiled)
    step_seconds = {name: [] for name in variants}
    outputs = {}
    for name, run in variants.items():  # warm-up (and compilation)
        outputs[name] = run()[1]
    for _ in range(repeats):
        for name, run in variants.items():
            seconds, outputs[name] = run()
            step_seconds[name].append(seconds / steps)
    medians = {name: statistics.median(values) for name, values in step_seconds.items()}
    base = medians["DynamicCache (generate today)"]
    rows_out = []
    for name, median in medians.items():
        same = torch.allclose(outputs[name], outputs["DynamicCache (generate today)"], atol=1e-4)
        rows_out.append([name, harness.ms(median), harness.ratio(base, median), same])
    return harness.markdown_table(["LLM step", "per step", "speed-up", "same hidden states (1e-4)"], rows_out)


def janus_comparison(model, janus, prompts, repeats) -> str:
    def janus_generate():
        torch.manual_seed(0)
        return janus.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), generation_mode="image", guidance_scale=3.0,
            do_sample=True,
        )

    seconds, _ = harness.time_interleaved(
        {"DualToken (2 heads x D codes)": lambda: generate(model, prompts), "Janus (1 code)": janus_generate},
        repeats=repeats,
    )
    positions = model.config.num_image_tokens
    janus_seconds = seconds["Janus (1 code)"]
    return harness.markdown_table(
        ["model", "per position", "vs Janus"],
        [[name, harness.ms(value / positions), harness.ratio(value, janus_seconds)] for name, value in seconds.items()],
    )


def memory(model, prompt, images: int) -> str:
    harness.reset_peak_rss()
    before = harness.rss_mib()
    generate(model, prompt)
    peak = harness.peak_rss_mib()
    after = []
    for _ in range(images):
        generate(model, prompt)
        after.append(harness.rss_mib())
    rows = [
        ["model resident before generating", f"{before:.0f} MiB"],
        ["peak during one generation (batch 1)", f"{peak:.0f} MiB"],
        [f"after generation 1 / {images // 2} / {images} of {images} in a row",
         f"{after[0]:.0f} / {after[images // 2 - 1]:.0f} / {after[-1]:.0f} MiB"],
        [f"growth from generation 2 to {images}", f"{after[-1] - after[1]:+.1f} MiB"],
    ]
    return harness.markdown_table(["generation memory", "RSS"], rows)


def main(args) -> str:
    harness.setup(args)
    if args.tiny:
        model = unified_model(grid_side=args.grid_side)
        llm = model.config.text_config.to_dict()
        llm = {key: llm[key] for key in MID_LLM if key in llm}
    else:
        model = unified_model(llm=MID_LLM, grid_side=args.grid_side, head=PAPER_HEAD, codes=PAPER_CODES)
        llm = MID_LLM
    janus = janus_model(llm, args.grid_side)
    prompts = generation_prompts(model, args.batch)
    peak = harness.matmul_peak_gflops()
    head = model.pixel_head
    shape = (f"LLM {llm['num_hidden_layers']} x {llm['hidden_size']}, heads {len(head.layers)} layers x "
             f"{head.input_projection.out_features}, D = {head.depth}, K = {head.classifiers[0].out_features}, "
             f"{args.grid_side}x{args.grid_side} grid")
    sections = [f"### Image generation, {shape}", f"Measured fp32 matmul peak (2048^3): {peak:.0f} GFLOP/s."]
    with torch.inference_mode():
        for batch in sorted({1, args.batch}):
            table, summary = breakdown(model, prompts[:batch], peak)
            extra = (summary["position"] - summary["llm"]) / summary["llm"]
            sections += [
                f"Per position, {batch} prompt(s) with guidance ({2 * batch} rows); prefill "
                f"{harness.ms(summary['prefill'])} once:",
                table,
                f"Heads + guidance + sampling cost {100 * extra:.0f} % on top of the LLM step and projector.",
            ]
        sections += [
            f"LLM decoding steps alone ({2 * args.batch} rows, {args.llm_steps} steps after an 8-token prompt):",
            llm_steps(model.language_model, 2 * args.batch, args.llm_steps, args.repeats, args.compile),
            f"Against transformers' Janus (same LLM size, grid and {args.batch} prompts with guidance):",
            janus_comparison(model, janus, prompts, args.repeats),
            memory(model, prompts[:1], args.images),
        ]
    return "\n\n".join(sections)


if __name__ == "__main__":
    print(main(parse_args()))
