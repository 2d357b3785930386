"""GrowingCache: the same keys, values and generations as DynamicCache."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from moe_empathy import MoeEmpathyForCausalLM
from moe_empathy import cache as cache_module
from moe_empathy.cache import GrowingCache, GrowingLayer, gate_state_of
from moe_empathy.turns import encode_chat

from .conftest import randomise_experts, tiny_base


def _states(generator, batch: int, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (batch, 2, new, 4)  # [batch, kv_heads, new, head_dim]
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def test_growing_layer_returns_what_concatenation_returns(monkeypatch):
    monkeypatch.setattr(cache_module, "MIN_CAPACITY", 4)  # regrow several times
    generator = torch.Generator().manual_seed(0)
    layer, keys, values = GrowingLayer(), None, None
    for new in (3, 1, 1, 9, 1, 2):
        k, v = _states(generator, 2, new)
        keys = k if keys is None else torch.cat([keys, k], -2)
        values = v if values is None else torch.cat([values, v], -2)
        got_k, got_v = layer.update(k, v)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
    assert layer.get_seq_length() == 17

    layer.crop(-5)  # DynamicLayer's own crop, then appending in place after it
    k, v = _states(generator, 2, 2)
    keys = torch.cat([keys[..., :-5, :], k], -2)
    assert torch.equal(layer.update(k, v)[0], keys)

    layer.batch_select_indices(torch.tensor([1]))  # a replaced tensor is adopted
    k, v = _states(generator, 1, 1)
    keys = torch.cat([keys[1:], k], -2)
    assert torch.equal(layer.update(k, v)[0], keys)
    assert keys.shape == (1, 2, 15, 4)


def test_only_full_attention_layers_are_replaced():
    cache = GrowingCache(config=tiny_base().config)
    assert len(cache.layers) == 4 and all(type(layer) is GrowingLayer for layer in cache.layers)


@pytest.mark.parametrize("memory", ["none", "ema", "gru"])
def test_generation_on_a_growing_cache_equals_a_dynamic_cache(tokenizer, dialogue, memory, monkeypatch):
    monkeypatch.setattr(cache_module, "MIN_CAPACITY", 8)  # regrow inside generate
    model = MoeEmpathyForCausalLM.from_base(tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=1, gate_memory=memory).eval()
    randomise_experts(model, std=0.5)
    enc = encode_chat(tokenizer, [dialogue, dialogue[:1], dialogue[:3]], add_generation_prompt=True)
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")}
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None, return_dict_in_generate=True)
    outputs = {}
    for name, cache in (("dynamic", DynamicCache(config=model.config.text_config)), ("growing", GrowingCache(model.config.text_config))):
        out = model.generate(**inputs, cache=cache, **kwargs)
        outputs[name] = (out.sequences, gate_state_of(cache).turn_weights, cache.layers[0].keys)
    assert torch.equal(outputs["dynamic"][0], outputs["growing"][0])
    assert torch.equal(outputs["dynamic"][1], outputs["growing"][1])
    assert torch.equal(outputs["dynamic"][2], outputs["growing"][2])
