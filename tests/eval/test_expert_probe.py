"""The forced-expert probe: each system's replies are what generate gives under that control."""

from __future__ import annotations

import torch

from moe_empathy.eval import expert_probe
from moe_empathy.eval.expert_probe import BASE, load_prompts, markdown, probe, replies
from moe_empathy.eval.scoring import EmpathyScore
from moe_empathy.turns import encode_chat


class LengthScorer:
    """Scores a reply by its length, so the test knows every score."""

    def score(self, responses, contexts=None):
        return [EmpathyScore(float(len(r))) for r in responses]


def _generated(model, tokenizer, prompt: dict, control) -> str:
    """The reply ``generate`` gives one prompt alone under ``control``, with the model's repeat guard."""
    from transformers import LogitsProcessorList

    from moe_empathy.generation import RepeatGuardConfig

    enc = encode_chat(tokenizer, [prompt["messages"]], add_generation_prompt=True)
    width = enc["input_ids"].shape[1]
    guard = LogitsProcessorList([RepeatGuardConfig.from_generation_config(model.generation_config).processor([[]], width)])
    with torch.no_grad(), control:
        out = model.generate(input_ids=enc["input_ids"], max_new_tokens=6, do_sample=False, pad_token_id=2, logits_processor=guard)
    return tokenizer.decode(out[0, width:], skip_special_tokens=True).strip()


def test_replies_follow_the_forced_expert_and_the_base(gated, tokenizer):
    prompt = load_prompts()[0]
    high = replies(gated, tokenizer, [prompt], "high", max_new_tokens=6)
    base = replies(gated, tokenizer, [prompt], BASE, max_new_tokens=6)
    assert high == [_generated(gated, tokenizer, prompt, gated.force_gate("high"))]
    assert base == [_generated(gated, tokenizer, prompt, gated.disable_experts())]
    assert high != base


def test_probe_summary_and_order(gated, tokenizer, monkeypatch):
    monkeypatch.setattr(expert_probe, "get_scorer", lambda name: LengthScorer())
    prompts = load_prompts()
    assert len(prompts) == 12 and len({p["task"] for p in prompts}) == 8
    result = probe(gated, tokenizer, prompts[:3], "lexical", max_new_tokens=5)
    rows, summary = result["prompts"], result["summary"]
    for row in rows:
        lengths = [len(row["replies"][name]) for name in ("low", "medium", "high")]
        assert row["ordered"] == (lengths[0] < lengths[1] < lengths[2])
        assert row["scores"]["high"] == len(row["replies"]["high"])
    assert summary["high_minus_low"] == summary["mean_score"]["high"] - summary["mean_score"]["low"]
    assert summary["ordered_prompts"] == sum(r["ordered"] for r in rows)
    text = markdown(result)
    assert text.index("## Replies") < text.index("## Scores")  # the replies come before the scores
