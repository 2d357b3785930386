"""Compatibility with the transformers API the model builds on: the cache under its current
name (``cache``) and its deprecated one (``past_key_values``), and the version check."""

from __future__ import annotations

import re
import warnings
from importlib import metadata

import pytest
import torch
from packaging.requirements import Requirement
from transformers import DynamicCache

from moe_empathy import GrowingCache, MoeEmpathyForCausalLM, encode_chat
from moe_empathy import _compat
from moe_empathy.cache import gate_state_of

from .conftest import randomise_experts, tiny_base

GENERATION = dict(max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None, output_scores=True, return_dict_in_generate=True)


@pytest.fixture(scope="module")
def gated(tokenizer):
    model = MoeEmpathyForCausalLM.from_base(tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=1, gate_memory="ema").eval()
    randomise_experts(model, std=0.5)
    return model


def _batches(tokenizer, dialogue):
    """Batch 1, and a left-padded batch of three dialogues of different lengths."""
    return {"batch1": encode_chat(tokenizer, [dialogue], add_generation_prompt=True),
            "padded": encode_chat(tokenizer, [dialogue, dialogue[:1], dialogue[:3]], add_generation_prompt=True)}


def _our_warnings(caught) -> list[str]:
    """Deprecation warnings about the cache's name (the ones our code paths must not cause)."""
    return [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "past_key_values" in str(w.message)]


@pytest.mark.parametrize("batch", ["batch1", "padded"])
@pytest.mark.parametrize("cache_kind", ["implicit", "dynamic", "growing"])
def test_generate_with_cache_equals_without_in_tokens_and_scores(gated, tokenizer, dialogue, batch, cache_kind):
    enc = _batches(tokenizer, dialogue)[batch]
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask")}
    reference = gated.generate(**inputs, use_cache=False, **GENERATION)
    cache = {"implicit": None, "dynamic": DynamicCache(config=gated.config.text_config), "growing": GrowingCache(gated.config.text_config)}[cache_kind]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cached = gated.generate(**inputs, **({"cache": cache} if cache is not None else {}), **GENERATION)
    assert _our_warnings(caught) == []
    assert torch.equal(cached.sequences, reference.sequences)
    for step, (a, b) in enumerate(zip(cached.scores, reference.scores)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"scores of new token {step}")
    if cache is not None:
        assert gate_state_of(cache) is not None  # the gate's state rides on the very cache object given


@pytest.mark.parametrize("batch", ["batch1", "padded"])
def test_cached_scores_equal_a_full_forward_on_the_generated_sequence(gated, tokenizer, dialogue, batch):
    enc = _batches(tokenizer, dialogue)[batch]
    out = gated.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **GENERATION)
    prompt = enc["input_ids"].shape[1]
    mask = torch.cat([enc["attention_mask"], torch.ones_like(out.sequences[:, prompt:])], 1)
    with torch.no_grad():
        logits = gated(input_ids=out.sequences, attention_mask=mask).logits  # [batch, seq, vocab]
    for step, scores in enumerate(out.scores):
        torch.testing.assert_close(logits[:, prompt - 1 + step], scores, rtol=1e-4, atol=1e-4, msg=f"new token {step}")


def test_the_deprecated_cache_name_is_mapped_with_transformers_warning(gated, tokenizer, dialogue):
    enc = _batches(tokenizer, dialogue)["batch1"]
    with torch.no_grad():
        first = gated(input_ids=enc["input_ids"], use_cache=True)
        step = torch.tensor([[42]])
        current = gated(input_ids=step, cache=first.cache, use_cache=True)
        again = gated(input_ids=enc["input_ids"], use_cache=True)
        with pytest.warns(FutureWarning, match="past_key_values"):
            old = gated(input_ids=step, past_key_values=again.cache, use_cache=True)
    assert first.cache is not None and gate_state_of(first.cache) is not None
    torch.testing.assert_close(old.logits, current.logits)
    assert old.cache is again.cache


def test_an_unsupported_version_fails_at_import_naming_the_range(monkeypatch):
    installed = metadata.version

    def fake_version(name):
        return "4.57.0" if name == "transformers" else installed(name)

    declared = next(Requirement(r).specifier for r in metadata.requires("moe_empathy") if Requirement(r).name == "transformers")
    monkeypatch.setattr(_compat.metadata, "version", fake_version)
    with pytest.raises(ImportError, match=re.escape(f"tested with transformers{declared}, but transformers 4.57.0 is installed")):
        _compat.check_dependency_versions()
    monkeypatch.setattr(_compat.metadata, "version", installed)
    _compat.check_dependency_versions()  # the installed stack is inside the declared ranges
