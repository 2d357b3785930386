"""Putting the model's own replies into the gate warm-up's contexts (one DAgger round)."""

from __future__ import annotations

import json

import pytest

from moe_empathy.eval.dialogues import synthesise_split
from moe_empathy.eval.own_replies import OwnReplies
from moe_empathy.eval.rollout import rollout
from moe_empathy.eval.systems import build_systems


def test_records_hold_the_replies_of_a_free_rollout(gated, tokenizer):
    """Users and labels are the script's, every reply is the gated model's own in a free rollout
    of the kept turns, and each dialogue is cut to a whole multiple of turns."""
    records = synthesise_split("test", 3, 5)  # 5 turns each: cut to 4
    own = OwnReplies(gated, tokenizer, max_new_tokens=6, batch_size=2, turn_multiple=4)
    out = own(records, "test")
    kept = [{**r, "turns": r["turns"][:8]} for r in records]
    played, _ = rollout(build_systems(["gated"], gated, tokenizer), kept, tokenizer, batch_size=3, max_new_tokens=6)
    for before, after, free in zip(kept, out, played["gated"]):
        assert len(after["turns"]) == 8
        assert [t["content"] for t in after["turns"][0::2]] == [t["content"] for t in before["turns"][0::2]]
        assert [t["level"] for t in after["turns"][1::2]] == [t["level"] for t in before["turns"][1::2]]
        assert [t["content"] for t in after["turns"][1::2]] == free.replies
    assert [p["split"] for p in own.played] == ["test"] * 3 and all(len(p["gate"]) == 4 for p in own.played)


def test_kept_turns_and_written_file(gated, tokenizer, tmp_path):
    own = OwnReplies(gated, tokenizer, turn_multiple=4)
    assert [own.kept_turns(n) for n in (2, 4, 7, 8, 31)] == [2, 4, 4, 8, 28]
    own(synthesise_split("test", 2, 2), "validation")
    own.write(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "own_replies.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(len(line["replies"]) == 2 for line in lines)
    with pytest.raises(ValueError, match="--turn-multiple"):
        OwnReplies(gated, tokenizer, turn_multiple=0)
