"""Joint training of the experts and the gate with ``transformers.Trainer`` (accelerate underneath).

``moe-empathy train --config train/configs/NAME.yaml`` or, for several processes,
``accelerate launch -m moe_empathy.train.trainer --config ...``. The ``method`` of the
config picks the gated model or a baseline (:mod:`.baselines`); all of them share the data
pipeline, the objective and checkpoints (:mod:`.hf_trainer`), the callbacks (:mod:`.callbacks`)
and the run folder's layout (:mod:`.run`). This module starts a run: it checks the config
against the run folder (a new run, or a resume with the config it was started with) and holds
the command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from moe_empathy.errors import run_command
from moe_empathy.utils import atomic_write_text

from .baselines import run_method
from .config import BUDGET_KEYS, TrainConfig, changed_keys, load_config
from .config_yaml import merge_config_values
from .hf_trainer import TRAINER_STATE_NAME

CONFIG_RECORD = "config.yaml"  # the config a run was started with (written once, checked on resume)


def train(
    config: TrainConfig,
    output_dir: str | os.PathLike | None = None,
    max_steps: int | None = None,
    resume: str | os.PathLike | None = None,
) -> dict:
    """Runs the training a config describes (the gated model or a baseline).

    Args:
        config: the run's config.
        output_dir: overrides ``training.output_dir``.
        max_steps: overrides ``training.max_steps``.
        resume: a checkpoint folder, or a run folder to resume from its newest checkpoint.

    Returns:
        The run's summary (also written to ``output_dir/summary.json``).
    """
    config.validate()
    output_dir = Path(output_dir or config.training.output_dir)
    max_steps = max_steps if max_steps is not None else config.training.max_steps
    if max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {max_steps}")
    if resume is not None:
        check_resume_config(config, resume)
    elif any(output_dir.glob("checkpoint-*")) or any(output_dir.glob("runs/*/checkpoint-*")):
        raise FileExistsError(
            f"{output_dir} already holds the checkpoints of a run; pass --resume {output_dir} to continue it "
            "(with the config it was started with), or choose another --output"
        )
    if resume is None or not (output_dir / CONFIG_RECORD).is_file():
        atomic_write_text(output_dir / CONFIG_RECORD, yaml.safe_dump(config.to_dict(), sort_keys=False))
    return run_method(config, output_dir, max_steps, resume)


def check_resume_config(config: TrainConfig, resume: str | os.PathLike) -> None:
    """Refuses to resume with a config that differs from the run's recorded one (``config.yaml``
    of the run folder) in anything but the step budget (:data:`.config.BUDGET_KEYS`).

    Args:
        config: the config given now.
        resume: a ``checkpoint-N`` folder or a run folder.
    """
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {path} is not a folder; pass a run folder or one of its checkpoint-N folders")
    run_dir = path.parent if (path / TRAINER_STATE_NAME).is_file() else path
    record = run_dir / CONFIG_RECORD
    if not record.is_file():
        raise FileNotFoundError(
            f"{record} not found: it records the config that produced the checkpoints of {run_dir}; "
            "copy that run's config.yaml there to resume"
        )
    # A key added to the config since the run started (training.prefix_cache...) counts as its default.
    recorded = merge_config_values(TrainConfig().to_dict(), yaml.safe_load(record.read_text()))
    changed = changed_keys(recorded, config.to_dict())
    if changed:
        raise ValueError(
            f"the config differs from the one the run in {run_dir} was started with ({record}) in {changed}; "
            f"resume with that config (only {', '.join(BUDGET_KEYS)} may change), or start a new run in another --output"
        )


# --------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``train``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--config", required=True, help="a YAML training config, e.g. train/configs/tiny.yaml")
    parser.add_argument("--output", default=None, help="run folder (default: training.output_dir of the config)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: training.max_steps)")
    parser.add_argument("--resume", default=None, help="a checkpoint-N folder, or a run folder to resume from its newest checkpoint")
    parser.set_defaults(func=run_train_command)


def run_train_command(args: argparse.Namespace) -> dict:
    """Runs the ``train`` subcommand.

    Args:
        args: the parsed arguments of :func:`add_arguments`.
    """
    config = load_config(args.config)
    summary = train(config, output_dir=args.output, max_steps=args.max_steps, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        test = summary.get("test", {})
        shown = {k: round(v, 4) for k, v in test.items() if isinstance(v, float) and ("loss" in k or "accuracy" in k)}
        print(f"trained {summary['steps']} steps in {summary['train_seconds']} s; test: {shown}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_empathy.train.trainer --config ...`` (the entry point for ``accelerate launch``);
    returns the exit code (user errors end as one line, see :func:`moe_empathy.errors.run_command`)."""
    parser = argparse.ArgumentParser(prog="moe_empathy.train.trainer", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_command(run_train_command, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
