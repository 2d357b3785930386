"""Refits the stored calibration curves of some scorers (:mod:`.calibration`)::

    python -m moe_empathy.eval.fit_calibration --scorers lexical,embedding,judge,helpfulness

A command of its own because it builds the scorers by name (:mod:`.scorers`), which read the
curves through :mod:`.calibration`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from moe_empathy.utils import atomic_write_text

from .calibration import calibration_path, fit_calibration, load_curves
from .helpfulness import CURVE_KEY, HelpfulnessScorer, fit_helpfulness_curve
from .scorers import SCORERS, get_scorer


def main(argv: list[str] | None = None) -> dict:
    """Refits the stored curves of some scorers (the others stay as they are).

    Args:
        argv: command-line arguments (default: ``sys.argv``).
    """
    parser = argparse.ArgumentParser(prog="python -m moe_empathy.eval.fit_calibration", description=main.__doc__)
    parser.add_argument("--scorers", default="lexical,embedding", help=f"comma-separated, from: {', '.join([*SCORERS, CURVE_KEY])}")
    parser.add_argument("--out", default=None, help="calibration file to update (default: the packaged eval/data/calibration.jsonl)")
    args = parser.parse_args(argv)
    path = Path(args.out) if args.out else calibration_path()
    stored = load_curves(path)
    for name in (n.strip() for n in args.scorers.split(",") if n.strip()):
        if name == CURVE_KEY:
            stored[CURVE_KEY] = {"scorer": CURVE_KEY, **fit_helpfulness_curve(HelpfulnessScorer(calibrated=False))}
            print(f"{CURVE_KEY}: {len(stored[CURVE_KEY]['x'])} knots")
            continue
        scorer = get_scorer(name, calibrated=False)
        stored[scorer.calibration_key] = {"scorer": scorer.calibration_key, **fit_calibration(scorer)}
        print(f"{scorer.calibration_key}: {len(stored[scorer.calibration_key]['x'])} knots")
    atomic_write_text(path, "".join(json.dumps(stored[k]) + "\n" for k in sorted(stored)))
    print(f"wrote {path}")
    return stored


if __name__ == "__main__":
    main()
