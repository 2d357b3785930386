"""Warming the gate of a trained checkpoint up again, without training its experts again.

``python -m moe_empathy.train.gate_rewarm --model DIR --config CONFIG --out DIR`` runs the
config's ``gate_warmup`` stage (:func:`~.gate_warmup.warm_up_gate`) on the checkpoint's gate and
saves the checkpoint with the new gate (and the stage's log and features) to ``--out``.

This gives what a full retrain with the new warm-up would give only when the experts never
saw the gate: the checkpoint must come from a run with ``training.label_routing: 1`` and
``training.freeze_gate: true`` (every labelled turn routed by its label, the gate unchanged
by the joint run). The config's ``training`` section is checked for both, and the checkpoint's
gate must have the shape the config asks for.

``python -m moe_empathy.eval.own_replies`` runs the same stage on contexts that hold the
checkpoint's own replies (it passes :func:`rewarm` a ``context`` that plays the dialogues).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from moe_empathy.errors import run_command
from moe_empathy.turns import padding_id
from moe_empathy.utils import check_output_dir, replace_output_dir

from .baselines import encode_splits, ensure_corpus, load_tokenizer
from .config import TrainConfig, load_config, training_arguments
from .config_yaml import ConfigError
from .gate_warmup import context_replies, format_accuracy, warm_up_gate

GATE_KEYS = ("gate_layer", "gate_hidden_size", "gate_memory", "gate_memory_size", "gate_type")


class ContextReplies(Protocol):
    """Puts other replies into the warm-up corpus's contexts (see :func:`rewarm`)."""

    description: str  # what the replies are, for the closing line

    def __call__(self, records: list[dict], split: str) -> list[dict]:
        """One split's records (and the split's name) with other replies in the context."""

    def write(self, folder: Path) -> None:
        """Writes what the output should keep of the replies to ``folder``."""


def check_rewarmable(config: TrainConfig, model_config) -> None:
    """Refuses a config or checkpoint whose experts depend on the gate, or whose gate differs.

    Args:
        config: the training config the checkpoint was trained with (its ``gate_warmup`` may change).
        model_config: the checkpoint's :class:`~moe_empathy.MoeEmpathyConfig`.
    """
    if config.gate_warmup is None:
        raise ConfigError("the config has no gate_warmup section: nothing to warm the gate up with")
    if config.training.label_routing != 1.0 or not config.training.freeze_gate:
        raise ConfigError(
            f"training.label_routing is {config.training.label_routing} and training.freeze_gate is "
            f"{config.training.freeze_gate}: the experts trained under the gate's own routing, so a new gate "
            "would change what they were trained for; retrain with `moe-empathy train` instead"
        )
    wanted = {key: getattr(config.model, key) for key in GATE_KEYS if getattr(config.model, key, None) is not None}
    differs = {key: (getattr(model_config, key), value) for key, value in wanted.items() if getattr(model_config, key) != value}
    if differs:
        shown = ", ".join(f"{k}: checkpoint {have!r}, config {want!r}" for k, (have, want) in differs.items())
        raise ConfigError(f"the checkpoint's gate is not the config's ({shown}); pass the config it was trained with")


def rewarm(args: argparse.Namespace, context: Callable[..., ContextReplies] | None = None) -> dict:
    """Runs the command line: warm-up on the checkpoint's gate, then saves the model to ``args.out``.

    Args:
        args: the parsed command line (:func:`build_parser`).
        context: given the loaded model and its tokenizer, what puts the replies into the warm-up
            dialogues' contexts; None: the config's ``gate_warmup.context_replies``.
    """
    from moe_empathy.loading import load_model_and_tokenizer

    config = load_config(args.config)
    check_output_dir(args.out, args.overwrite, "gate rewarm")  # before the long part, not after
    model, model_tokenizer, _ = load_model_and_tokenizer(args.model)
    check_rewarmable(config, model.config)
    tokenizer = load_tokenizer(config)
    warmup = config.gate_warmup
    training_args = training_arguments(config, str(args.out), 0)
    seed = config.training.seed
    corpus = ensure_corpus(warmup.data, training_args, config.model.base)
    replies = context(model, model_tokenizer) if context is not None else None
    splits = encode_splits(config, tokenizer, corpus, warmup.data, replies if replies is not None else context_replies(warmup, seed))
    pad = padding_id(tokenizer)
    with replace_output_dir(args.out, args.overwrite, "gate rewarm") as staging:
        log = warm_up_gate(model.train(), splits, pad, warmup, seed, staging)
        model.eval().save_pretrained(staging, compact=True)
        if replies is not None:
            replies.write(staging)
    described = replies.description if replies is not None else f"{warmup.context_replies} replies"
    print(f"gate warmed up again ({described} in context): test accuracy {format_accuracy(log['test_accuracy'])}; wrote {args.out}")
    return log


def build_parser(prog: str = "moe_empathy.train.gate_rewarm", description: str = __doc__.split("\n")[0]) -> argparse.ArgumentParser:
    """The command line's parser (``--model``, ``--config``, ``--out``, ``--overwrite``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--model", required=True, help="the trained gated checkpoint")
    parser.add_argument("--config", required=True, help="the YAML config it was trained with, its gate_warmup section as wanted now")
    parser.add_argument("--out", required=True, type=Path, help="where the checkpoint with the new gate goes")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output of this command in --out")
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(rewarm, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
