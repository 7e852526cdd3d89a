#!/usr/bin/env bash
# Issue 11's GPU table: full-size dualtoken-3b (bf16, random weights) on a lent H200, in well under 6 minutes.
#
#   benchmarks/gpu.sh --fetch-wheels   here, with PyPI: download the wheels the device image lacks into .whl/
#                                      (git-ignored; the device tool carries it: carry [".whl"])
#   benchmarks/gpu.sh                  on the device: install .whl/ into /tmp/site, print the markdown table
#   benchmarks/gpu.sh --dry-run        anywhere: every step at tiny size (tiny presets, fp32, CPU without a GPU)
#
# The device image has torch, accelerate and huggingface_hub but transformers 5.17 and no diffusers; the package
# needs transformers >= 5.24 and diffusers >= 0.42. Paste the table into benchmarks/RESULTS.md with the date.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(transformers==5.24.0 diffusers==0.42.1 regex==2026.11.19)

case "${1:-}" in
  --fetch-wheels)
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "${WHEELS[@]}"
    ;;
  --dry-run)
    PYTHON=${PYTHON:-.venv/bin/python}
    HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" benchmarks/gpu_bench.py --dry-run
    ;;
  "")
    if [ -d .whl ]; then
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      export PYTHONPATH=/tmp/site
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 python3 benchmarks/gpu_bench.py
    ;;
  *)
    echo "usage: benchmarks/gpu.sh [--fetch-wheels | --dry-run]" >&2
    exit 2
    ;;
esac
