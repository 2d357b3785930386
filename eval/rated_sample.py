"""People's reading of an evaluation: a rated sample of its replies, per system.

A sample of a finished run's replies is drawn blind
(``python -m moe_empathy.eval.devset --from-run RUN --out DIR/replies.jsonl``), two raters rate it
with ``eval/data/rating/RUBRIC.md`` (``DIR/ratings_rater_a.jsonl``, ``DIR/ratings_rater_b.jsonl``),
and ``python -m moe_empathy.eval.rated_sample --dir DIR`` gives, per system, what the raters saw:
their helpfulness, their empathy against the turn's target (the raters' gap), and beside them the
scorers' figures on the same replies, with the raters' agreement. A scorer's conclusion can be
checked this way on the very run it is drawn from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from moe_empathy.train.taxonomy import LEVEL_TARGET
from moe_empathy.utils import atomic_write_text, read_jsonl

from .calibration import RATERS, load_rated_devset
from .helpfulness import HelpfulnessScorer
from .references import best_constant
from .scorers import get_scorer
from .stats import bootstrap
from .validate_scorers import agreement_with, helpfulness_agreement_with, median_mae, spearman

REPORT = "rated_sample.md"


def mean_ci(values: np.ndarray, samples: int = 1000, seed: int = 0) -> list[float]:
    """``[mean, low, high]``: the mean and its 95% interval, resampling the replies (:func:`~.stats.bootstrap`).

    Args:
        values: ``[n]`` one value per reply.
        samples: bootstrap resamples.
        seed: the resampling seed.
    """
    interval = bootstrap(lambda idx: values[idx].mean(1), np.arange(len(values)), samples, seed)
    return [interval["value"], interval["ci_low"], interval["ci_high"]]


def rater_agreement(folder: Path) -> dict:
    """How far the two raters agree: exact and Spearman, for empathy and helpfulness.

    Args:
        folder: the rated sample's folder.
    """
    a, b = ({r["id"]: r for r in read_jsonl(folder / f"ratings_{name}.jsonl")} for name in RATERS)
    ids = sorted(a)
    agreement = {}
    for field in ("empathy", "helpfulness"):
        x, y = [a[i][field] for i in ids], [b[i][field] for i in ids]
        agreement[field] = {"exact": float(np.mean([p == q for p, q in zip(x, y)])), "spearman": spearman(x, y)}
    return agreement


def summarise(folder: str | Path, scorer_names: list[str]) -> dict:
    """Per system: the raters' helpfulness and gap, and each scorer's on the same replies.

    Args:
        folder: a folder with ``replies.jsonl``, ``replies_key.jsonl`` and both raters' files.
        scorer_names: calibrated empathy scorers to set beside the raters.

    Returns:
        ``{"n", "agreement", "constant_gap", "systems": {system: {"n", "raters_helpfulness",
        "helpfulness_scorer", "raters_gap", "raters_empathy", "raters_by_level", "<scorer>_gap"}}, "scorer_agreement"}``; the
        raters' helpfulness and gap as ``[mean, low, high]`` (95% interval over the system's replies); per scorer, its
        agreement with the raters reply by reply (Spearman, MAE, band agreement for the empathy scorers, and the MAE
        of the raters' median as a constant).
    """
    folder = Path(folder)
    items = load_rated_devset(folder)
    targets = np.array([LEVEL_TARGET[i.level] for i in items])
    people = np.array([i.reference for i in items])
    replies, contexts = [i.reply for i in items], [i.context for i in items]
    helpfulness = np.array(HelpfulnessScorer().score(replies, contexts))
    scored = {name: np.array([s.score for s in get_scorer(name).score(replies, contexts)]) for name in scorer_names}
    _, constant = best_constant(targets)  # the gap a constant reply would reach on these turns
    settings = json.loads((folder / "replies_settings.json").read_text())
    rated_help = np.array([i.helpfulness for i in items])
    levels = np.array([i.level for i in items])
    systems = {}
    present = {i.system for i in items}
    for system in [s for s in settings.get("systems", {}) if s in present] + sorted(present - set(settings.get("systems", {}))):
        rows = np.array([i.system == system for i in items])
        entry = {"n": int(rows.sum()),
                 "raters_helpfulness": mean_ci(rated_help[rows]),
                 "helpfulness_scorer": float(helpfulness[rows].mean()),
                 "raters_empathy": float(people[rows].mean()),
                 "raters_by_level": {level: float(people[rows & (levels == level)].mean()) if (rows & (levels == level)).any() else None
                                     for level in LEVEL_TARGET},
                 "raters_gap": mean_ci(np.abs(targets[rows] - people[rows]))}
        for name, scores in scored.items():
            entry[f"{name}_gap"] = float(np.abs(targets[rows] - scores[rows]).mean())
        systems[system] = entry
    # How far each scorer agrees with the raters reply by reply (these replies were never fitted).
    scorers = {name: {**agreement_with(scores, people), "constant_mae": median_mae(people)} for name, scores in scored.items()}
    scorers["helpfulness"] = helpfulness_agreement_with(helpfulness, rated_help)
    return {"n": len(items), "agreement": rater_agreement(folder), "scorer_agreement": scorers, "constant_gap": constant,
            "systems": systems, "settings": settings}


def render(summary: dict, scorer_names: list[str]) -> str:
    """The summary as Markdown.

    Args:
        summary: :func:`summarise` output.
        scorer_names: the scorers in it.
    """
    agree = summary["agreement"]
    lines = [
        f"# Rated sample: {summary['n']} replies of `{summary['settings'].get('from_run')}`, two raters", "",
        f"Raters' agreement: empathy exact {agree['empathy']['exact']:.0%}, Spearman {agree['empathy']['spearman'] or float('nan'):.2f}; "
        f"helpfulness exact {agree['helpfulness']['exact']:.0%}, Spearman {agree['helpfulness']['spearman'] or float('nan'):.2f}.", "",
        "Raters' gap: mean |target - the raters' mean of 1 + 4 s / 6| (s = mechanism total); a constant reply's best gap on "
        f"these turns: {summary['constant_gap']:.2f} (targets: low {LEVEL_TARGET['low']:.2f}, medium {LEVEL_TARGET['medium']:.2f}, "
        f"high {LEVEL_TARGET['high']:.2f}). Helpfulness 1-5 (the raters' mean; the helpfulness scorer's). "
        "Intervals: 95%, resampling each system's replies.", "",
        "| system | replies | raters' helpfulness | helpfulness scorer | raters' empathy | at low / medium / high turns | raters' gap | "
        + " | ".join(f"{n} gap" for n in scorer_names) + " |",
        "|---" * (7 + len(scorer_names)) + "|",
    ]
    def ci(value: list[float]) -> str:
        return f"{value[0]:.2f} [{value[1]:.2f}, {value[2]:.2f}]"

    for system, e in summary["systems"].items():
        by_level = " / ".join("-" if v is None else f"{v:.2f}" for v in e["raters_by_level"].values())
        lines.append(f"| {system} | {e['n']} | {ci(e['raters_helpfulness'])} | {e['helpfulness_scorer']:.2f} | {e['raters_empathy']:.2f} | "
                     f"{by_level} | {ci(e['raters_gap'])} | " + " | ".join(f"{e[f'{n}_gap']:.2f}" for n in scorer_names) + " |")
    lines += ["", "Each scorer against the raters, reply by reply (calibrated; these replies were never fitted):", "",
              "| scorer | Spearman | MAE | band agreement | MAE of the raters' median as a constant |", "|---|---|---|---|---|"]
    for name, a in summary["scorer_agreement"].items():
        band = f"{a['band_agreement']:.0%}" if "band_agreement" in a else "-"
        lines.append(f"| {name} | {a['spearman'] or float('nan'):.2f} | {a['mae']:.2f} | {band} | {a['constant_mae']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Entry point of ``python -m moe_empathy.eval.rated_sample``: writes ``rated_sample.md`` and ``.json`` in the folder."""
    parser = argparse.ArgumentParser(prog="python -m moe_empathy.eval.rated_sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, type=Path, help="the rated sample's folder (replies, key, both raters' files)")
    parser.add_argument("--scorers", default="embedding,lexical", help="calibrated empathy scorers to set beside the raters")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.scorers.split(",") if n.strip()]
    summary = summarise(args.dir, names)
    text = render(summary, names)
    atomic_write_text(args.dir / REPORT, text)
    atomic_write_text(args.dir / "rated_sample.json", json.dumps(summary, indent=1) + "\n")
    print(text)
    return summary


if __name__ == "__main__":
    main()
