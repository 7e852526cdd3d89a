"""What every benchmark shares: threads, machine facts, interleaved timing, FLOP counts, memory and markdown.

Variants are timed interleaved in one process (A, B, A, B, ...) and reported as medians, so load from other jobs on
the machine hits every variant alike and ratios are taken within one run.
"""

import argparse
import datetime
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


RESULTS_FILE = Path(__file__).with_name("RESULTS.md")


def add_common_arguments(parser: argparse.ArgumentParser, repeats: int = 3) -> argparse.ArgumentParser:
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see RESULTS.md)")
    parser.add_argument("--repeats", type=int, default=repeats, help="interleaved timed repeats per variant")
    return parser


def setup(args) -> None:
    """Fix the thread count and the seed before anything is built."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------------------ machine


def cpu_model() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        match = None
    return match.group(1).strip() if match else platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    try:
        match = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        return set()
    return set(match.group(1).split()) if match else set()


def bf16_matmul_supported() -> bool:
    """bf16 is benchmarked on a CPU only where it is fast: AVX512 dispatch plus AVX512-BF16 or AMX (with AVX2 alone a
    bf16 matmul is ~200x slower than fp32)."""
    capability = torch.backends.cpu.get_cpu_capability()
    return capability.startswith("AVX512") and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def library_versions() -> str:
    import diffusers
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}"


def machine_summary() -> str:
    """Markdown bullets: when, where, which libraries, how busy the machine was."""
    flags = sorted({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} & cpu_flags())
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return "\n".join(
        [
            f"- date: {datetime.date.today().isoformat()}",
            f"- CPU: {cpu_model()}, {os.cpu_count()} cores; torch CPU capability "
            f"`{torch.backends.cpu.get_cpu_capability()}`; flags: {', '.join(flags) or 'none of note'}",
            f"- bf16 matmul benchmarked: {'allowed (AVX512 with BF16/AMX)' if bf16_matmul_supported() else 'no'}",
            f"- {library_versions()}; Python {platform.python_version()}",
            f"- torch threads: {torch.get_num_threads()}; load average (1, 5, 15 min) at the start: {load}",
        ]
    )


# ------------------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device | str = "cpu") -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(
    variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> tuple[dict[str, float], dict[str, Any]]:
    """Run every variant `warmup` times, then `repeats` rounds of all variants in turn.

    Returns the median seconds per variant and each variant's last result (for checking that they agree).
    """
    results = {}
    for name, run in variants.items():
        for _ in range(warmup):
            results[name] = run()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            synchronize(device)
            start = time.perf_counter()
            results[name] = run()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds) for name, seconds in times.items()}, results


def count_flops(run: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of one call of `run`: the total and the per-module totals (keys are module paths)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    per_module = {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}
    return counter.get_total_flops(), per_module


def matmul_peak_gflops(size: int = 2048, dtype: torch.dtype = torch.float32, device="cpu", repeats: int = 5) -> float:
    """The machine's achievable matmul rate: median GFLOP/s of a square `size` matmul at the current thread count."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    seconds, _ = time_interleaved({"matmul": lambda: a @ b}, repeats=repeats, warmup=2, device=device)
    return 2 * size**3 / seconds["matmul"] / 1e9


def memory_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """The machine's achievable memory bandwidth: median GB/s (bytes read + written) of a large tensor copy."""
    source = torch.empty(megabytes * 2**20 // 4)
    target = torch.empty_like(source)
    seconds, _ = time_interleaved({"copy": lambda: target.copy_(source)}, repeats=repeats, warmup=1)
    return 2 * source.numel() * 4 / seconds["copy"] / 1e9


# ------------------------------------------------------------------------------------------------------- memory


def _status_kib(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    return int(match.group(1)) if match else 0


def rss_mib() -> float:
    """Resident memory of this process now."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib() -> float:
    """Peak resident memory since the start, or since the last `reset_peak_rss()`."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM to the current RSS)."""
    Path("/proc/self/clear_refs").write_text("5")


# ----------------------------------------------------------------------------------------------------- markdown


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f} ms"


def ratio(value: float, baseline: float) -> str:
    return f"{value / baseline:.2f}x"


def replace_section(path: Path, name: str, text: str) -> None:
    """Write `text` between the `<!-- name: begin -->` and `<!-- name: end -->` markers of `path` (appended with
    its markers when they are missing); everything outside the markers is kept."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    content = path.read_text() if path.exists() else ""
    block = f"{begin}\n{text.strip()}\n{end}"
    if begin in content and end in content:
        head, rest = content.split(begin, 1)
        content = head + block + rest.split(end, 1)[1]
    else:
        content = content.rstrip() + "\n\n" + block + "\n"
    path.write_text(content)
