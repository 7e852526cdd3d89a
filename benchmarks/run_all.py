"""`make bench`: every CPU benchmark in a fresh process (so memory figures start clean), one markdown report.

The report goes to stdout and, with `--write`, between the `make bench` markers of benchmarks/RESULTS.md.

    python benchmarks/run_all.py [--threads 1] [--write]
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import harness


HERE = Path(__file__).parent
# script, extra arguments; ordered so the quick ones report first
BENCHMARKS = [
    ("startup.py", ["--repeats", "1"]),
    ("prefill.py", []),
    ("depth_cache.py", []),
    ("generation.py", []),
    ("tokenizer.py", []),
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: every core)")
    parser.add_argument("--write", action="store_true", help="write the report into benchmarks/RESULTS.md")
    parser.add_argument("--only", nargs="+", help="run only these scripts (e.g. tokenizer.py)")
    return parser.parse_args(argv)


def main(args) -> str:
    harness.setup(args)
    sections = ["## CPU table (`make bench`)", harness.machine_summary()]
    started = time.perf_counter()
    for script, extra in BENCHMARKS:
        if args.only and script not in args.only:
            continue
        start = time.perf_counter()
        command = [sys.executable, str(HERE / script), "--threads", str(args.threads), *extra]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
        seconds = time.perf_counter() - start
        print(f"{script}: {seconds:.0f} s", file=sys.stderr, flush=True)
        sections.append(f"{output}\n\n_{script}: {seconds:.0f} s_")
    sections.append(f"Total: {time.perf_counter() - started:.0f} s.")
    report = "\n\n".join(sections)
    if args.write:
        harness.replace_section(harness.RESULTS_FILE, "make bench", report)
    return report


if __name__ == "__main__":
    print(main(parse_args()))
