"""The gate's accuracy teacher-forced on long held-out dialogues: its choice at every turn when
the context holds the scripted replies (free rollouts, where it holds the model's own replies,
are ``eval run``'s).

``python -m moe_empathy.eval.teacher_forced --model DIR`` scores the gate on the same held-out
scripts ``eval run`` plays by default (the generator's test split, 30 turns, the evaluation's
seed): accuracy over all turns and by turn position, and the share of level shifts it follows
(at a turn whose label differs from the previous turn's, the top expert is the new label).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from moe_empathy.errors import run_command
from moe_empathy.train.collate import encode_dialogue
from moe_empathy.train.gate_warmup import TurnFeatures, accuracy_by_turn, format_accuracy, gate_step, turn_features
from moe_empathy.turns import find_turn_markers, padding_id
from moe_empathy.utils import atomic_write_text

from .dialogues import EVAL_SEED, select_dialogues, synthesise_split


def shifts_followed(logits: torch.Tensor, features: TurnFeatures) -> tuple[int, int]:
    """How many level shifts the gate's top expert follows, of how many.

    Args:
        logits: ``[dialogues, turns, E]`` the gate's logits.
        features: the dialogues' features (labels and readable-token counts).
    """
    labels = features.labels  # [n, T]
    known = features.labelled
    shift = known[:, 1:] & known[:, :-1] & (labels[:, 1:] != labels[:, :-1])  # [n, T - 1]
    followed = shift & (logits[:, 1:].argmax(-1) == labels[:, 1:])
    return int(followed.sum()), int(shift.sum())


@torch.no_grad()
def gate_accuracy(model, tokenizer, records: list[dict]) -> dict:
    """Teacher-forced gate accuracy (all turns and by position) and shifts followed.

    Args:
        model: the gated model.
        tokenizer: its tokenizer.
        records: dialogue records with labelled assistant turns.
    """
    markers = find_turn_markers(tokenizer)
    rows = [encode_dialogue(r, tokenizer, markers, model.config.expert_names, 10**6) for r in records]
    pad = padding_id(tokenizer)
    features = turn_features(model.eval(), rows, pad)
    _, logits = gate_step(model, features)  # [n, T, E]
    followed, shifts = shifts_followed(logits, features)
    return {
        "dialogues": len(rows),
        "turns": int(features.labelled.sum()),
        "accuracy": accuracy_by_turn(model, features),
        "shifts_followed": followed / shifts if shifts else None,
        "shifts": shifts,
    }


def run(args: argparse.Namespace) -> dict:
    """Runs the command line's measurement and prints (and optionally writes) it."""
    from moe_empathy.loading import load_model_and_tokenizer

    model, tokenizer, description = load_model_and_tokenizer(args.model)
    records = select_dialogues(synthesise_split(args.split, args.dialogues, args.turns, args.seed), args.dialogues, args.turns)
    result = {"model": description, "split": args.split, "seed": args.seed, **gate_accuracy(model, tokenizer, records)}
    by_turn = format_accuracy(result["accuracy"])
    print(f"teacher-forced gate accuracy on {result['dialogues']} x {args.turns}-turn {args.split} dialogues: {by_turn}; "
          f"shifts followed {result['shifts_followed']:.1%} of {result['shifts']}")
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe_empathy.eval.teacher_forced", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="gated model folder")
    parser.add_argument("--split", default="test", help="split of the synthesised scripts (default test)")
    parser.add_argument("--dialogues", type=int, default=40, help="dialogues (default 40)")
    parser.add_argument("--turns", type=int, default=30, help="turns per dialogue (default 30)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of the synthesised scripts (default: eval run's)")
    parser.add_argument("--json", default=None, help="also write the result to this JSON file")
    return run_command(run, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
