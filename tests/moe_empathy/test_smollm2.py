"""The embedded default base (SmolLM2-135M-Instruct): slow, run with `pytest -m slow`."""

import pytest
import torch

from moe_empathy import MoeEmpathyForCausalLM, encode_chat, load_default_base

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_default_base()


def test_default_base_is_smollm2(smollm2):
    base, tokenizer = smollm2
    assert base.config.num_hidden_layers == 30 and base.config.hidden_size == 576
    assert 130e6 < sum(p.numel() for p in base.parameters()) < 140e6
    assert tokenizer.chat_template


def test_wrapped_smollm2_equals_base_and_cache_equals_no_cache(smollm2, dialogue):
    base, tokenizer = smollm2
    enc = encode_chat(tokenizer, [dialogue, dialogue[:3]], add_generation_prompt=True)
    with torch.no_grad():
        before = base(enc["input_ids"], attention_mask=enc["attention_mask"]).logits
    model = MoeEmpathyForCausalLM.from_base(base, tokenizer=tokenizer).eval()
    with torch.no_grad():
        after = model(**{k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")}).logits
    assert torch.equal(after, before)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for linear in model.experts.values():
            linear.lora_B.copy_(torch.randn(linear.lora_B.shape, generator=generator) * 0.02)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    cached = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
    fresh = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False, **kwargs)
    assert torch.equal(cached, fresh)
