"""The GPU table of issue 11 (run by benchmarks/gpu.sh on a lent H200): full-size `dualtoken-3b`, bf16, random weights.

- tokenizer encode throughput (images/s, batch 64) against the SigLIP blocks a tokens-only encode needs and the whole
  SigLIP tower; decode throughput against diffusers' `VQModel.decode` with the same channels and blocks;
- image generation, seconds per 384 px image (27 x 27 positions, guidance 3, batch 1 and 16), against plain decoding
  of 729 tokens by the same Qwen2.5-3B-sized LLM on as many rows (guidance doubles the rows);
- peak GPU memory of every step.

`--dry-run` runs every step at tiny size (tiny presets, fp32, on the CPU unless a GPU is there) to test the script.

    python benchmarks/gpu_bench.py [--dry-run]
"""

import argparse
import time

import torch
from transformers import AutoModelForCausalLM

import harness
from models import siglip_tokens_floor, vqmodel_floor

from dualtoken_hf import DualTokenConfig, DualTokenForConditionalGeneration


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, fp32 (tests the script anywhere)")
    parser.add_argument("--tokenizer-batch", type=int, default=64)
    parser.add_argument("--generation-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the tokenizer rows")
    parser.add_argument("--steady-after", type=int, default=32, help="positions before the steady-state timing")
    return parser.parse_args(argv)


class Step:
    """Times one call on the device and records its peak memory (GPU: allocated by torch; CPU: peak RSS)."""

    def __init__(self, device: torch.device):
        self.device = device

    def run(self, fn, repeats: int = 1):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        else:
            harness.reset_peak_rss()
        seconds, results = harness.time_interleaved({"step": fn}, repeats=repeats, warmup=1 if repeats > 1 else 0,
                                                    device=self.device)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            peak = harness.peak_rss_mib() / 1024
        return seconds["step"], results["step"], peak


def build(args, device: torch.device, dtype: torch.dtype) -> DualTokenForConditionalGeneration:
    config = DualTokenConfig.from_preset("tiny" if args.dry_run else "dualtoken-3b")
    torch.manual_seed(0)
    with torch.device(device):
        model = DualTokenForConditionalGeneration(config)
    return model.to(dtype).eval()


def tokenizer_rows(args, model, step: Step, dtype) -> list[list]:
    tokenizer = model.vision_tokenizer
    device = step.device
    batch = 2 if args.dry_run else args.tokenizer_batch
    size = tokenizer.config.image_size
    images = torch.randn(batch, 3, size, size, device=device, dtype=dtype).clamp(-1, 1)
    floor, vqmodel = siglip_tokens_floor(tokenizer), vqmodel_floor(tokenizer)
    rows = []
    encode_s, encoded, encode_mem = step.run(lambda: tokenizer.encode(images), args.repeats)
    for name, fn in (("SigLIP blocks up to the semantic layer", lambda: floor(pixel_values=images)),
                     ("whole SigLIP tower + head", lambda: tokenizer.siglip(pixel_values=images))):
        seconds, _, memory = step.run(fn, args.repeats)
        rows.append([f"encode, batch {batch}", f"{batch / encode_s:.1f} images/s", name,
                     f"{batch / seconds:.1f} images/s", harness.ratio(encode_s, seconds),
                     f"{encode_mem:.1f} / {memory:.1f} GiB"])
    latent_side = tokenizer.pixel_decoder.latent_size
    latents = torch.randn(batch, tokenizer.pixel_decoder.config.hidden_size, latent_side, latent_side,
                          device=device, dtype=dtype)
    decode_s, _, decode_mem = step.run(lambda: tokenizer.decode(encoded.pixel_codes), args.repeats)
    seconds, _, memory = step.run(lambda: vqmodel.decode(latents, force_not_quantize=True).sample, args.repeats)
    rows.append([f"decode, batch {batch}", f"{batch / decode_s:.1f} images/s", "VQModel.decode",
                 f"{batch / seconds:.1f} images/s", harness.ratio(decode_s, seconds),
                 f"{decode_mem:.1f} / {memory:.1f} GiB"])
    return rows


def generation_rows(args, model, step: Step) -> list[list]:
    device = step.device
    config = model.config
    positions = config.num_image_tokens
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config.text_config)
    plain.model, plain.lm_head = model.language_model, model.lm_head  # the same LLM, without DualToken around it
    batches = [1, 2] if args.dry_run else args.generation_batches
    rows = []
    for batch in batches:
        prompts = torch.randint(0, 256, (batch, 8), device=device)  # text ids every vocabulary has
        prompts[:, -1] = config.boi_token_id
        marks = {}
        steady_after = min(args.steady_after, positions - 1)

        def mark(done, total):
            if done in (steady_after, total):
                harness.synchronize(device)
                marks[done] = time.perf_counter()

        def generate():
            generator = torch.Generator(device).manual_seed(0)
            return model.generate(input_ids=prompts, generation_mode="image", guidance_scale=3.0,
                                  generator=generator, callback=mark, progress_bar=False)

        seconds, _, memory = step.run(generate)
        steady = (marks[positions] - marks[steady_after]) / (positions - steady_after)
        rows_plain = torch.cat((prompts, prompts))  # guidance doubles the rows; plain decoding gets as many
        plain_s, _, plain_mem = step.run(lambda: plain.generate(
            input_ids=rows_plain, attention_mask=torch.ones_like(rows_plain), max_new_tokens=positions,
            min_new_tokens=positions, do_sample=True, top_k=0, pad_token_id=config.pad_token_id))
        rows.append([f"generate one {config.vision_config.image_size} px image, batch {batch}, guidance 3",
                     f"{seconds / batch:.2f} s/image ({1000 * steady:.1f} ms/position steady)",
                     f"plain LLM decoding of {positions} tokens, {2 * batch} rows",
                     f"{plain_s / batch:.2f} s/image", harness.ratio(seconds, plain_s),
                     f"{memory:.1f} / {plain_mem:.1f} GiB"])
    return rows


def main(args) -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on the GPU; never on a CPU (the dry run checks the script, not the speed)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu":
        torch.set_num_threads(1)  # a shared CPU: one thread keeps OpenMP from spin-waiting on busy cores
    torch.manual_seed(0)
    name = torch.cuda.get_device_name() if device.type == "cuda" else harness.cpu_model()
    step = Step(device)
    model = build(args, device, dtype)
    with torch.inference_mode():
        rows = tokenizer_rows(args, model, step, dtype) + generation_rows(args, model, step)
    preset = "tiny (dry run)" if args.dry_run else "dualtoken-3b"
    header = ["workload", "DualToken", "baseline", "baseline speed", "time vs baseline", "peak memory (ours / base)"]
    return "\n\n".join([
        f"### GPU table: {preset}, {str(dtype).removeprefix('torch.')}, random weights",
        f"- device: {name}; {harness.library_versions()}",
        harness.markdown_table(header, rows),
    ])


if __name__ == "__main__":
    print(main(parse_args()))
