"""Calibration of the empathy scorers to the evaluation's 1-5 scale.

A scorer's raw score ranks replies; the gap of the evaluation also needs its *level* to
agree with people. Each scorer's raw score is mapped through an isotonic (monotone
non-decreasing, piecewise-linear) curve fitted on rated replies:

* the fit parts of the rated sets of model-written replies (``eval/data/rating``: earlier
  checkpoints; ``eval/data/rating_recent``: the v8 and the shipped checkpoint; two independent
  raters each), each split on its own, fixed, seeded and stratified by system
  (:func:`split_items`); the rest is held out for the validation report (:mod:`.validate_scorers`);
* the fit part of the hand-labelled set (``eval/data/hand_labelled.jsonl``, split the same
  way, stratified by label), because model-written replies rarely show much empathy: few
  rated replies lie above 3, and a curve fitted on them alone could never reach the high band.
  Model-written and hand-labelled replies weigh half each in the fit, so the many low-end model
  replies do not drown the few hand-labelled ones that span the scale.

The target of a reply is the raters' mean of ``1 + 4 s / 6`` (``s``: a rater's total of the
three mechanism strengths, :func:`~moe_empathy.train.taxonomy.total_to_score`), which is the
scale the evaluation's targets and level bands live on; the rubric's whole-number rating
rounds it (a rating of 2 is either side of the low/medium border).

The curves are stored in ``eval/data/calibration.jsonl`` (one line per scorer); :class:`CalibratedScorer` applies
them (:func:`~.scorers.get_scorer` does by default). Refit after changing a scorer::

    python -m moe_empathy.eval.fit_calibration --scorers lexical,embedding,judge
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from moe_empathy.train.taxonomy import LEVEL_TOTALS, MECHANISMS, total_to_score
from moe_empathy.utils import read_jsonl

from .scoring import EmpathyScore, Scorer

CALIBRATION_FILE = "data/calibration.jsonl"  # inside the eval package: one line per scorer (packaged like the other *.jsonl)
RATERS = ("rater_a", "rater_b")
REFIT_COMMAND = "python -m moe_empathy.eval.fit_calibration --scorers {name}"
# The packaged sets of model-written replies, each rated by two raters and split on its own (so
# adding a set never moves another set's held-out part).
RATING_SETS = {"devset": "data/rating", "recent": "data/rating_recent"}


@dataclass(frozen=True)
class SplitConfig:
    """How the rated sets are split into a fit part and a held-out part.

    Attributes:
        heldout_fraction: share of each stratum held out for the report.
        seed: the shuffle's seed (fixed: the split never changes between runs).
    """

    heldout_fraction: float = 0.4
    seed: int = 20251212


@dataclass(frozen=True)
class RatedReply:
    """One rated reply with its reference score.

    Attributes:
        id: the item's id.
        stratum: what the split is stratified by (the system; the label for hand-labelled items).
        context: the conversation before the reply (messages, ending with the user's).
        reply: the rated text.
        reference: the raters' mean of ``1 + 4 s / 6`` (1-5).
        rater_levels: each rater's level (band of their mechanism total).
        empathy: the raters' mean whole-number empathy rating (1-5).
        helpfulness: the raters' mean helpfulness (None where not rated).
        system, level, forced: the devset key's system, turn's expected level and the expert a
            forced system used (None for hand-labelled items or systems that mix).
    """

    id: str
    stratum: str
    context: list
    reply: str
    reference: float
    rater_levels: tuple[str, ...]
    empathy: float
    helpfulness: float | None = None
    system: str | None = None
    level: str | None = None
    forced: str | None = None


def _package_data(relative: str) -> Path:
    return Path(str(resources.files("moe_empathy.eval").joinpath(relative)))


def _level(total: float) -> str:
    return next(level for level, (low, high) in LEVEL_TOTALS.items() if low <= total <= high)


def load_rated_devset(folder: str | Path | None = None) -> list[RatedReply]:
    """The rated development set: replies, key and both raters' ratings, joined by id.

    Args:
        folder: a folder with ``replies.jsonl``, ``replies_key.jsonl`` and
            ``ratings_rater_a.jsonl`` / ``ratings_rater_b.jsonl`` (default: the packaged first set).

    Raises:
        ValueError: when a rater missed an item or rated one that is not in the set.
    """
    folder = Path(folder) if folder else _package_data(RATING_SETS["devset"])
    replies = {r["id"]: r for r in read_jsonl(folder / "replies.jsonl")}
    key = {r["id"]: r for r in read_jsonl(folder / "replies_key.jsonl")}
    ratings = {name: {r["id"]: r for r in read_jsonl(folder / f"ratings_{name}.jsonl")} for name in RATERS}
    for name, rated in ratings.items():
        if set(rated) != set(replies):
            missing, extra = sorted(set(replies) - set(rated)), sorted(set(rated) - set(replies))
            raise ValueError(f"ratings_{name}.jsonl does not cover replies.jsonl: missing {missing[:5]}, unknown {extra[:5]}")
    items = []
    for rid, r in replies.items():
        totals = [sum(ratings[n][rid][m] for m in MECHANISMS) for n in RATERS]
        k = key[rid]
        forced = None
        if k.get("system") == "external" and k.get("mixture"):
            forced = ("low", "medium", "high")[int(np.argmax(k["mixture"]))]
        items.append(RatedReply(
            id=rid, stratum=k["system"], context=list(r["context"]) + [{"role": "user", "content": r["user"]}],
            reply=r["reply"], reference=float(np.mean([total_to_score(t) for t in totals])),
            rater_levels=tuple(_level(t) for t in totals),
            empathy=float(np.mean([ratings[n][rid]["empathy"] for n in RATERS])),
            helpfulness=float(np.mean([ratings[n][rid]["helpfulness"] for n in RATERS])),
            system=k["system"], level=k["level"], forced=forced,
        ))
    return items


def load_hand_items(path: str | Path | None = None) -> list[RatedReply]:
    """The hand-labelled set (human-written replies across the whole scale) as rated items.

    Args:
        path: the JSONL file (default: the packaged ``hand_labelled.jsonl``).
    """
    records = read_jsonl(path or _package_data("data/hand_labelled.jsonl"))
    items = []
    for r in records:
        total = sum(r["mechanisms"][m] for m in MECHANISMS)
        items.append(RatedReply(id=r["id"], stratum=str(r["score"]), context=[{"role": "user", "content": r["context"]}],
                                reply=r["response"], reference=total_to_score(total), rater_levels=(_level(total),),
                                empathy=float(r["score"])))
    return items


def split_items(items: list[RatedReply], config: SplitConfig = SplitConfig()) -> tuple[list[RatedReply], list[RatedReply]]:
    """A fixed, seeded split stratified by ``stratum``: ``(fit, heldout)``, both in id order.

    Within each stratum the ids are sorted, shuffled with ``seed`` and the stratum's name, and
    the first ``round(heldout_fraction * n)`` are held out; the split depends only on the ids.

    Args:
        items: rated items.
        config: the fraction and the seed.
    """
    if not 0 < config.heldout_fraction < 1:
        raise ValueError(f"heldout_fraction is {config.heldout_fraction}; pass a number between 0 and 1")
    heldout_ids = set()
    for stratum in sorted({i.stratum for i in items}):
        ids = sorted(i.id for i in items if i.stratum == stratum)
        random.Random(f"{config.seed}:{stratum}").shuffle(ids)
        heldout_ids.update(ids[: round(config.heldout_fraction * len(ids))])
    ordered = sorted(items, key=lambda i: i.id)
    return [i for i in ordered if i.id not in heldout_ids], [i for i in ordered if i.id in heldout_ids]


@dataclass
class IsotonicCurve:
    """A monotone non-decreasing, piecewise-linear map from raw scores to the 1-5 scale.

    Attributes:
        x: increasing raw-score knots.
        y: non-decreasing calibrated values at the knots (flat beyond the ends).
    """

    x: list[float]
    y: list[float]

    @classmethod
    def fit(cls, raw, target, weight=None) -> IsotonicCurve:
        """Weighted least-squares isotonic regression (pool adjacent violators) of ``target`` on ``raw``.

        Args:
            raw: ``[n]`` raw scores.
            target: ``[n]`` reference scores.
            weight: ``[n]`` positive weights of the points, or None for equal weights.
        """
        raw, target = np.asarray(raw, dtype=float), np.asarray(target, dtype=float)
        weight = np.ones_like(raw) if weight is None else np.asarray(weight, dtype=float)
        if raw.shape != target.shape or raw.shape != weight.shape or raw.size == 0:
            raise ValueError(f"need as many targets and weights as raw scores (got {raw.size}, {target.size}, {weight.size}), at least one")
        if (weight <= 0).any():
            raise ValueError("isotonic weights must be positive")
        xs, inverse = np.unique(raw, return_inverse=True)
        sums, weights = np.bincount(inverse, target * weight), np.bincount(inverse, weight)
        blocks: list[list[float]] = []  # [sum, weight, first knot, last knot]
        for k in range(len(xs)):
            blocks.append([sums[k], weights[k], k, k])
            while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
                s, w, _, last = blocks.pop()
                blocks[-1][0] += s
                blocks[-1][1] += w
                blocks[-1][3] = last
        x, y = [], []
        for s, w, first, last in blocks:  # a flat block needs only its two ends
            for k in sorted({first, last}):
                x.append(float(xs[k]))
                y.append(float(s / w))
        return cls(x=x, y=y)

    def __call__(self, raw) -> np.ndarray:
        """Calibrated values of raw scores (linear between knots, constant beyond them)."""
        return np.interp(np.asarray(raw, dtype=float), self.x, self.y)


def calibration_path() -> Path:
    """The packaged calibration file."""
    return _package_data(CALIBRATION_FILE)


def load_curves(path: str | Path | None = None) -> dict[str, dict]:
    """The stored calibrations: scorer key -> ``{"scorer", "x", "y", "fitted_on", ...}``.

    Args:
        path: a calibration JSONL file (default: the packaged one).
    """
    path = Path(path) if path else calibration_path()
    return {r["scorer"]: r for r in read_jsonl(path)} if path.exists() else {}


class CalibratedScorer(Scorer):
    """A scorer whose 1-5 score goes through its stored isotonic curve (mechanisms unchanged).

    Args:
        raw: the uncalibrated scorer.
        curve: its curve (default: the one stored for ``raw.calibration_key``).
        path: the calibration file to read the curve from (default: the packaged one).

    Raises:
        ValueError: when no curve is stored for the scorer, naming the command that fits one.
    """

    def __init__(self, raw: Scorer, curve: IsotonicCurve | None = None, path: str | Path | None = None):
        self.raw = raw
        self.name = raw.name
        if curve is None:
            stored = load_curves(path).get(raw.calibration_key)
            if stored is None:
                raise ValueError(
                    f"no calibration is stored for scorer {raw.calibration_key!r} in {path or calibration_path()}; fit one with "
                    f"`{REFIT_COMMAND.format(name=raw.name)}` (with the same scorer settings) or build the scorer uncalibrated")
            curve = IsotonicCurve(x=stored["x"], y=stored["y"])
        self.curve = curve

    @property
    def calibration_key(self) -> str:
        return self.raw.calibration_key

    def _score(self, responses, contexts):
        scores = self.raw._score(responses, contexts)
        calibrated = self.curve([s.score for s in scores])
        return [EmpathyScore(score=float(c), mechanisms=s.mechanisms) for s, c in zip(scores, calibrated)]


@dataclass(frozen=True)
class RatedSplits:
    """The packaged rated sets, each split into a fit part and a held-out part.

    Attributes:
        fit: set name -> fit part (``devset``, ``recent``: model-written; ``hand``: hand-labelled).
        heldout: set name -> held-out part, the same names.
    """

    fit: dict[str, list[RatedReply]]
    heldout: dict[str, list[RatedReply]]

    def model_written(self, part: str) -> list[RatedReply]:
        """The model-written sets' items of one part (``"fit"`` or ``"heldout"``), set after set."""
        return [i for name in RATING_SETS for i in getattr(self, part)[name]]


def fit_items(config: SplitConfig = SplitConfig()) -> RatedSplits:
    """The packaged rated sets split for calibration: every set of model-written replies
    (:data:`RATING_SETS`) with ``config``, the hand-labelled set half and half.

    Args:
        config: the split.
    """
    fit, heldout = {}, {}
    for name, folder in RATING_SETS.items():
        fit[name], heldout[name] = split_items(load_rated_devset(_package_data(folder)), config)
    fit["hand"], heldout["hand"] = split_items(load_hand_items(), SplitConfig(0.5, config.seed))
    return RatedSplits(fit=fit, heldout=heldout)


def raw_scores(scorer: Scorer, items: list[RatedReply]) -> np.ndarray:
    """``[n]`` raw scores of some rated items (the scorer's own, uncalibrated).

    Args:
        scorer: an uncalibrated scorer.
        items: the items to score in their contexts.
    """
    scores = scorer.score([i.reply for i in items], [i.context for i in items])
    return np.array([s.score for s in scores])


def fit_calibration(scorer: Scorer, config: SplitConfig = SplitConfig()) -> dict:
    """Fits one scorer's curve on the fit parts of the rated sets.

    Args:
        scorer: an uncalibrated scorer.
        config: the split.

    Returns:
        The entry stored in the calibration file.
    """
    splits = fit_items(config)
    model, hand = splits.model_written("fit"), splits.fit["hand"]
    # The model-written and the hand-labelled replies get half of the fit's weight each: the
    # model-written ones are many but almost all at the low end, and only the hand-labelled
    # ones reach the upper part of the scale.
    weight = [0.5 / len(model)] * len(model) + [0.5 / len(hand)] * len(hand)
    curve = IsotonicCurve.fit(raw_scores(scorer, model + hand), [i.reference for i in model + hand], weight)
    return {"x": curve.x, "y": curve.y, "target": "raters' mean of 1 + 4 s / 6",
            "fitted_on": {**{name: len(splits.fit[name]) for name in RATING_SETS}, "hand_labelled": len(hand)},
            "split": {"heldout_fraction": config.heldout_fraction, "seed": config.seed}}
