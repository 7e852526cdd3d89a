"""`examples/experiments/table3_mini.py --quick` on the committed Fashion-MNIST subset: it runs everywhere (no
download), and the verdicts a one-seed, 30-step run can resolve point the way the paper says."""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dualtoken_hf import DualTokenVisionModel


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "experiments" / "table3_mini.py"
SUBSET = REPO / "tests" / "data" / "fashion_mnist_subset.npz"
CHANCE = 0.1


@pytest.fixture(scope="module")
def table3():
    """The experiment script as a module."""
    spec = importlib.util.spec_from_file_location("table3_mini", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick run's JSON results and markdown page."""
    output = tmp_path_factory.mktemp("table3") / "table3.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(SCRIPT), "--quick", "--data", str(SUBSET), "--threads", "1", "--output", str(output)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.with_suffix(".json").read_text()), output.read_text()


def test_committed_subset_is_small_and_holds_every_class():
    assert SUBSET.stat().st_size < 2_000_000
    with np.load(SUBSET) as arrays:
        assert arrays["train_images"].shape == (3000, 28, 28) and arrays["train_images"].dtype == np.uint8
        assert arrays["test_images"].shape == (1000, 28, 28)
        assert set(np.unique(arrays["train_labels"])) == set(range(10))
        assert set(np.unique(arrays["test_labels"])) == set(range(10))


def _changed_parameters(table3, arm, teacher_dir, tower, data) -> set[str]:
    """Names of the state-dict entries that two training steps of `arm` change."""
    torch.manual_seed(0)
    initial = DualTokenVisionModel.from_siglip(
        str(teacher_dir), preset="tiny", pixel_layer=arm.pixel_layer, **table3.TOKENIZER_OVERRIDES
    ).state_dict()
    budget = dataclasses.replace(table3.BUDGETS["quick"], tokenizer_steps=2, tokenizer_batch_size=4)
    scales = table3.teacher_feature_scales(tower, data)
    trained = table3.train_tokenizer(arm, 1.0, teacher_dir, tower, scales, data, budget, seed=0).state_dict()
    return {name for name, value in initial.items() if not torch.equal(value, trained[name])}


def test_each_row_trains_only_what_it_names(table3, tmp_path):
    torch.manual_seed(0)
    tower = table3.build_teacher(vocab_size=32).vision_model.eval()
    tower.save_pretrained(tmp_path)
    data = (torch.randint(0, 256, (8, 28, 28), dtype=torch.uint8), torch.arange(8) % 10)
    arms = {arm.name: arm for arm in table3.ARMS}
    semantic_branch = ("semantic_", "siglip.encoder.layers.5.", "siglip.head.", "siglip.post_layernorm.")

    changed = _changed_parameters(table3, arms["(c)"], tmp_path, tower, data)
    # (c) reconstructs from block 2: blocks 3-6, the pooling head and the whole semantic branch stay as they were.
    allowed = ("siglip.embeddings.", "siglip.encoder.layers.0.", "siglip.encoder.layers.1.", "pixel_")
    assert changed and all(name.startswith(allowed) for name in changed), sorted(changed)
    assert any(name.startswith("siglip.encoder.layers.1.") for name in changed)

    changed = _changed_parameters(table3, arms["(d)"], tmp_path, tower, data)
    for prefix in semantic_branch + ("semantic_quantizer.codebook",):
        assert any(name.startswith(prefix) for name in changed), prefix


def test_semantic_weight_rule_prefers_reconstruction_among_weights_that_keep_accuracy(table3):
    sweep = [
        {"semantic_weight": 0.01, "prompt_top1_tokenizer": 0.70, "psnr": 20.0},
        {"semantic_weight": 0.1, "prompt_top1_tokenizer": 0.79, "psnr": 19.0},
        {"semantic_weight": 1.0, "prompt_top1_tokenizer": 0.80, "psnr": 18.0},
    ]
    assert table3.choose_semantic_weight(sweep, teacher_validation_accuracy=0.80) == 0.1
    assert table3.choose_semantic_weight(sweep, teacher_validation_accuracy=0.90) == 1.0


@pytest.mark.slow
def test_quick_run_labels_every_row_with_what_it_trains(quick_run):
    results, markdown = quick_run
    trains = {name: row["trains"] for name, row in results["rows"].items()}
    assert trains == {
        "(a)": "Recon. (5) + Sem. (5)",
        "(b)": "Recon. (5)",
        "(c)": "Recon. (2)",
        "(d)": "Recon. (2) + Sem. (5)",
    }
    for name, label in trains.items():
        assert f"| {name} | {label} |" in markdown
    # Rows that train no part of the semantic branch have no tokenizer accuracy (the paper's ✗).
    for name in ("(b)", "(c)"):
        assert results["rows"][name]["summary"]["prompt_top1_tokenizer"] is None
    assert "zero-shot in CLIP's sense" in markdown and "held out" in results["metric"]
    assert not set(results["held_out_phrasings"]) & set(results["training_phrasings"])


@pytest.mark.slow
def test_quick_run_resolves_the_semantic_verdicts(quick_run):
    results, _ = quick_run
    teacher = results["teacher"]["test_prompt_top1"]
    mean = {
        name: {metric: value["mean"] for metric, value in row["summary"].items() if value is not None}
        for name, row in results["rows"].items()
    }
    assert teacher > 4 * CHANCE
    # Reconstruction alone on the deep layer costs the tower its text alignment ...
    assert mean["(b)"]["prompt_top1_tower"] < teacher - 0.05
    # ... while the semantic loss keeps (d)'s semantic codes close to the teacher and well above (b).
    assert mean["(d)"]["prompt_top1_tokenizer"] > teacher - 0.1
    assert mean["(d)"]["prompt_top1_tokenizer"] > mean["(b)"]["prompt_top1_tower"]
    assert mean["(a)"]["prompt_top1_tokenizer"] > 4 * CHANCE
    # The semantic loss holds the deep layer: with it, layer 5 stays closer to the teacher's than without it.
    assert mean["(d)"]["layer_cosine"] > mean["(c)"]["layer_cosine"] + 0.03
    assert mean["(a)"]["layer_cosine"] > mean["(b)"]["layer_cosine"] + 0.05
    claims = {claim["id"]: claim["holds"] for claim in results["claims"]}
    assert claims["b_loses_alignment"] is True
    assert set(claims) == {
        "a_reconstructs_worse_than_b",
        "a_loses_accuracy",
        "b_loses_alignment",
        "d_reconstructs_better_than_c",
        "d_keeps_accuracy",
    }


@pytest.mark.slow
def test_quick_run_chooses_the_semantic_weight_on_validation_images(quick_run):
    results, markdown = quick_run
    sweep = results["sweep"]
    assert sweep["split"] == "validation" and sweep["arm"] == "(d)"
    assert sweep["chosen"] in [entry["semantic_weight"] for entry in sweep["runs"]]
    assert "(chosen)" in markdown
