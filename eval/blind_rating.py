"""Blind rating of forced-expert replies: items a rater reads without their source, and the
table made once the ratings are in.

``python -m moe_empathy.eval.blind_rating items --probe shipped=A/probe.json --probe v5=B/probe.json --out DIR``
writes ``blind_items.jsonl`` (id, prompt, user message, reply: nothing that says where a reply
came from) and ``blind_key.jsonl`` (id -> every (source, expert) that gave that exact reply).
The rater follows ``eval/data/rating/RUBRIC.md`` and writes ``blind_ratings.jsonl`` (one line
per id: ``empathy`` 1-5, ``helpfulness`` 1-5, ``flags``), without seeing any score or the key.

``python -m moe_empathy.eval.blind_rating table --dir DIR`` then joins the ratings with the key
and writes ``blind_table.md``: mean empathy and helpfulness by source and expert, high minus
low, the prompts rated in order (low <= medium <= high, low < high) and the flags of the high
expert's replies.

``python -m moe_empathy.eval.blind_rating agreement --dir A --dir B ... --scorers embedding`` reads
several rated folders (each its own rater; a reply is the same item wherever its prompt and text
match): how far each pair of raters agrees on the replies they share, and how far each calibrated
scorer (and the helpfulness scorer, on helpfulness) agrees with the raters' mean over every distinct reply.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from moe_empathy.train.taxonomy import MECHANISMS
from moe_empathy.utils import atomic_write_text

from .scoring import mechanisms_to_score
from .validate_scorers import agreement_with, helpfulness_agreement_with, spearman

ITEMS, KEY, RATINGS, TABLE = "blind_items.jsonl", "blind_key.jsonl", "blind_ratings.jsonl", "blind_table.md"
LEVELS = ("low", "medium", "high")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; write it first (see `python -m moe_empathy.eval.blind_rating --help`)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def parse_probe(spec: str) -> tuple[str, Path]:
    """``LABEL=PATH`` of a ``--probe`` argument, checked."""
    label, sep, path = spec.partition("=")
    if not sep or not label or not path:
        raise ValueError(f"--probe takes LABEL=PATH/probe.json, got {spec!r}")
    return label, Path(path)


def build_items(probes: dict[str, dict], seed: int) -> tuple[list[dict], list[dict]]:
    """The shuffled, source-free items and their key.

    Args:
        probes: source label -> an expert probe's result (``probe.json`` of
            :mod:`.expert_probe`: ``prompts`` with ``id``, ``task``, ``messages``, ``replies``).
        seed: seed of the shuffle.

    Returns:
        ``(items, key)``, both ordered by id. A reply given word for word by several sources
        (the base model in every probe, say) is one item whose key lists all of them.
    """
    merged: dict[tuple[str, str], dict] = {}
    for label, probe in probes.items():
        for prompt in probe["prompts"]:
            for expert, reply in prompt["replies"].items():
                item = merged.setdefault(
                    (prompt["id"], reply),
                    {"prompt_id": prompt["id"], "task": prompt["task"], "user": prompt["messages"][-1]["content"], "reply": reply, "sources": []},
                )
                item["sources"].append([label, expert])
    entries = list(merged.values())
    random.Random(seed).shuffle(entries)
    items, key = [], []
    for index, entry in enumerate(entries, start=1):
        item_id = f"q{index:03d}"
        items.append({"id": item_id, **{k: entry[k] for k in ("prompt_id", "task", "user", "reply")}})
        key.append({"id": item_id, "prompt_id": entry["prompt_id"], "sources": entry["sources"]})
    return items, key


def summarise(key: list[dict], ratings: list[dict]) -> dict:
    """Means and order counts of rated items.

    Args:
        key: the items' key (:func:`build_items`).
        ratings: the rater's lines (``id``, ``empathy``, ``helpfulness``, ``flags``).

    Returns:
        ``{"means": {source: {expert: {"empathy", "helpfulness", "n"}}}, "high_minus_low": {source: x},
        "ordered": {source: [in order, prompts]}, "high_flags": {source: {flag: count}}}``.
    """
    by_id = {r["id"]: r for r in ratings}
    missing = [k["id"] for k in key if k["id"] not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} items have no rating (first: {missing[0]}); rate every item of {ITEMS}")
    scores: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    per_prompt: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    flags: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for entry in key:
        rating = by_id[entry["id"]]
        for source, expert in entry["sources"]:
            scores[source][expert].append(rating)
            per_prompt[source][entry["prompt_id"]][expert] = rating["empathy"]
            if expert == "high":
                for flag in rating.get("flags", []):
                    flags[source][flag] += 1
    means = {
        source: {
            expert: {
                "empathy": statistics.fmean(r["empathy"] for r in rated),
                "helpfulness": statistics.fmean(r["helpfulness"] for r in rated),
                "n": len(rated),
            }
            for expert, rated in experts.items()
        }
        for source, experts in scores.items()
    }
    high_minus_low, ordered = {}, {}
    for source, experts in means.items():
        if all(level in experts for level in LEVELS):
            high_minus_low[source] = experts["high"]["empathy"] - experts["low"]["empathy"]
            prompts = [p for p in per_prompt[source].values() if all(level in p for level in LEVELS)]
            in_order = sum(p["low"] <= p["medium"] <= p["high"] and p["low"] < p["high"] for p in prompts)
            ordered[source] = [in_order, len(prompts)]
    return {"means": means, "high_minus_low": high_minus_low, "ordered": ordered, "high_flags": {s: dict(f) for s, f in flags.items()}}


def markdown(summary: dict) -> str:
    """The summary as Markdown tables."""
    experts = ["base", *LEVELS]
    lines = ["| | " + " | ".join(experts) + " |", "| --- |" + " --- |" * len(experts)]
    for measure in ("empathy", "helpfulness"):
        for source, by_expert in summary["means"].items():
            cells = [f"{by_expert[e][measure]:.2f}" if e in by_expert else "" for e in experts]
            lines.append(f"| {measure}, {source} | " + " | ".join(cells) + " |")
    lines += ["", "| source | high - low (empathy) | prompts in order | flags on high replies |", "| --- | --- | --- | --- |"]
    for source, gap in summary["high_minus_low"].items():
        in_order, total = summary["ordered"][source]
        flags = ", ".join(f"{f} {n}" for f, n in sorted(summary["high_flags"].get(source, {}).items())) or "none"
        lines.append(f"| {source} | {gap:.2f} | {in_order} of {total} | {flags} |")
    return "\n".join(lines) + "\n"


def rated_replies(folder: Path) -> dict[tuple[str, str], tuple[dict, dict]]:
    """A rated folder's replies: ``(prompt id, reply text) -> (item, rating)``."""
    ratings = {r["id"]: r for r in _read_jsonl(folder / RATINGS)}
    items = _read_jsonl(folder / ITEMS)
    missing = [i["id"] for i in items if i["id"] not in ratings]
    if missing:
        raise ValueError(f"{folder / RATINGS} has no rating for {len(missing)} items (first: {missing[0]})")
    return {(i["prompt_id"], i["reply"]): (i, ratings[i["id"]]) for i in items}


