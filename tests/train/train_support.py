"""Helpers of the training tests: the shipped configs and runs of the tiny config (the fixtures are in conftest.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from moe_empathy.train.config import TrainConfig, config_from_dict

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"
# One thread per process: the multi-process runs share the machine's cores.
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_values(corpus: Path, **sections) -> dict:
    """The shipped tiny config's values on ``corpus``, with section overrides such as
    ``training={"max_steps": 4}``, ``method="single_lora"``."""
    values = yaml.safe_load((CONFIGS / "tiny.yaml").read_text())
    values["data"]["path"] = str(corpus)
    values["data"].pop("synthesize")
    values["training"]["progress_bar"] = False
    for key, value in sections.items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value
    return values


def tiny_config(corpus: Path, **sections) -> TrainConfig:
    """The shipped tiny config on ``corpus``, with section overrides (see :func:`tiny_values`)."""
    return config_from_dict(tiny_values(corpus, **sections))


def train_losses(run: Path) -> dict[int, float]:
    """``{step: loss}`` of the training steps a run logged to its ``log.jsonl``."""
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return {log["step"]: log["loss"] for log in logs if "loss" in log and "eval_loss" not in log}


DISTRIBUTED_STEPS = 20


def write_distributed_config(corpus: Path, path: Path, per_device_batch: int) -> Path:
    """Writes the tiny config for comparing process counts on global batches of the same dialogues:
    :data:`DISTRIBUTED_STEPS` steps with a loss logged at each and a checkpoint at the half. The
    load-balancing loss is off: it is a mean per micro-batch, the one term of the objective that
    depends on how a global batch is split.

    Args:
        corpus: the corpus folder.
        path: the YAML file to write.
        per_device_batch: dialogues per process and step.
    """
    values = tiny_values(
        corpus,
        model={"load_balancing_loss_weight": 0.0},
        data={"max_eval_dialogues": 8},
        training={
            "max_steps": DISTRIBUTED_STEPS,
            "per_device_train_batch_size": per_device_batch,
            "logging_steps": 1,
            "eval_steps": DISTRIBUTED_STEPS // 2,  # and a checkpoint
        },
    )
    path.write_text(yaml.safe_dump(values))
    return path
