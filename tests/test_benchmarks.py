"""The GPU benchmark script is kept runnable without a GPU: its `--dry-run` runs every step at tiny size."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_script_dry_run_prints_every_row_of_its_table():
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        ["bash", "benchmarks/gpu.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    workloads = [row.split("|")[1].strip() for row in rows]
    assert sum(w.startswith("encode") for w in workloads) == 2
    assert sum(w.startswith("decode") for w in workloads) == 1
    assert sum(w.startswith("generate") for w in workloads) == 2
    for row in rows:
        ratio = row.split("|")[5].strip()
        assert ratio.endswith("x") and float(ratio[:-1]) > 0, row