def reference(rating: dict) -> float:
    """A rating's reference on the 1-5 scale, from its mechanisms (as the rating set's, ``1 + 4 s / 6``)."""
    return mechanisms_to_score({m: rating[m] for m in MECHANISMS})


def rater_agreement(folders: dict[str, dict]) -> list[dict]:
    """Each pair of raters on the replies both rated: Spearman of the references, exact
    agreement of the whole-number empathy rating.

    Args:
        folders: rater name -> :func:`rated_replies`.
    """
    pairs = []
    names = list(folders)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            shared = sorted(set(folders[a]) & set(folders[b]))
            if not shared:
                continue
            ra, rb = ([folders[n][k][1] for k in shared] for n in (a, b))
            pairs.append({
                "raters": [a, b], "n": len(shared),
                "spearman": spearman([reference(r) for r in ra], [reference(r) for r in rb]),
                "exact_empathy": float(np.mean([x["empathy"] == y["empathy"] for x, y in zip(ra, rb)])),
            })
    return pairs


def distinct_rated(folders: dict[str, dict]) -> list[tuple[dict, list[dict]]]:
    """Every distinct rated reply (in prompt and text order) with all its raters' ratings.

    Args:
        folders: rater name -> :func:`rated_replies`.
    """
    merged: dict[tuple[str, str], tuple[dict, list[dict]]] = {}
    for replies in folders.values():
        for key, (item, rating) in replies.items():
            merged.setdefault(key, (item, []))[1].append(rating)
    return [merged[k] for k in sorted(merged)]


