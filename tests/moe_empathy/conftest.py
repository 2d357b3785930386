"""Fixtures: a tiny random Llama that speaks the SmolLM2 tokenizer (the ``tokenizer`` fixture
of tests/conftest.py), and small dialogues."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaForCausalLM

from moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.train.config_sections import TinyBaseSection

DIALOGUE = [
    {"role": "user", "content": "My laptop will not boot after the update."},
    {"role": "assistant", "content": "Hold the power button for ten seconds, then start it again."},
    {"role": "user", "content": "It worked, but I lost my thesis file and I am panicking."},
    {"role": "assistant", "content": "That sounds really stressful. Let us check the autosave folder first."},
    {"role": "user", "content": "Where is that folder?"},
]


def tiny_base(seed: int = 0, vocab_size: int = 49152) -> LlamaForCausalLM:
    """A random 4-layer Llama, hidden 32, with tied embeddings like SmolLM2."""
    config = TinyBaseSection(hidden_size=32, intermediate_size=64).llama_config(vocab_size)  # the training's tiny base, narrower
    config.max_position_embeddings = 512
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.pad_token_id = 2
    model.generation_config.eos_token_id = 2
    return model


def randomise_experts(model: MoeEmpathyForCausalLM, seed: int = 1, std: float = 0.3) -> None:
    """Gives every expert a non-zero, distinct B (fresh experts are zero by design)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for linear in model.experts.values():
            linear.lora_B.copy_(torch.randn(linear.lora_B.shape, generator=generator) * std)
        for param in model.gate.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)


@pytest.fixture
def base():
    return tiny_base()


@pytest.fixture
def model(tokenizer):
    """A gated model with random experts around a fresh tiny base (gate at layer 1)."""
    wrapped = MoeEmpathyForCausalLM.from_base(tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=1).eval()
    randomise_experts(wrapped)
    return wrapped


@pytest.fixture
def dialogue():
    return copy.deepcopy(DIALOGUE)
