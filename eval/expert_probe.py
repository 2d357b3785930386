"""Forced experts on fresh, hand-written prompts: does each expert change the empathy, and in order?

``python -m moe_empathy.eval.expert_probe --model DIR --out DIR`` answers each prompt of
``eval/data/expert_probe.jsonl`` (twelve single user messages over the eight tasks, written for
this probe, not by the generator) four ways: the base model (experts off) and each expert
forced, greedy, with the repeat guard of the model's ``generation_config.json``. It scores every
reply with the evaluation's calibrated scorer and writes ``probe.json`` (replies and scores) and
``probe.md`` (the replies in full, for reading, then the scores), with, per prompt, whether the
experts come out in their order (``low < medium < high``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import LogitsProcessorList

from moe_empathy.errors import run_command
from moe_empathy.generation import RepeatGuardConfig
from moe_empathy.turns import encode_chat
from moe_empathy.utils import atomic_write_text, read_jsonl

from .scorers import SCORERS, get_scorer

PROMPTS = Path(__file__).resolve().parent / "data" / "expert_probe.jsonl"
BASE = "base"


def load_prompts(path: str | Path = PROMPTS) -> list[dict]:
    """The probe's prompts: ``id``, ``task`` and ``messages`` (a chat ending with a user message).

    Args:
        path: a JSON-lines file.
    """
    prompts = read_jsonl(path)
    for p in prompts:
        if not p.get("messages") or p["messages"][-1].get("role") != "user":
            raise ValueError(f"{path}: prompt {p.get('id', '?')} must end with a user message")
    return prompts


@torch.no_grad()
def replies(model, tokenizer, prompts: list[dict], system: str, max_new_tokens: int) -> list[str]:
    """One greedy reply per prompt from the base (``system`` = ``"base"``) or one forced expert.

    Args:
        model: the gated model.
        tokenizer: its tokenizer.
        prompts: from :func:`load_prompts`.
        system: ``"base"`` or an expert name.
        max_new_tokens: reply length cap.
    """
    enc = encode_chat(tokenizer, [p["messages"] for p in prompts], add_generation_prompt=True)
    width = enc["input_ids"].shape[1]
    guard = RepeatGuardConfig.from_generation_config(model.generation_config)
    processors = LogitsProcessorList([guard.processor([[] for _ in prompts], width)])  # single-turn: no earlier replies
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")}
    control = model.disable_experts() if system == BASE else model.force_gate(system)
    with control:
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, logits_processor=processors, pad_token_id=tokenizer.pad_token_id
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def probe(model, tokenizer, prompts: list[dict], scorer_name: str, max_new_tokens: int) -> dict:
    """Replies and scores of the base and every forced expert on every prompt.

    Args:
        model, tokenizer: the gated model and its tokenizer.
        prompts: from :func:`load_prompts`.
        scorer_name: a scorer of :data:`.scorers.SCORERS` (calibrated).
        max_new_tokens: reply length cap.

    Returns:
        ``prompts`` (each with ``replies`` and ``scores`` by system, and ``ordered``) and
        ``summary`` (mean score by system, high minus low, prompts in order).
    """
    scorer = get_scorer(scorer_name)
    systems = [BASE, *model.config.expert_names]
    contexts = [p["messages"] for p in prompts]
    rows = [dict(p) for p in prompts]
    for system in systems:
        texts = replies(model, tokenizer, prompts, system, max_new_tokens)
        scores = [s.score for s in scorer.score(texts, contexts)]
        for row, text, score in zip(rows, texts, scores):
            row.setdefault("replies", {})[system] = text
            row.setdefault("scores", {})[system] = score
    experts = model.config.expert_names
    for row in rows:
        ladder = [row["scores"][name] for name in experts]
        row["ordered"] = all(a < b for a, b in zip(ladder, ladder[1:]))
    means = {s: sum(r["scores"][s] for r in rows) / len(rows) for s in systems}
    summary = {
        "scorer": scorer_name,
        "mean_score": means,
        "high_minus_low": means[experts[-1]] - means[experts[0]],
        "ordered_prompts": sum(r["ordered"] for r in rows),
        "prompts": len(rows),
        "max_new_tokens": max_new_tokens,
    }
    return {"summary": summary, "prompts": rows}


def markdown(result: dict) -> str:
    """``probe.md``: every reply in full (to read before the scores), then the score table."""
    rows, summary = result["prompts"], result["summary"]
    systems = list(summary["mean_score"])
    lines = ["# Forced experts on fresh prompts", "", "## Replies", ""]
    for row in rows:
        lines += [f"### {row['id']} ({row['task']})", "", f"> {row['messages'][-1]['content']}", ""]
        lines += [f"- **{s}**: {row['replies'][s]}" for s in systems] + [""]
    lines += [f"## Scores ({summary['scorer']}, calibrated, 1-5)", "", "| prompt | " + " | ".join(systems) + " | in order |"]
    lines.append("| --- " * (len(systems) + 2) + "|")
    for row in rows:
        lines.append(f"| {row['id']} | " + " | ".join(f"{row['scores'][s]:.2f}" for s in systems) + f" | {'yes' if row['ordered'] else 'no'} |")
    lines.append("| **mean** | " + " | ".join(f"**{summary['mean_score'][s]:.2f}**" for s in systems) + f" | {summary['ordered_prompts']} of {summary['prompts']} |")
    lines += ["", f"High minus low: {summary['high_minus_low']:.2f} points.", ""]
    return "\n".join(lines)


def run_probe(args: argparse.Namespace) -> dict:
    """Runs the probe of the command line and writes ``probe.json`` and ``probe.md``."""
    from moe_empathy.loading import load_model_and_tokenizer

    model, tokenizer, _ = load_model_and_tokenizer(args.model)
    result = probe(model, tokenizer, load_prompts(args.prompts), args.scorer, args.max_new_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "probe.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "probe.md", markdown(result))
    s = result["summary"]
    means = ", ".join(f"{k} {v:.2f}" for k, v in s["mean_score"].items())
    print(f"{means}; high - low {s['high_minus_low']:.2f}; in order on {s['ordered_prompts']} of {s['prompts']} prompts")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe_empathy.eval.expert_probe", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="gated model folder")
    parser.add_argument("--out", required=True, help="output folder (probe.json, probe.md)")
    parser.add_argument("--prompts", default=str(PROMPTS), help="JSON-lines prompts (id, task, messages)")
    parser.add_argument("--scorer", default="embedding", choices=sorted(SCORERS), help="the calibrated scorer")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="reply length cap")
    return run_command(run_probe, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
