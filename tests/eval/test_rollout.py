"""Rollouts on a tiny random model: carrying the KV cache gives the replies and gates of
re-encoding every turn, the recorded gate is the model's own, and batches are well formed."""

from __future__ import annotations

import pytest
import torch

from moe_empathy.eval.chat_tokens import TurnTokens
from moe_empathy.eval.rollout import make_batches, rollout, rollout_batch
from moe_empathy.eval.systems import build_systems


@pytest.fixture
def stopping(gated):
    """Extra stop tokens that the random model emits early, so some replies end before the
    cap and leave padding inside the carried cache."""
    gated.generation_config.eos_token_id = [2, 3383, 565, 616]
    return gated


def test_cached_rollout_equals_reencoding(stopping, tokenizer, scripts):
    systems = build_systems(["base", "external", "gated"], stopping, tokenizer)
    cached, cached_stats = rollout(systems, scripts, tokenizer, batch_size=4, max_new_tokens=6, mode="cached")
    fresh, fresh_stats = rollout(systems, scripts, tokenizer, batch_size=4, max_new_tokens=6, mode="reencode")
    lengths = [n for r in cached["gated"] + cached["base"] for n in r.new_tokens]
    assert min(lengths) < 6 == max(lengths), "the test needs replies that stop early and replies cut at the cap"
    for name in cached:
        for a, b in zip(cached[name], fresh[name]):
            assert a.replies == b.replies and a.new_tokens == b.new_tokens
            if a.gate is not None:
                torch.testing.assert_close(torch.tensor(a.gate), torch.tensor(b.gate), rtol=1e-4, atol=1e-5)
        # Only the new user message is prefilled each turn.
        assert cached_stats[name].prefill_tokens < fresh_stats[name].prefill_tokens
        assert cached_stats[name].turns == fresh_stats[name].turns == sum(len(s["turns"]) // 2 for s in scripts)
        # Decode work counts every row of every step, so finished rows padded to the batch's longest reply too.
        assert cached_stats[name].decode_tokens == fresh_stats[name].decode_tokens >= sum(n for r in cached[name] for n in r.new_tokens)


def test_gated_gate_matches_the_routing_log(gated, tokenizer, scripts):
    (system,) = build_systems(["gated"], gated, tokenizer)
    gated.enable_routing_log()
    played = rollout_batch(system, scripts, tokenizer, max_new_tokens=4)
    records = gated.disable_routing_log()
    turns = len(scripts[0]["turns"]) // 2
    assert len(records) == len(scripts) * turns  # one decision per dialogue and turn, none while decoding
    for record in records:
        logged = [record.weights[n] for n in gated.expert_names]
        assert played[record.dialogue].gate[record.turn] == pytest.approx(logged, abs=1e-6)
    for r in played:
        assert len(r.gate) == turns and all(sum(w) == pytest.approx(1.0, abs=1e-5) for w in r.gate)


def test_external_forces_each_rows_task_level_in_a_mixed_batch(gated, tokenizer, scripts):
    (system,) = build_systems(["external"], gated, tokenizer)
    batches = make_batches(scripts, batch_size=8)
    assert any(len({scripts[i]["task_level"] for i in batch}) > 1 for batch in batches), "the test needs mixed batches"
    assert sorted(i for b in batches for i in b) == list(range(len(scripts)))
    played, _ = rollout([system], scripts, tokenizer, batch_size=8, max_new_tokens=3)
    alone, _ = rollout([system], scripts, tokenizer, batch_size=1, max_new_tokens=3)
    for r, single in zip(played["external"], alone["external"]):
        expected = [float(n == r.task_level) for n in gated.expert_names]
        assert r.gate == [expected] * len(r.levels)
        assert r.replies == single.replies
        assert r.levels == [t["level"] for t in scripts[[s["dialogue_id"] for s in scripts].index(r.dialogue_id)]["turns"][1::2]]


def test_turn_tokens_rebuild_the_template(tokenizer):
    template = TurnTokens(tokenizer)
    reply = "Try safe mode first."
    reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    closing, opening = template.next("Thanks!", tokenizer.eos_token)
    ids = template.first("Be brief.", "Hello there.") + reply_ids + closing + opening
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "Thanks!"},
    ]
    expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(ids) == expected
    # A reply cut at the length cap is closed by the template's own end-of-turn text.
    closing, opening = template.next("Thanks!", "")
    assert tokenizer.decode(closing) == tokenizer.eos_token + "\n"
    assert tokenizer.decode(opening).startswith("<|im_start|>user\nThanks!")


def test_rollout_rejects_a_batch_of_mixed_lengths(gated, tokenizer, scripts):
    (system,) = build_systems(["external"], gated, tokenizer)
    short = dict(scripts[0], turns=scripts[0]["turns"][:2])
    assert len(scripts[1]["turns"]) > 2
    with pytest.raises(ValueError, match="one length"):
        rollout_batch(system, [short, scripts[1]], tokenizer)
    with pytest.raises(ValueError, match="rollout mode"):
        rollout_batch(system, scripts[:1], tokenizer, mode="fast")


def test_every_system_decodes_with_the_checkpoints_repeat_guard(gated, tokenizer, scripts):
    from moe_empathy.generation import RepeatGuardConfig

    RepeatGuardConfig(ngram_size=2).write_to(gated.generation_config)
    guarded = build_systems(["base", "external", "gated"], gated, tokenizer)
    assert {s.repeat_guard for s in guarded} == {RepeatGuardConfig(ngram_size=2)}
    assert all("repeat guard: 2-grams" in s.description for s in guarded)
    plain = build_systems(["base", "gated"], gated, tokenizer, repeat_guard=False)
    assert all(s.repeat_guard is None and "no repeat guard" in s.description for s in plain)
    with_guard, _ = rollout(guarded[2:], scripts[:2], tokenizer, max_new_tokens=8)
    without, _ = rollout(plain[1:], scripts[:2], tokenizer, max_new_tokens=8)
    # The random model repeats itself; the guard (bigrams banned) changes its replies.
    assert [r.replies for r in with_guard["gated"]] != [r.replies for r in without["gated"]]
