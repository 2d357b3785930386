"""Shared helpers of the training tests: a small synthetic corpus and tiny-config runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from moe_empathy.train.config import TrainConfig, config_from_dict
from moe_empathy.train.synth import SynthConfig, generate, write_corpus

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """240 template dialogues of 2-3 turns, written like `moe-empathy synth`."""
    folder = tmp_path_factory.mktemp("corpus") / "synth"
    write_corpus(generate(SynthConfig(dialogues=240, min_turns=2, max_turns=3, seed=0)), folder, {"backend": "template"})
    return folder


def tiny_config(corpus: Path, **sections) -> TrainConfig:
    """The shipped tiny config on ``corpus``, with section overrides such as
    ``training={"max_steps": 4}``, ``method="single_lora"``."""
    values = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    values["data"]["path"] = str(corpus)
    values["data"].pop("synthesize")
    values["training"]["progress_bar"] = False
    for key, value in sections.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return config_from_dict(values)
