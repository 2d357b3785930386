"""Acceptance targets: the thresholds are arguments, and each row says met, missed or n/a."""

from __future__ import annotations

import argparse

import pytest

from moe_empathy.eval.acceptance import AcceptanceTargets, RunSize, check_targets
from moe_empathy.cli import build_parser
from moe_empathy.eval.cli import QUICK_RUN, STANDARD_RUN, acceptance_targets

FULL = RunSize(dialogues=40, turns=30, systems=5, max_new_tokens=48)
PAPER = AcceptanceTargets(gap_reduction=0.7266, gap_factor=1.05, minutes=30, full_run=FULL)


def _entry(value):
    return {"value": value}


SYSTEMS = {
    "gated": {"overall": {"gap": _entry(0.5), "gap_reduction_vs_base": _entry(0.8), "by_bucket": {"1-5": {"gap": _entry(0.5)}}}, "gate": {"accuracy": _entry(0.7)}},
    "system_prompt": {"overall": {"gap_reduction_vs_base": _entry(0.9), "by_bucket": {"1-5": {"gap": _entry(1.0)}}}},
    "external": {"overall": {"gap": _entry(0.5)}, "gate": {"accuracy": _entry(0.6)}},
}


def _timing(seconds: float, size: RunSize) -> dict:
    return {"seconds": seconds, "dialogues": size.dialogues, "turns": size.turns, "systems": size.systems, "max_new_tokens": size.max_new_tokens}


def test_targets_report_met_missed_and_unmeasurable():
    small = RunSize(dialogues=4, turns=3, systems=5, max_new_tokens=48)
    rows = {r["target"]: r["met"] for r in check_targets(SYSTEMS, PAPER, _timing(100, small))}
    assert rows == {
        "gated gap reduction vs base >= 72.66%": True,
        "gated gap reduction >= system_prompt's": False,
        "gated gate accuracy >= external's selection by task": True,
        "gated gap <= 1.05 x external's": True,
        "gated gap at turns 30+ <= at turns 1-5 (no drift)": None,
        "system_prompt gap grows from turns 1-5 to 30+": None,
        "40 dialogues x 30 turns x 5 systems (48 new tokens) within 30 minutes": None,  # a smaller run
    }
    assert len(check_targets(SYSTEMS, PAPER)) == 6  # no timing, no time row


def test_thresholds_decide_the_verdicts():
    strict = AcceptanceTargets(gap_reduction=0.85, gap_factor=0.9, minutes=10, full_run=FULL)
    rows = {r["target"]: r["met"] for r in check_targets(SYSTEMS, strict, _timing(11 * 60, FULL))}
    assert rows["gated gap reduction vs base >= 85.00%"] is False
    assert rows["gated gap <= 0.9 x external's"] is False
    assert rows["40 dialogues x 30 turns x 5 systems (48 new tokens) within 10 minutes"] is False
    larger = RunSize(dialogues=50, turns=30, systems=5, max_new_tokens=64)
    rows = check_targets(SYSTEMS, strict, _timing(9 * 60, larger))
    assert rows[-1] == {"target": "40 dialogues x 30 turns x 5 systems (48 new tokens) within 10 minutes", "measured": "9.0 min for 50 x 30 x 5 (64 tokens)", "met": True}


def _parse(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(["eval", "run", "--model", "m", "--out", "o", *extra])


def test_the_command_line_gives_the_defaults_and_takes_other_thresholds():
    assert acceptance_targets(_parse(), STANDARD_RUN) == AcceptanceTargets(gap_reduction=0.7266, gap_factor=1.05, minutes=30.0, full_run=STANDARD_RUN)
    assert acceptance_targets(_parse("--quick"), QUICK_RUN) == AcceptanceTargets(gap_reduction=0.7266, gap_factor=1.05, minutes=5.0, full_run=QUICK_RUN)
    args = _parse("--target-gap-reduction", "0.5", "--target-gap-factor", "1.2", "--target-minutes", "45")
    assert acceptance_targets(args, STANDARD_RUN) == AcceptanceTargets(gap_reduction=0.5, gap_factor=1.2, minutes=45, full_run=STANDARD_RUN)
    with pytest.raises(ValueError, match="--target-minutes is -1.0; pass a positive number"):
        acceptance_targets(_parse("--target-minutes", "-1"), STANDARD_RUN)
