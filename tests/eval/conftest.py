"""Fixtures of the evaluation tests: a tiny random gated model saved as a checkpoint with its
base, and short held-out dialogue scripts (the ``tokenizer`` fixture is in tests/conftest.py)."""

from __future__ import annotations

import pytest

from moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.eval.dialogues import synthesise_split
from tests.moe_empathy.conftest import randomise_experts, tiny_base


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer):
    """A tiny gated model with random experts, saved (full) with its tokenizer, plus its base
    folder; returns the model folder."""
    root = tmp_path_factory.mktemp("eval-model")
    base = tiny_base()
    base.save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = MoeEmpathyForCausalLM.from_base(
        base, tokenizer=tokenizer, lora_rank=4, gate_layer=1, kernel_backend="torch", base_model_name_or_path=str(root / "base")
    ).eval()
    randomise_experts(model, std=0.5)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return root / "model"


@pytest.fixture
def gated(tokenizer):
    """A tiny gated model with random experts (in memory), on the torch expert path (the
    Triton interpreter that the test session switches on for CPU is slow)."""
    model = MoeEmpathyForCausalLM.from_base(tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=1, kernel_backend="torch").eval()
    randomise_experts(model, std=0.5)
    return model


@pytest.fixture(scope="session")
def scripts():
    """Four held-out dialogues of three turns, from four tasks."""
    return synthesise_split("test", 4, 3)
