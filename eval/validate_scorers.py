"""Validation of the scorers against people's ratings, before and after calibration.

Three rated sets (:mod:`.calibration` loads and splits them; the split is fixed and seeded):

* two sets of model-written replies, each rated by two raters and held out 40% (stratified by
  system): ``devset`` (``eval/data/rating``, earlier checkpoints) and ``recent``
  (``eval/data/rating_recent``, the v8 and the shipped checkpoint); their held-out parts
  together (``model_heldout``) are the main test. Most replies show little empathy (raters'
  mean at most 2.33 for all but a few), so they test the low end of the scale;
* the hand-labelled set (``eval/data/hand_labelled.jsonl``): replies written by hand across
  the whole scale; its held-out half (stratified by label) is reported separately.

Per scorer and set: Spearman correlation, mean absolute error and agreement within the level
band, of the raw and the calibrated scores, with a constant prediction (the fit parts'
median reference) beside them, and the mean score of each expert that ``external`` forced
(whether low < medium < high). ``moe-empathy eval scorers`` (or
``python -m moe_empathy.eval.validate_scorers``) prints the tables.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from moe_empathy.train.taxonomy import LEVEL_BAND, LEVELS
from moe_empathy.utils import atomic_write_text

from .calibration import RATING_SETS, CalibratedScorer, RatedReply, SplitConfig, fit_items, raw_scores
from .helpfulness import HelpfulnessScorer
from .scorers import SCORERS, get_scorer

GOALS = {"spearman": 0.8, "mae": 0.6, "band_agreement": 0.6}  # issue 12


def levels_of(value: float) -> set[str]:
    """The level band(s) nearest to a 1-5 value: the band holding it, else the closest;
    a value exactly halfway between two bands belongs to both.

    Args:
        value: a score on the 1-5 scale.
    """
    distance = {level: max(low - value, 0.0, value - high) for level, (low, high) in LEVEL_BAND.items()}
    best = min(distance.values())
    return {level for level in LEVELS if distance[level] <= best + 1e-9}


def agreement(predictions, items: list[RatedReply]) -> dict:
    """Agreement of predictions with the raters' references.

    Args:
        predictions: ``[n]`` scores on the 1-5 scale.
        items: the rated items, in the same order.

    Returns:
        ``{"spearman", "mae", "band_agreement", "n"}``; Spearman is None for a constant prediction.
    """
    return agreement_with(predictions, [i.reference for i in items])


def agreement_with(predictions, references) -> dict:
    """:func:`agreement` against references given as numbers.

    Args:
        predictions: ``[n]`` scores on the 1-5 scale.
        references: ``[n]`` people's references on the same scale.
    """
    predictions = np.asarray(predictions, dtype=float)
    reference = np.asarray(references, dtype=float)
    band = np.mean([bool(levels_of(p) & levels_of(r)) for p, r in zip(predictions, reference)])
    return {"spearman": spearman(reference, predictions), "mae": float(np.abs(predictions - reference).mean()),
            "band_agreement": float(band), "n": len(reference)}


def median_mae(references) -> float:
    """The mean absolute error of the references' own median as a constant prediction.

    Args:
        references: ``[n]`` people's references.
    """
    references = np.asarray(references, dtype=float)
    return float(np.abs(np.median(references) - references).mean())


def helpfulness_agreement_with(predictions, references) -> dict:
    """Agreement on a scale without level bands (helpfulness): Spearman, mean absolute error, and
    :func:`median_mae` beside them.

    Args:
        predictions: ``[n]`` scores on the 1-5 scale.
        references: ``[n]`` people's references on the same scale.

    Returns:
        ``{"spearman", "mae", "constant_mae", "n"}``.
    """
    predictions, references = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
    return {"spearman": spearman(references, predictions), "mae": float(np.abs(predictions - references).mean()),
            "constant_mae": median_mae(references), "n": len(references)}


def forced_order(predictions, items: list[RatedReply]) -> dict:
    """Mean score per expert that a forced system used, and whether low < medium < high.

    Args:
        predictions: ``[n]`` scores.
        items: the rated items (those with ``forced`` set count).
    """
    means = {}
    for level in LEVELS:
        picked = [p for p, i in zip(predictions, items) if i.forced == level]
        means[level] = float(np.mean(picked)) if picked else None
    values = [means[level] for level in LEVELS]
    ordered = None if None in values else all(a < b for a, b in zip(values, values[1:]))
    return {"means": means, "in_order": ordered, "n": sum(i.forced is not None for i in items)}


def validate_scorers(names=("lexical", "embedding"), scorer_kwargs: dict | None = None,
                     config: SplitConfig = SplitConfig()) -> dict:
    """Each scorer's agreement with people on the held-out parts, raw and calibrated.

    Args:
        names: scorer names.
        scorer_kwargs: scorer name -> constructor arguments.
        config: the split (the one the stored curves were fitted with).

    Returns:
        ``{"sets": {set: {"n", "constant", "raters": order}}, "scorers": {name: {set: {"raw", "calibrated",
        "order_raw", "order_calibrated"}, "seconds"}}}``.
    """
    splits = fit_items(config)
    constant = float(np.median([i.reference for i in splits.model_written("fit") + splits.fit["hand"]]))
    sets = {**{f"{name}_heldout": splits.heldout[name] for name in RATING_SETS},
            "model_heldout": splits.model_written("heldout"), "hand_heldout": splits.heldout["hand"]}
    report = {"constant_value": constant, "sets": {}, "scorers": {}}
    for set_name, items in sets.items():
        reference = [i.reference for i in items]
        report["sets"][set_name] = {"n": len(items), "constant": agreement([constant] * len(items), items),
                                    "raters_order": forced_order(reference, items)}
    for name in names:
        start = time.perf_counter()
        raw_scorer = get_scorer(name, calibrated=False, **(scorer_kwargs or {}).get(name, {}))
        calibrated = CalibratedScorer(raw_scorer)
        # each held-out reply is scored once; the model-written sets together reuse their sets' scores,
        # set after set as ``model_written`` orders them
        raws = {f"{n}_heldout": raw_scores(raw_scorer, splits.heldout[n]) for n in (*RATING_SETS, "hand")}
        raws["model_heldout"] = np.concatenate([raws[f"{n}_heldout"] for n in RATING_SETS])
        entry = {}
        for set_name, items in sets.items():
            raw = raws[set_name]
            after = calibrated.curve(raw)
            entry[set_name] = {"raw": agreement(raw, items), "calibrated": agreement(after, items),
                               "order_raw": forced_order(raw, items), "order_calibrated": forced_order(after, items)}
        entry["seconds"] = time.perf_counter() - start
        report["scorers"][name] = entry
    return report


def validate_helpfulness(config: SplitConfig = SplitConfig()) -> dict:
    """The helpfulness scorer against the raters' mean helpfulness on the held-out parts of the
    sets of model-written replies.

    Args:
        config: the split (the one the stored curve was fitted with).

    Returns:
        ``{"n", "constant_value", "constant", "raw", "calibrated", "by_system"}``: agreement as
        ``{"spearman", "mae", "n"}``, and per system the raters' and the calibrated scorer's mean.
    """
    splits = fit_items(config)
    fit, heldout = splits.model_written("fit"), splits.model_written("heldout")
    scorer = HelpfulnessScorer()
    raw = scorer.raw_scores([i.reply for i in heldout], [i.context for i in heldout])
    calibrated = scorer.curve(raw)
    people = np.array([i.helpfulness for i in heldout])
    constant = float(np.median([i.helpfulness for i in fit]))

    def agree(predictions) -> dict:
        return {"spearman": spearman(people, predictions), "mae": float(np.abs(np.asarray(predictions) - people).mean()), "n": len(people)}

    systems = sorted({i.system for i in heldout})
    by_system = {name: {"raters": float(people[[i.system == name for i in heldout]].mean()),
                        "scorer": float(calibrated[[i.system == name for i in heldout]].mean())} for name in systems}
    return {"n": len(heldout), "constant_value": constant, "constant": agree([constant] * len(people)),
            "raw": agree(raw), "calibrated": agree(calibrated), "by_system": by_system}


def render_helpfulness(report: dict) -> str:
    """:func:`validate_helpfulness`'s output as a Markdown table.

    Args:
        report: its output.
    """
    rows = [(f"constant {report['constant_value']:.2f}", report["constant"], report["constant"]), ("helpfulness", report["raw"], report["calibrated"])]
    lines = [f"helpfulness, model_heldout (n = {report['n']})", "", "| scorer | Spearman raw | Spearman cal. | MAE raw | MAE cal. |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {_fmt(raw['spearman'], '.3f')} | {_fmt(cal['spearman'], '.3f')} | {raw['mae']:.2f} | {cal['mae']:.2f} |" for name, raw, cal in rows]
    lines += ["", "| system | raters' mean | scorer's mean (cal.) |", "|---|---|---|"]
    lines += [f"| {name} | {v['raters']:.2f} | {v['scorer']:.2f} |" for name, v in report["by_system"].items()]
    return "\n".join(lines) + "\n"


def spearman(labels, predictions) -> float | None:
    """Spearman correlation, or None where either side is constant."""
    from scipy.stats import spearmanr

    if len(set(np.round(predictions, 12))) < 2 or len(set(labels)) < 2:
        return None
    return float(spearmanr(labels, predictions).statistic)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _order(order: dict) -> str:
    means = "/".join(_fmt(order["means"][level], ".2f") for level in LEVELS)
    return f"{means} ({'yes' if order['in_order'] else 'no' if order['in_order'] is False else 'n/a'})"


def render_markdown(report: dict) -> str:
    """The report as Markdown tables (one per rated set).

    Args:
        report: :func:`validate_scorers` output.
    """
    parts = []
    for set_name, info in report["sets"].items():
        parts += [f"{set_name} (n = {info['n']}); raters' mean per forced expert low/medium/high: {_order(info['raters_order'])}", "",
                  "| scorer | Spearman raw | Spearman cal. | MAE raw | MAE cal. | band raw | band cal. | forced experts, cal. |",
                  "|---|---|---|---|---|---|---|---|"]
        c = info["constant"]
        parts.append(f"| constant {report['constant_value']:.2f} | n/a | n/a | {c['mae']:.2f} | {c['mae']:.2f} | "
                     f"{c['band_agreement']:.0%} | {c['band_agreement']:.0%} | - |")
        for name, entry in report["scorers"].items():
            e = entry[set_name]
            raw, cal = e["raw"], e["calibrated"]
            parts.append(f"| {name} | {_fmt(raw['spearman'], '.3f')} | {_fmt(cal['spearman'], '.3f')} | {raw['mae']:.2f} | "
                         f"{cal['mae']:.2f} | {raw['band_agreement']:.0%} | {cal['band_agreement']:.0%} | {_order(e['order_calibrated'])} |")
        parts.append("")
    return "\n".join(parts)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``eval scorers``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--scorers", default="lexical,embedding", help=f"comma-separated, from: {', '.join(SCORERS)}")
    parser.add_argument("--judge-model", default=None,
                        help="folder of a local Hugging Face chat model for the judge (default: embedded SmolLM2)")
    parser.add_argument("--judge-endpoint", default=None,
                        help="base URL of an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1) instead of a local model")
    parser.add_argument("--judge-endpoint-model", default=None, help="model name sent to --judge-endpoint")
    parser.add_argument("--json", default=None, help="also write the report to this JSON file")
    parser.set_defaults(func=run_scorers)


def run_scorers(args: argparse.Namespace) -> dict:
    """Run ``moe-empathy eval scorers``: prints the held-out tables (Markdown), the empathy
    scorers' and the helpfulness scorer's.

    Args:
        args: the parsed arguments of :func:`add_arguments`.
    """
    names = [n.strip() for n in args.scorers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCORERS]
    if unknown or not names:
        raise ValueError(f"unknown scorer(s) {', '.join(unknown) or names}; choose from: {', '.join(SCORERS)}")
    judge = {"model": args.judge_model, "endpoint": args.judge_endpoint, "endpoint_model": args.judge_endpoint_model}
    report = validate_scorers(names, {"judge": judge})
    report["helpfulness"] = validate_helpfulness()
    print(render_markdown(report))
    print(render_helpfulness(report["helpfulness"]))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="python -m moe_empathy.eval.validate_scorers", description=__doc__.split("\n")[0])
    add_arguments(_parser)
    _args = _parser.parse_args()
    _args.func(_args)
