"""Calibration of the scorers: the isotonic curve, the fixed held-out split, the stored curves
and the validation figures' definitions (tiny inputs; no model is loaded)."""

import json

import numpy as np
import pytest

from moe_empathy.eval.calibration import (
    RATING_SETS, CalibratedScorer, IsotonicCurve, RatedReply, SplitConfig, calibration_path, fit_items, load_curves,
    load_rated_devset, split_items,
)
from moe_empathy.eval.scoring import EmpathyScore, Scorer
from moe_empathy.eval.validate_scorers import agreement, forced_order, levels_of


def _brute_isotonic(y: list[float]) -> np.ndarray:
    """Least-squares isotonic fit by the min-max formula (distinct x in order)."""
    n = len(y)
    return np.array([max(min(np.mean(y[j:k + 1]) for k in range(i, n)) for j in range(i + 1)) for i in range(n)])


@pytest.mark.parametrize("seed", range(5))
def test_isotonic_curve_is_monotone_and_least_squares(seed):
    rng = np.random.default_rng(seed)
    x = np.sort(rng.choice(100, size=9, replace=False)).astype(float)
    y = rng.uniform(1, 5, size=9)
    order = rng.permutation(9)
    curve = IsotonicCurve.fit(x[order], y[order])  # any input order: the fit sorts by raw score
    assert np.allclose(curve(x), _brute_isotonic(list(y)))
    grid = np.linspace(-10, 110, 500)
    assert np.all(np.diff(curve(grid)) >= -1e-12)  # monotone everywhere, flat beyond the ends
    assert curve(-10) == curve(x[0]) and curve(110) == curve(x[-1])


def test_isotonic_curve_pools_ties_and_rejects_bad_input():
    curve = IsotonicCurve.fit([1.0, 1.0, 2.0, 3.0], [1.0, 3.0, 1.0, 4.0])
    assert curve(1.0) == pytest.approx(5 / 3) and curve(2.0) == pytest.approx(5 / 3) and curve(3.0) == 4.0
    with pytest.raises(ValueError, match="as many targets"):
        IsotonicCurve.fit([1.0, 2.0], [1.0])


