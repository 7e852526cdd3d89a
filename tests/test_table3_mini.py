import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "experiments" / "table3_mini.py"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_file(), reason="Fashion-MNIST not installed (make fashion-mnist)")
def test_quick_mode_writes_a_table_with_teacher_and_three_tokenizers(tmp_path):
    output = tmp_path / "table3.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(SCRIPT), "--quick", "--output", str(output)]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr

    rows = {cells[0]: cells for cells in _table_rows(output.read_text())}
    number = re.compile(r"^\d+(\.\d+)?$")
    assert set(rows) == {"Initial state", "(b)", "(c)", "(d)"}
    assert number.match(rows["Initial state"][2])
    for name in ("(b)", "(c)", "(d)"):
        assert all(number.match(cell) for cell in rows[name][2:]), rows[name]
    results = json.loads(output.with_suffix(".json").read_text())
    assert results["mode"] == "quick" and set(results["rows"]) == {"(b)", "(c)", "(d)"}


def _table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the markdown table (header and separator dropped), as stripped cells."""
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]
