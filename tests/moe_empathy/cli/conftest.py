"""Fixtures of the CLI tests: a saved tiny gated model, and a scratch folder standing in for the
system's temporary folder."""

import tempfile
from pathlib import Path

import pytest


@pytest.fixture
def saved_model(model, tokenizer, tmp_path):
    """The tiny gated model and its tokenizer, saved as a model folder."""
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def system_temp(tmp_path, monkeypatch):
    """An empty folder that ``tempfile`` uses for the test's duration."""
    folder = tmp_path / "system-temp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def tiny_bench_config(tmp_path):
    """The shipped tiny training config, its corpus (synthesised on first use) under ``tmp_path``."""
    import yaml

    from moe_empathy import train

    values = yaml.safe_load((Path(train.__file__).parent / "configs" / "tiny.yaml").read_text())
    values["data"]["path"] = str(tmp_path / "corpus")
    values["data"]["synthesize"]["dialogues"] = 60
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(values))
    return path