def test_a_weighted_isotonic_fit_equals_the_fit_with_repeated_points():
    raw, target = [1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0]
    weighted = IsotonicCurve.fit(raw, target, [1.0, 3.0, 2.0, 1.0])
    repeated = IsotonicCurve.fit([1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 4.0], [2.0, 1.0, 1.0, 1.0, 4.0, 4.0, 3.0])
    assert np.allclose(weighted([1.0, 2.0, 3.0, 4.0]), repeated([1.0, 2.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="positive"):
        IsotonicCurve.fit(raw, target, [1.0, 0.0, 1.0, 1.0])


def _items(n_per: dict[str, int]) -> list[RatedReply]:
    return [RatedReply(id=f"{s}{k:03d}", stratum=s, context=[], reply="x", reference=1.0, rater_levels=("low",), empathy=1.0)
            for s, n in n_per.items() for k in range(n)]


def test_split_is_fixed_disjoint_and_stratified():
    items = _items({"a": 10, "b": 20, "c": 5})
    fit, held = split_items(items, SplitConfig(0.4, 7))
    assert {i.id for i in fit}.isdisjoint({i.id for i in held})
    assert len(fit) + len(held) == len(items)
    assert [sum(i.stratum == s for i in held) for s in "abc"] == [4, 8, 2]
    again = split_items(list(reversed(items)), SplitConfig(0.4, 7))[1]
    assert [i.id for i in again] == [i.id for i in held]  # depends on the ids only
    assert [i.id for i in split_items(items, SplitConfig(0.4, 8))[1]] != [i.id for i in held]
    with pytest.raises(ValueError, match="between 0 and 1"):
        split_items(items, SplitConfig(1.0, 7))


def test_packaged_split_and_reference():
    splits = fit_items()
    assert set(splits.fit) == set(splits.heldout) == {*RATING_SETS, "hand"}
    for name, folder in RATING_SETS.items():  # each set of model-written replies is split on its own
        rated = load_rated_devset(str(calibration_path().parent.parent / folder))
        assert len(rated) >= 300 and len({i.stratum for i in rated}) == 5
        fit, held = splits.fit[name], splits.heldout[name]
        assert not {i.id for i in fit} & {i.id for i in held} and len(fit) + len(held) == len(rated)
        for system in {i.stratum for i in rated}:  # 40% of every system held out
            assert sum(i.stratum == system for i in held) == round(0.4 * sum(i.stratum == system for i in rated))
        assert [i.id for i in split_items(rated)[1]] == [i.id for i in held]
        assert all(1.0 <= i.reference <= 5.0 for i in rated)
    assert not {i.id for i in splits.fit["hand"]} & {i.id for i in splits.heldout["hand"]}
    assert len(splits.model_written("heldout")) == sum(len(splits.heldout[name]) for name in RATING_SETS)


def test_stored_curves_are_monotone_and_record_their_fit():
    curves = load_curves()
    assert {"lexical", "embedding"} <= set(curves)
    splits = fit_items()
    model = {name: len(splits.fit[name]) for name in RATING_SETS}
    for name, entry in curves.items():
        assert np.all(np.diff(entry["x"]) > 0) and np.all(np.diff(entry["y"]) >= 0)
        assert 1.0 <= entry["y"][0] and entry["y"][-1] <= 5.0
        # the helpfulness curve reads the model-written sets alone (the hand-labelled set has no helpfulness)
        fitted = model if name == "helpfulness" else {**model, "hand_labelled": len(splits.fit["hand"])}
        assert entry["fitted_on"] == fitted
    assert calibration_path().name.endswith(".jsonl")  # packaged like the other data files


class _Fixed(Scorer):
    name = "fixed"

    def _score(self, responses, contexts):
        return [EmpathyScore(score=float(len(r)), mechanisms={"emotional_reaction": 0, "interpretation": 0, "exploration": 0}) for r in responses]


def test_calibrated_scorer_maps_scores_and_names_the_refit(tmp_path):
    scorer = CalibratedScorer(_Fixed(), IsotonicCurve(x=[1.0, 3.0], y=[1.0, 2.0]))
    assert [s.score for s in scorer.score(["a", "bb", "cccc"])] == [1.0, 1.5, 2.0]
    path = tmp_path / "curves.jsonl"
    path.write_text(json.dumps({"scorer": "other", "x": [1, 2], "y": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match=r"no calibration.*'fixed'.*python -m moe_empathy.eval.fit_calibration --scorers fixed"):
        CalibratedScorer(_Fixed(), path=path)


def test_level_bands_and_agreement():
    assert levels_of(1.0) == {"low"} and levels_of(2.67) == {"medium"} and levels_of(4.9) == {"high"}
    assert levels_of(2.0) == {"low", "medium"}  # halfway between the low and medium bands
    assert levels_of(1.9) == {"low"} and levels_of(3.4) == {"high"}
    items = [RatedReply(id=str(k), stratum="s", context=[], reply="x", reference=r, rater_levels=(), empathy=r,
                        forced=f) for k, (r, f) in enumerate([(1.0, "low"), (2.0, "medium"), (4.0, "high")])]
    result = agreement([1.0, 2.5, 2.0], items)
    assert result["mae"] == pytest.approx((0 + 0.5 + 2.0) / 3)
    assert result["band_agreement"] == pytest.approx(2 / 3)
    assert result["spearman"] == pytest.approx(0.5)
    assert agreement([1.5] * 3, items)["spearman"] is None
    order = forced_order([1.0, 2.5, 2.0], items)
    assert order["means"] == {"low": 1.0, "medium": 2.5, "high": 2.0} and order["in_order"] is False
