"""Statistics over dialogues on hand-built arrays whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from moe_empathy.eval.stats import bootstrap, drift_onset, per_dialogue_slope, per_dialogue_std, shift_events


def test_slope_std_and_drift_onset():
    scores = np.array([[1.0, 2.0, 3.0, np.nan], [4.0, 4.0, 4.0, 4.0]])
    assert per_dialogue_slope(scores) == pytest.approx([1.0, 0.0])
    assert per_dialogue_std(scores) == pytest.approx([np.std([1.0, 2.0, 3.0]), 0.0])
    targets = np.array([[1.0, 1.0, 1.0, np.nan], [4.0, 4.0, 4.0, 4.0]])
    # Dialogue 0 leaves the +-1 band at turn 3 (|3 - 1| = 2); dialogue 1 never: its length + 1.
    assert drift_onset(scores, targets, 1.0).tolist() == [3.0, 5.0]
    assert per_dialogue_slope(np.array([[2.0, np.nan]])).tolist() == [pytest.approx(np.nan, nan_ok=True)]


def test_shift_events_follow_latency_and_misses():
    labels = np.array([[0, 0, 2, 2, 2, 1, -1]])
    choices = np.array([[0, 0, 0, 2, 2, 0, -1]])
    shifts, followed, latency = shift_events(choices, labels)
    assert (shifts[0], followed[0], latency[0]) == (2, 1, 1)  # 0->2 reached one turn late; 2->1 never


def test_bootstrap_interval_brackets_the_value_and_collapses_on_constants():
    values = np.arange(20, dtype=float)
    result = bootstrap(lambda idx: values[idx].mean(1), np.arange(20), samples=300)
    assert result["value"] == pytest.approx(9.5)
    assert result["ci_low"] < 9.5 < result["ci_high"] and result["n"] == 20
    constant = bootstrap(lambda idx: np.ones(idx.shape[0]), np.arange(5), samples=50)
    assert constant["value"] == constant["ci_low"] == constant["ci_high"] == 1.0
    assert bootstrap(lambda idx: idx.mean(1), np.array([], dtype=int))["value"] is None
