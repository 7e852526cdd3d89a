"""Start-up: importing the package and loading tiny Hub folders, each in a fresh Python process.

Every row is the median over `--repeats` fresh interpreters (timed inside the child, so interpreter start-up is not
counted), beside the imports it cannot avoid (torch, transformers' Auto classes). The "heavy packages loaded" column
lists which large packages the step pulled in: a user who only imports the package should get none of them.

    python benchmarks/startup.py [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import harness


HEAVY = ("torch", "transformers", "diffusers", "accelerate", "peft", "datasets", "evaluate", "scipy", "sklearn",
         "skimage", "pandas", "tokenizers")

CHILD = """
import json, sys, time
start = time.perf_counter()
{code}
seconds = time.perf_counter() - start
loaded = sorted(name for name in {heavy!r} if name in sys.modules)
print(json.dumps({{"seconds": seconds, "loaded": loaded}}))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_arguments(parser)
    return parser.parse_args(argv)


def run_child(code: str, threads: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(
        [sys.executable, "-c", CHILD.format(code=code, heavy=HEAVY)], env=env, capture_output=True, text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def build_folders(root: str) -> dict[str, str]:
    from dualtoken_hf import DualTokenVisionConfig, DualTokenVisionModel
    from dualtoken_hf.testing import build_tiny_unified

    tokenizer_dir = os.path.join(root, "tiny-tokenizer")
    DualTokenVisionModel(DualTokenVisionConfig.from_preset("tiny")).save_pretrained(tokenizer_dir)
    return {"tokenizer": tokenizer_dir, "unified": build_tiny_unified(os.path.join(root, "tiny-unified"))}


def main(args) -> str:
    harness.setup(args)
    with tempfile.TemporaryDirectory() as root:
        folders = build_folders(root)
        steps = {
            "`import torch` (reference)": "import torch",
            "`from transformers import AutoModel` (reference)": "from transformers import AutoModel",
            "`import dualtoken_hf`": "import dualtoken_hf",
            "`from dualtoken_hf import DualTokenForConditionalGeneration`":
                "from dualtoken_hf import DualTokenForConditionalGeneration",
            "load the tiny tokenizer folder (`AutoModel`, remote code)":
                f"from transformers import AutoModel\nAutoModel.from_pretrained({folders['tokenizer']!r}, "
                "trust_remote_code=True)",
            "load the tiny unified folder (`AutoModel` + `AutoProcessor`, remote code)":
                "from transformers import AutoModel, AutoProcessor\n"
                f"AutoModel.from_pretrained({folders['unified']!r}, trust_remote_code=True)\n"
                f"AutoProcessor.from_pretrained({folders['unified']!r}, trust_remote_code=True)",
        }
        seconds = {name: [] for name in steps}
        loaded = {}
        for _ in range(args.repeats):  # interleaved, like every other benchmark
            for name, code in steps.items():
                result = run_child(code, args.threads)
                seconds[name].append(result["seconds"])
                loaded[name] = result["loaded"]
    rows = [[name, harness.ms(statistics.median(values)), ", ".join(loaded[name]) or "none"]
            for name, values in seconds.items()]
    table = harness.markdown_table(["step (fresh process)", "time", "heavy packages loaded"], rows)
    return f"### Start-up\n\n{table}"


if __name__ == "__main__":
    print(main(parse_args()))
