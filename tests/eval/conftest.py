"""Fixtures of the evaluation tests: a tiny random gated model saved as a checkpoint with its
base, short held-out dialogue scripts, and a short ``eval run`` on them (the ``tokenizer``
fixture is in tests/conftest.py)."""

from __future__ import annotations

import json

import pytest

from moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.cli import build_parser
from moe_empathy.eval.cli import run_eval
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


@pytest.fixture(scope="session")
def eval_command(checkpoint, tmp_path_factory):
    """Runs ``moe-empathy eval run`` on the tiny checkpoint with short settings: systems
    ``base`` and ``gated``, four held-out dialogues of two turns in batches of two, replies of
    at most two tokens. Call it with the output folder, extra arguments and an optional
    ``on_batch`` hook; it returns the metrics."""
    data = tmp_path_factory.mktemp("fault-data") / "dialogues.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthesise_split("test", 4, 2)))
    parser = build_parser()

    def run(out, *extra, on_batch=None):
        argv = ["eval", "run", "--model", checkpoint, "--data", data, "--systems", "base,gated", "--dialogues", 4, "--turns", 2]
        argv += ["--batch-size", 2, "--max-new-tokens", 2, "--bootstrap", 20, "--out", out, *extra]
        return run_eval(parser.parse_args([str(a) for a in argv]), on_batch=on_batch)

    return run


@pytest.fixture(scope="session")
def uninterrupted_eval(eval_command, tmp_path_factory):
    """The output folder of an ``eval_command`` run that nobody interrupted."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    eval_command(out)
    return out
