"""The README's Python snippets run as written, in order, on a fresh checkout (offline).

A snippet that needs something this machine cannot have (the Hub, full-size weights) is marked in README.md by an
HTML comment on the line before its fence: `<!-- readme-test: skip: <reason> -->`. Every other ```python block
runs, in one interpreter, in README order, in an empty folder that holds only the files the README tells the user
to bring (an official `epoch_N.pt`, synthesised here from the official tiny reference run).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import OfficialReference


REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?P<marker><!-- readme-test: skip: [^>]*-->\n)?```python\n(?P<code>.*?)```", re.DOTALL)


def readme_snippets() -> list[tuple[str, bool]]:
    """Every ```python block of README.md as `(code, runs)`."""
    text = (REPO / "README.md").read_text()
    return [(match["code"], match["marker"] is None) for match in FENCE.finditer(text)]


def test_readme_has_runnable_snippets():
    snippets = readme_snippets()
    assert sum(runs for _, runs in snippets) >= 3, "the README lost its runnable examples"


@pytest.mark.slow
def test_readme_snippets_run_in_order(tmp_path):
    official = OfficialReference("v2")
    torch.save(
        {
            "state_dict": official.state,
            "rqvaesiglip_config": json.dumps(official.official_config),
            "siglip_vision_config": json.dumps(official.siglip_vision_config),
        },
        tmp_path / "epoch_N.pt",
    )
    blocks = [code for code, runs in readme_snippets() if runs]
    script = "\n".join(f"print('--- README snippet {index}', flush=True)\n{code}" for index, code in enumerate(blocks))
    (tmp_path / "readme_snippets.py").write_text(script)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "readme_snippets.py"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"--- README snippet {len(blocks) - 1}" in result.stdout