def scorer_agreement(folders: dict[str, dict], scorer) -> dict:
    """A scorer against the raters' mean reference over every distinct rated reply.

    Args:
        folders: rater name -> :func:`rated_replies`.
        scorer: a scorer (:func:`~.scorers.get_scorer`).
    """
    rated = distinct_rated(folders)
    scores = [s.score for s in scorer.score([i["reply"] for i, _ in rated], [[{"role": "user", "content": i["user"]}] for i, _ in rated])]
    refs = [statistics.fmean(reference(r) for r in ratings) for _, ratings in rated]
    return agreement_with(scores, refs)


def helpfulness_agreement(folders: dict[str, dict]) -> dict:
    """The calibrated helpfulness scorer against the raters' mean helpfulness over every distinct reply.

    Args:
        folders: rater name -> :func:`rated_replies`.

    Returns:
        ``{"spearman", "mae", "constant_mae", "n"}``; the constant predicts the raters' median.
    """
    from .helpfulness import HelpfulnessScorer

    rated = distinct_rated(folders)
    people = np.array([statistics.fmean(r["helpfulness"] for r in ratings) for _, ratings in rated])
    scores = np.array(HelpfulnessScorer().score([i["reply"] for i, _ in rated], [i["user"] for i, _ in rated]))
    return helpfulness_agreement_with(scores, people)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m moe_empathy.eval.blind_rating``."""
    parser = argparse.ArgumentParser(prog="python -m moe_empathy.eval.blind_rating", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    items = commands.add_parser("items", help="write the blind items and their key")
    items.add_argument("--probe", action="append", required=True, help="LABEL=PATH/probe.json (repeat for each source)")
    items.add_argument("--out", required=True, type=Path, help="folder for blind_items.jsonl and blind_key.jsonl")
    items.add_argument("--seed", type=int, default=7, help="seed of the shuffle")
    table = commands.add_parser("table", help="join the ratings with the key; write blind_table.md")
    table.add_argument("--dir", required=True, type=Path, help="the folder of the items, key and ratings")
    agree = commands.add_parser("agreement", help="raters against each other, and scorers against the raters")
    agree.add_argument("--dir", action="append", required=True, type=Path, help="a rated folder (repeat for each rater)")
    agree.add_argument("--scorers", default="embedding", help="comma-separated calibrated scorers ('' for none)")
    args = parser.parse_args(argv)
    if args.command == "agreement":
        from .scorers import get_scorer

        folders = {str(d): rated_replies(d) for d in args.dir}
        result = {"raters": rater_agreement(folders),
                  "scorers": {n: scorer_agreement(folders, get_scorer(n)) for n in filter(None, args.scorers.split(","))},
                  "helpfulness": helpfulness_agreement(folders)}
        print(json.dumps(result, indent=1))
        return 0
    if args.command == "items":
        probes = {}
        for spec in args.probe:
            label, path = parse_probe(spec)
            probes[label] = json.loads(path.read_text())
        item_rows, key_rows = build_items(probes, args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        _write_jsonl(args.out / ITEMS, item_rows)
        _write_jsonl(args.out / KEY, key_rows)
        print(f"wrote {len(item_rows)} items to {args.out / ITEMS} and their key to {args.out / KEY}")
        return 0
    summary = summarise(_read_jsonl(args.dir / KEY), _read_jsonl(args.dir / RATINGS))
    text = markdown(summary)
    atomic_write_text(args.dir / TABLE, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
