"""References without a model: the constant reply, the task-selection ceiling, the readers'
label ceilings, and the report's plain sentences about them (tiny inputs)."""


import numpy as np
import pytest

from moe_empathy.eval.metrics import build_table, compute_metrics
from moe_empathy.eval.references import (
    NaiveBayes, StateReader, best_constant, fit_reader, reader_ceilings, reader_keys, reference_gaps,
)
from moe_empathy.eval.report import render_report
from moe_empathy.eval.rollout import DialogueRollout
from moe_empathy.train.taxonomy import LEVEL_TARGET, LEVELS

NAMES = list(LEVELS)


def _brute_constant(targets) -> float:
    grid = np.linspace(1, 5, 4001)
    return float(min(np.abs(np.asarray(targets)[None] - grid[:, None]).mean(1)))


@pytest.mark.parametrize("levels", [("low", "high", "high"), ("low", "medium", "high", "high"), ("medium",), ("low", "low", "high", "high")])
def test_best_constant_equals_brute_force(levels):
    targets = np.array([LEVEL_TARGET[level] for level in levels] + [np.nan])
    score, gap = best_constant(targets)
    assert gap == pytest.approx(_brute_constant(targets[:-1]), abs=1e-3)
    assert np.abs(targets[:-1] - score).mean() == pytest.approx(gap)


def _table(levels, tasks, scores):
    rollouts = {
        name: [DialogueRollout(name, f"d{d}", tasks[d], "low", users=["u"] * len(levels[d]), replies=["r"] * len(levels[d]), levels=levels[d])
               for d in range(len(levels))]
        for name in scores
    }
    return build_table(rollouts, scores, NAMES)


def test_reference_gaps_match_brute_force_and_the_report_says_who_does_not_beat_them():
    levels = [["low", "low", "high"], ["medium", "high", "high"], ["low", "medium"]]
    tasks = ["a", "b", "a"]
    scores = {"flat": [[1.0] * 3, [1.0] * 3, [1.0] * 2], "good": [[LEVEL_TARGET[v] for v in row] for row in levels]}
    table = _table(levels, tasks, scores)
    refs = reference_gaps(table, np.arange(3), samples=30, seed=0)
    flat_targets = [LEVEL_TARGET[v] for row in levels for v in row]
    assert refs["constant_reply"]["value"] == pytest.approx(_brute_constant(flat_targets), abs=1e-3)
    per_task = {t: [LEVEL_TARGET[v] for row, tt in zip(levels, tasks) if tt == t for v in row] for t in "ab"}
    expected = sum(_brute_constant(v) * len(v) for v in per_task.values()) / len(flat_targets)
    assert refs["task_selection"]["value"] == pytest.approx(expected, abs=1e-3)
    assert refs["task_selection"]["value"] <= refs["constant_reply"]["value"]
    assert refs["constant_reply"]["ci_low"] <= refs["constant_reply"]["value"] <= refs["constant_reply"]["ci_high"]
    metrics = compute_metrics(table, 1.0, samples=30)
    settings = {"model": "m", "systems": {}, "split": "test", "data": "d", "dialogues": 3, "turns": 3, "max_new_tokens": 8,
                "mode": "cached", "batch_size": 2, "scorers": ["s"], "bootstrap_samples": 30, "tolerance": 1.0}
    report = render_report({"settings": settings, "targets": [], "scorers": {"s": metrics}, "references": refs})
    assert "`flat` does **not** beat the constant-reply reference" in report
    assert "`good` beats the constant-reply reference" in report
    assert "## Replies that stop helping" in report


def _record(task, users):
    """users: (text, user_state, level) per turn."""
    turns = []
    for text, state, level in users:
        turns += [{"role": "user", "content": text, "user_state": state}, {"role": "assistant", "content": "ok", "level": level}]
    return {"dialogue_id": f"{task}-{len(users)}", "task": task, "turns": turns}


def test_readers_keys_lookups_and_ceilings():
    calm = ("How long is it?", "neutral", "low")
    upset = ("I feel awful today.", "upset", "medium")
    train = [_record("movies", [calm, calm, upset, calm]), _record("movies", [calm, upset]), _record("grief", [upset, upset])]
    states = StateReader(train)
    keys = reader_keys(train[0], "task + last two state changes", states)
    # "How long is it?" mostly opened a state in training: read as a change, but to the state already held
    assert keys == [("movies", "neutral"), ("movies", "neutral"), ("movies", "neutral", "upset"), ("movies", "upset", "neutral")]
    with pytest.raises(ValueError, match="needs a StateReader"):
        reader_keys(train[0], "task + last two state changes")
    assert fit_reader(train, "task only") == {("movies",): "low", ("grief",): "medium"}
    assert fit_reader(train, "task + current message")[("movies", "i feel awful today")] == "medium"
    scripts = [_record("movies", [calm, upset, ("Never seen this!", "neutral", "low")])]
    result = {r["reader"]: r for r in reader_ceilings(train, scripts, samples=20, seed=0)}
    assert result["task only"]["accuracy"]["value"] == pytest.approx(2 / 3)
    current = result["task + current message"]
    assert current["accuracy"]["value"] == pytest.approx(1.0) and current["seen"] == pytest.approx(2 / 3)  # unseen -> task's level
    assert result["task only"]["gap"]["value"] == pytest.approx((LEVEL_TARGET["medium"] - LEVEL_TARGET["low"]) / 3)
    with pytest.raises(ValueError, match="no dialogue in the readers' training split"):
        reader_ceilings(train, [_record("travel", [calm])], samples=5, seed=0)


def test_state_reader_reads_paraphrases_unseen_in_training():
    """The state-change reader classifies message text, so a wording it never saw still counts."""
    train = [
        _record("grief", [("Where do I start with the paperwork?", "neutral", "high"),
                          ("Honestly I am falling apart and can't stop crying.", "distressed", "high"),
                          ("What about the bank?", "distressed", "high"),
                          ("I feel much calmer now, just the steps please.", "steady", "medium")]),
        _record("grief", [("Which forms come first?", "neutral", "high"),
                          ("I'm really calmer today, only the practical steps.", "steady", "medium"),
                          ("And the bank?", "steady", "medium")]),
    ]
    script = _record("grief", [("Where do I start?", "neutral", "high"),
                               ("I am calmer now, the practical steps please.", "steady", "medium"),
                               ("What about the forms?", "steady", "medium")])
    keys = reader_keys(script, "task + last two state changes", StateReader(train))
    assert keys == [("grief", "neutral"), ("grief", "neutral", "steady"), ("grief", "neutral", "steady")]
    result = {r["reader"]: r for r in reader_ceilings(train, [script], samples=5, seed=0)}
    assert result["task + last two state changes"]["accuracy"]["value"] == pytest.approx(1.0)
    assert result["task + current message"]["seen"] == pytest.approx(0.0)  # no exact message was seen


def test_naive_bayes_picks_the_class_whose_words_match_and_refuses_no_data():
    model = NaiveBayes(["so sad and tired", "sad again", "fine thanks", "all fine"], ["upset", "upset", "calm", "calm"])
    assert model.predict("very sad") == "upset" and model.predict("fine") == "calm"
    assert model.predict("unknown words only") in {"upset", "calm"}  # falls back to the prior
    with pytest.raises(ValueError, match="at least one training message"):
        NaiveBayes([], [])
