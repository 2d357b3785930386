"""The ``--model`` flag of ``demo``, ``chat`` and ``info``, and loading the model it names."""

from __future__ import annotations

import argparse

MODEL_HELP = (
    "model folder written by save_pretrained or `moe-empathy train` "
    "(default: $MOE_EMPATHY_CHECKPOINT, else the shipped checkpoint)"
)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    """Adds ``--model``.

    Args:
        parser: the command's parser.
    """
    parser.add_argument("--model", default=None, help=MODEL_HELP)


def load(args: argparse.Namespace):
    """``(model, tokenizer, description)`` of ``args.model`` (None: the default checkpoint).

    Args:
        args: the parsed command line.
    """
    from moe_empathy.loading import load_model_and_tokenizer

    return load_model_and_tokenizer(args.model)


def console():
    """A rich console without syntax highlighting."""
    from rich.console import Console

    return Console(highlight=False)
