"""Validation of the scorers against responses labelled by hand.

``eval/data/hand_labelled.jsonl`` holds responses and contexts written by hand for
this purpose (not by the dialogue generator), each with an overall 1-5 label and
0-2 labels per mechanism. ``moe-empathy eval scorers`` prints each scorer's
Spearman correlation with those labels.
"""

from __future__ import annotations

import argparse
import json
import time
from importlib import resources
from pathlib import Path

from moe_empathy.train.taxonomy import MECHANISMS
from moe_empathy.utils import atomic_write_text

from .scorers import SCORERS, get_scorer


def load_hand_labelled(path: str | Path | None = None) -> list[dict]:
    """Read the hand-labelled validation set.

    Args:
        path: a JSONL file with ``context``, ``response``, ``score`` and
            ``mechanisms`` per line (default: the packaged set).
    """
    text = (Path(path).read_text() if path
            else resources.files("moe_empathy.eval").joinpath("data/hand_labelled.jsonl").read_text())
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def validate_scorers(names=SCORERS, data=None, scorer_kwargs: dict | None = None) -> dict:
    """Spearman correlation of each scorer with the hand labels.

    Args:
        names: scorer names.
        data: records as from :func:`load_hand_labelled` (default: the packaged set).
        scorer_kwargs: scorer name -> constructor arguments.

    Returns:
        name -> ``{"spearman", "p_value", "n", "seconds", "mechanisms": {name: rho}}``;
        a correlation is None where the scorer gave the same value to every item.
    """

    data = data if data is not None else load_hand_labelled()
    responses = [r["response"] for r in data]
    contexts = [r["context"] for r in data]
    report = {}
    for name in names:
        start = time.perf_counter()
        scores = get_scorer(name, **(scorer_kwargs or {}).get(name, {})).score(responses, contexts)
        rho, p_value = _spearman([r["score"] for r in data], [s.score for s in scores])
        report[name] = {
            "spearman": rho,
            "p_value": p_value,
            "n": len(data),
            "seconds": time.perf_counter() - start,
            "mechanisms": {
                m: _spearman([r["mechanisms"][m] for r in data], [s.mechanisms[m] for s in scores])[0]
                for m in MECHANISMS
            },
        }
    return report


def _spearman(labels: list, predictions: list) -> tuple[float | None, float | None]:
    from scipy.stats import spearmanr

    if len(set(predictions)) < 2 or len(set(labels)) < 2:
        return None, None
    result = spearmanr(labels, predictions)
    return float(result.statistic), float(result.pvalue)


def _fmt(value: float | None, spec: str) -> str:
    return "constant" if value is None else format(value, spec)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``eval scorers``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--scorers", default="lexical,embedding,judge", help="comma-separated scorer names")
    parser.add_argument("--judge-model", default=None,
                   help="folder of a local Hugging Face chat model for the judge (default: embedded SmolLM2)")
    parser.add_argument("--judge-endpoint", default=None,
                   help="base URL of an OpenAI-compatible API (e.g. http://127.0.0.1:8000/v1) instead of a local model")
    parser.add_argument("--judge-endpoint-model", default=None, help="model name sent to --judge-endpoint")
    parser.add_argument("--data", default=None, help="hand-labelled JSONL (default: the packaged set)")
    parser.add_argument("--json", default=None, help="also write the report to this JSON file")
    parser.set_defaults(func=run_scorers)


def run_scorers(args: argparse.Namespace) -> dict:
    """Run ``moe-empathy eval scorers``.

    Args:
        args: the parsed arguments of :func:`add_arguments`.
    """
    from rich.console import Console
    from rich.table import Table

    names = [n.strip() for n in args.scorers.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ValueError(f"unknown scorer(s) {', '.join(unknown)}; choose from: {', '.join(SCORERS)}")
    judge = {"model": args.judge_model, "endpoint": args.judge_endpoint,
             "endpoint_model": args.judge_endpoint_model}
    data = load_hand_labelled(args.data)
    report = validate_scorers(names, data, {"judge": judge})
    table = Table(title=f"Spearman correlation with {len(data)} hand labels")
    for column in ("scorer", "overall", "p", *MECHANISMS, "seconds"):
        table.add_column(column)
    for name, r in report.items():
        table.add_row(name, _fmt(r["spearman"], ".3f"), _fmt(r["p_value"], ".1e"),
                      *[_fmt(r["mechanisms"][m], ".3f") for m in MECHANISMS], f"{r['seconds']:.1f}")
    Console().print(table)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return report
