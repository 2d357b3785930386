"""Metrics on hand-built inputs whose answers are known."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from moe_empathy.eval.metrics import (
    EvalTable,
    build_table,
    compute_metrics,
    copy_flags,
    distinct_n,
    gate_metrics,
    score_rollouts,
    split_sentences,
)
from moe_empathy.eval.rollout import DialogueRollout
from moe_empathy.eval.scoring import EmpathyScore
from moe_empathy.eval.stats import gate_entropy
from moe_empathy.train.taxonomy import LEVEL_BAND, LEVEL_TARGET

NAMES = ["low", "medium", "high"]
TOLERANCE = 1.0


def test_metrics_import_numpy_and_not_torch():
    code = "import sys, moe_empathy.eval.metrics; print('torch' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]


def test_targets_are_the_middle_of_each_level_band():
    assert LEVEL_BAND["low"] == pytest.approx((1.0, 1 + 4 / 6))
    assert LEVEL_BAND["high"] == pytest.approx((1 + 16 / 6, 5.0))
    assert [LEVEL_TARGET[n] for n in NAMES] == pytest.approx([4 / 3, 8 / 3, 13 / 3])


def _table(levels: list[list[str]], scores: dict[str, list[list[float]]], task_levels: list[str], gates=None) -> EvalTable:
    rollouts = {
        name: [
            DialogueRollout(name, f"d{d}", f"task_{task_levels[d]}", task_levels[d], users=["u"] * len(row), replies=["r"] * len(row), levels=levels[d], gate=(gates or {}).get(name, [None] * len(levels))[d])
            for d, row in enumerate(rows)
        ]
        for name, rows in scores.items()
    }
    return build_table(rollouts, scores, NAMES)


def test_gap_reduction_and_high_task_factor():
    levels = [["high", "high"], ["low", "low"]]
    perfect = [[LEVEL_TARGET["high"]] * 2, [LEVEL_TARGET["low"]] * 2]
    table = _table(levels, {"base": [[1.0, 1.0], [1.0, 1.0]], "ours": perfect, "half": [[2.0, 2.0], [1.0, 1.0]]}, ["high", "low"])
    metrics = compute_metrics(table, TOLERANCE, samples=50)
    base_gap = ((13 / 3 - 1) * 2 + (4 / 3 - 1) * 2) / 4
    assert metrics["base"]["overall"]["gap"]["value"] == pytest.approx(base_gap)
    assert metrics["ours"]["overall"]["gap"]["value"] == pytest.approx(0.0)
    assert metrics["ours"]["overall"]["gap_reduction_vs_base"]["value"] == pytest.approx(1.0)
    assert metrics["base"]["overall"]["gap_reduction_vs_base"]["value"] == pytest.approx(0.0)
    assert metrics["ours"]["overall"]["score_factor_high_tasks_vs_base"]["value"] == pytest.approx(13 / 3)
    assert metrics["half"]["overall"]["score_factor_high_tasks_vs_base"]["value"] == pytest.approx(2.0)
    assert set(metrics["ours"]["by_task"]) == {"task_high", "task_low"}
    assert metrics["ours"]["by_task"]["task_high"]["gap"]["value"] == pytest.approx(0.0)


def test_over_empathy_counts_only_low_task_turns_above_their_target():
    levels = [["low", "high"], ["high", "high"]]
    table = _table(levels, {"base": [[3.0, 5.0], [5.0, 5.0]]}, ["low", "high"])
    overall = compute_metrics(table, TOLERANCE, samples=20)["base"]["overall"]
    # Low task: turn 1 is 3.0 - 4/3 above its target; turn 2 expects high and exceeds it by 2/3.
    assert overall["over_empathy_low_tasks"]["value"] == pytest.approx(((3 - 4 / 3) + (5 - 13 / 3)) / 2)
    assert overall["over_empathy_rate_low_tasks"]["value"] == pytest.approx(0.5)  # only 5/3 > 1.0 tolerance


def test_buckets_are_inclusive_as_named():
    levels = [["low"] * 31]
    scores = [[LEVEL_TARGET["low"]] * 29 + [3.0, 5.0]]
    table = _table(levels, {"base": scores}, ["low"])
    buckets = compute_metrics(table, TOLERANCE, samples=10)["base"]["overall"]["by_bucket"]
    assert list(buckets) == ["1-5", "6-15", "16-30", "30+"]
    assert buckets["1-5"]["gap"]["value"] == pytest.approx(0.0)
    assert buckets["16-30"]["gap"]["value"] == pytest.approx((3 - 4 / 3) / 15)
    assert buckets["30+"]["gap"]["value"] == pytest.approx(((3 - 4 / 3) + (5 - 4 / 3)) / 2)


def test_gate_metrics_accuracy_switches_entropy_confusion():
    one = lambda i: [float(j == i) for j in range(3)]  # noqa: E731
    levels = [["low", "low", "high"], ["medium", "medium", "medium"]]
    gates = {"gated": [[one(0), one(1), one(2)], [one(1), one(1), one(1)]]}
    table = _table(levels, {"gated": [[1.0] * 3, [1.0] * 3]}, ["low", "medium"], gates)
    gate = gate_metrics(table, "gated", np.arange(2), samples=20, seed=0)
    assert gate["accuracy"]["value"] == pytest.approx(5 / 6)
    assert gate["switch_rate"]["value"] == pytest.approx(2 / 4)
    assert gate["entropy"]["value"] == pytest.approx(0.0)
    assert gate["accuracy_at_shifts"]["value"] == pytest.approx(1.0)
    assert gate["shift_follow_rate"]["value"] == pytest.approx(1.0) and gate["shift_latency"]["value"] == pytest.approx(0.0)
    assert gate["confusion"]["rows_expected_columns_chosen"] == [[1, 1, 0], [0, 3, 0], [0, 0, 1]]
    assert gate_entropy(np.full((1, 1, 3), 1 / 3))[0, 0] == pytest.approx(1.0)


def test_empty_replies_score_one_without_reaching_the_scorer():
    class Recorder:
        def __init__(self):
            self.seen = []

        def score(self, responses, contexts):
            self.seen += list(zip(responses, contexts))
            return [EmpathyScore(4.0) for _ in responses]

    played = [DialogueRollout("s", "d", "t", "low", users=["hi", "and?"], replies=["", "hello"], levels=["low", "low"])]
    scorer = Recorder()
    assert score_rollouts(played, scorer) == [[1.0, 4.0]]
    (response, context), = scorer.seen
    assert response == "hello" and [m["content"] for m in context] == ["hi", "", "and?"]


def test_a_copied_reply_counts_and_a_paraphrase_does_not():
    first = "Try restarting the router. Then check the cable."
    replies = [
        first,
        "Try restarting the router.  Then check the cable.",  # the same, other spacing: a copy
        "You could restart the router. After that, look at the cable.",  # paraphrase
        "Try restarting the router. I hope that helps. Good luck!",  # 1 of 3 sentences copied
        "Then check the cable. Do you see a light?",  # 1 of 2: half counts
        "",  # empty: never a copy
    ]
    assert split_sentences(first) == ["Try restarting the router.", "Then check the cable."]
    assert copy_flags(replies).tolist() == [0, 1, 0, 0, 1, 0]
    assert copy_flags(["ok", "OK"]).tolist() == [0, 0]  # case is kept


def test_distinct_2_counts_unique_bigrams_within_replies():
    assert distinct_n(["a b a b", "a b"], 2) == (2, 4)  # (a b) x3, (b a) x1; none across replies
    assert distinct_n(["one", ""], 2) == (0, 0)
    assert distinct_n(["The cat sat", "the cat ran"], 2) == (3, 4)  # lower-cased


def test_repetition_metrics_per_system_and_in_the_report():
    from moe_empathy.eval.report import render_report

    levels = [["low", "low", "low"], ["low", "low", "low"]]
    scores = {"loops": [[1.0] * 3, [1.0] * 3], "varied": [[1.0] * 3, [1.0] * 3]}
    replies = {
        "loops": [["Fix it now.", "Fix it now.", "Fix it now."], ["Go on.", "Go on.", "Go on."]],
        "varied": [["Fix it now.", "Check the plug first.", "Then restart it."], ["Go on.", "Tell me more.", "What happened next?"]],
    }
    rollouts = {
        name: [DialogueRollout(name, f"d{d}", "t", "low", users=["u"] * 3, replies=rows[d], levels=levels[d]) for d in range(2)]
        for name, rows in replies.items()
    }
    metrics = compute_metrics(build_table(rollouts, scores, NAMES), TOLERANCE, samples=50)
    loops, varied = metrics["loops"]["repetition"], metrics["varied"]["repetition"]
    assert loops["copy_rate"]["value"] == pytest.approx(4 / 6) and varied["copy_rate"]["value"] == 0.0
    assert loops["distinct_2"]["value"] == pytest.approx(3 / 9)  # "fix it", "it now.", "go on." over 9 bigrams
    assert varied["distinct_2"]["value"] == pytest.approx(1.0)
    assert loops["reply_words"]["value"] == pytest.approx(2.5)
    assert varied["reply_words"]["value"] == pytest.approx((3 + 4 + 3 + 2 + 3 + 3) / 6)
    settings = {"model": "m", "systems": {}, "split": "test", "data": "d", "dialogues": 2, "turns": 3, "max_new_tokens": 8,
                "mode": "cached", "batch_size": 2, "scorers": ["s"], "bootstrap_samples": 50, "tolerance": 1.0}
    report = render_report({"settings": settings, "targets": [], "scorers": {"s": metrics}})
    assert "| loops | 66.7% [" in report and "| varied | 0.0% [0.0, 0.0] | 1.000 | 3.0 [" in report
