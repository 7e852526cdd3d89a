"""The package itself: a lazy `import dualtoken_hf`, the Auto-class registration it defers, and the install extras."""

import importlib
import json
import os
import subprocess
import sys

import pytest


def run_python(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter, where nothing of the package is imported yet."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )


def test_importing_the_package_imports_no_model_libraries():
    result = run_python(
        "import sys, dualtoken_hf\n"
        "loaded = [name for name in ('torch', 'transformers', 'diffusers') if name in sys.modules]\n"
        "assert not loaded, loaded\n"
        "assert set(dualtoken_hf.__all__) <= set(dir(dualtoken_hf))\n"
    )
    assert result.returncode == 0, result.stderr


def test_the_first_public_name_registers_the_auto_classes():
    result = run_python(
        "import dualtoken_hf\n"
        "from transformers import AutoConfig\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "assert 'dualtoken' not in CONFIG_MAPPING\n"
        "assert dualtoken_hf.DualTokenConfig.from_preset('tiny').model_type == 'dualtoken'\n"
        "assert type(AutoConfig.for_model('dualtoken')) is dualtoken_hf.DualTokenConfig\n"
        "assert dualtoken_hf.DualTokenVisionModel._auto_class == 'AutoModel'\n"
    )
    assert result.returncode == 0, result.stderr


def test_register_auto_classes_serves_users_of_the_auto_classes_alone():
    result = run_python(
        "import dualtoken_hf\n"
        "from transformers import AutoConfig\n"
        "dualtoken_hf.register_auto_classes()\n"
        "dualtoken_hf.register_auto_classes()  # a second call does nothing\n"
        "print(type(AutoConfig.for_model('dualtoken_vision')).__name__)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["DualTokenVisionConfig"]


def test_saving_through_the_tooling_writes_the_remote_code(tmp_path):
    """Tooling reaches the classes through their modules, not the package's names: `dualtoken_hf.hub`, which every
    folder writer goes through, registers them, so folders still get an `auto_map` and the remote code."""
    result = run_python(
        "import dualtoken_hf.hub\n"
        "from dualtoken_hf.configuration_dualtoken import DualTokenVisionConfig\n"
        "from dualtoken_hf.modeling_dualtoken_vision import DualTokenVisionModel\n"
        f"DualTokenVisionModel(DualTokenVisionConfig.from_preset('tiny')).save_pretrained({str(tmp_path)!r})\n"
    )
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_dualtoken_vision.DualTokenVisionModel"
    assert (tmp_path / "modeling_dualtoken_vision.py").is_file()


def test_an_unknown_name_is_an_attribute_error():
    import dualtoken_hf

    with pytest.raises(AttributeError, match="has no attribute 'DualTokenTokenizer'"):
        dualtoken_hf.DualTokenTokenizer  # noqa: B018


@pytest.mark.parametrize("extra", ["accelerate", "datasets"])
def test_training_without_the_train_extra_says_how_to_install_it(monkeypatch, extra):
    monkeypatch.setitem(sys.modules, extra, None)  # as where the package is not installed
    monkeypatch.delitem(sys.modules, "dualtoken_hf.training", raising=False)
    with pytest.raises(ImportError, match=rf"needs {extra}, .*pip install 'dualtoken-hf\[train\]'"):
        importlib.import_module("dualtoken_hf.training")
