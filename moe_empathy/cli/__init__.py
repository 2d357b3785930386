"""The ``moe-empathy`` command: ``demo``, ``chat``, ``info``, ``synth``, ``train``, ``eval``, ``inspect``, ``bench``.

One way to add a command: an entry in :data:`COMMANDS` with its help line and the
``"module:function"`` of a function ``add_arguments(parser)`` that adds the command's
arguments to the parser made here and sets its ``func`` default to the function that runs it
(``run(args)``). Only the module of the command
being run is imported, so ``moe-empathy --help`` answers at once (torch, transformers and rich
are not loaded). Expected errors end as one line on stderr and exit code 2 (:mod:`.errors`).

This package is the top layer: it imports ``moe_empathy``, ``train`` and ``eval``; none of them
imports it.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass, field

from .errors import ArgumentParser, UsageError, report_user_error, run_command

__all__ = ["COMMANDS", "Command", "build_parser", "main", "run_command"]


@dataclass(frozen=True)
class Command:
    """One ``moe-empathy`` command, or a group of them.

    Args:
        help: its line in the ``--help`` listing.
        registrar: ``"module:function"`` of its ``add_arguments(parser)`` (a leaf command).
        subcommands: name -> :class:`Command` of a group's members (``eval run``, ``bench model``).
    """

    help: str
    registrar: str = ""
    subcommands: dict[str, Command] = field(default_factory=dict)


COMMANDS = {
    "demo": Command("run the model on scripted dialogues whose context shifts (the main job)", "moe_empathy.cli.demo:add_arguments"),
    "chat": Command("chat in the terminal, seeing the gate's weights for each reply", "moe_empathy.cli.chat:add_arguments"),
    "info": Command("versions, kernel backends and a model summary", "moe_empathy.cli.info:add_arguments"),
    "synth": Command("generate synthetic multi-turn empathy dialogues", "moe_empathy.train.synth:add_arguments"),
    "train": Command("train the experts and the gate (or a baseline) from a YAML config", "moe_empathy.train.trainer:add_arguments"),
    "eval": Command("evaluation commands: run, rescore, scorers", subcommands={
        "run": Command("roll out systems on held-out dialogues; write report.md, metrics.json and plots",
                       "moe_empathy.eval.cli:add_run_arguments"),
        "rescore": Command("score a finished run's replies again (other or changed scorers) into a new report",
                           "moe_empathy.eval.cli:add_rescore_arguments"),
        "scorers": Command("Spearman correlation of the empathy scorers with hand labels",
                           "moe_empathy.eval.validate_scorers:add_arguments"),
    }),
    "inspect": Command("show one dialogue's per-turn gate weights (terminal table and PNG)", "moe_empathy.eval.cli:add_inspect_arguments"),
    "bench": Command("benchmarks: kernels, model, train, decode, prefix", subcommands={
        "kernels": Command("microbenchmark of the multi-LoRA kernels", "moe_empathy.kernels.bench:add_arguments"),
        "model": Command("generation and training speed against peft LoRA and X-LoRA", "moe_empathy.bench_model:add_arguments"),
        "train": Command("training throughput of the gated model against a single LoRA and peft X-LoRA",
                         "moe_empathy.train.bench_train:add_arguments"),
        "decode": Command("per-token decode overhead of the gated model against the base", "moe_empathy.bench_decode:add_arguments"),
        "prefix": Command("training speed on a cached frozen prefix against the full forward",
                          "moe_empathy.train.bench_prefix:add_arguments"),
    }),
}


def _register(subparsers, name: str, command: Command, words: list[str] | None) -> None:
    """Adds ``command`` to ``subparsers``: in full (its registrar's module imported) when ``words``
    starts with its name or is None, else with its help line only."""
    if words is not None and words[:1] != [name]:
        subparsers.add_parser(name, help=command.help)
    elif command.subcommands:
        group = subparsers.add_parser(name, help=command.help, description=command.help)
        members = group.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
        for member_name, member in command.subcommands.items():
            _register(members, member_name, member, None if words is None else words[1:])
    else:
        module, function = command.registrar.split(":")
        parser = subparsers.add_parser(name, help=command.help, description=command.help)
        getattr(importlib.import_module(module), function)(parser)


def build_parser(words: list[str] | None = None) -> ArgumentParser:
    """The ``moe-empathy`` argument parser.

    Args:
        words: the command line's positional words (``["bench", "model"]``): only the commands
            they name are registered in full, importing their modules; the others are listed with
            their help only. None: every command in full.
    """
    parser = ArgumentParser(prog="moe-empathy", description="Empathy-level LoRA experts behind a per-turn gate.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        _register(subparsers, name, command, words)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``moe-empathy``.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0, 2 for a user error (one line on stderr), 130 for Ctrl-C.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(words=[a for a in argv if not a.startswith("-")])
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        return report_user_error(err)
    return run_command(args.func, args)
