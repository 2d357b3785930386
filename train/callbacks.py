"""The training callbacks: the JSONL log, the prefix cache's saves, the rich progress bar."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from moe_empathy.utils import atomic_write_text

from .prefix_cache import PrefixCache

LOG_FILE = "log.jsonl"


class JsonlLogCallback(TrainerCallback):
    """Appends every logged step to ``output_dir/log.jsonl``; on resume, drops the lines
    after the resumed step (they came from the interrupted run)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOG_FILE

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= state.global_step]
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as out:
            out.write(json.dumps({"step": state.global_step, "time": round(time.time(), 3), **logs}) + "\n")


class PrefixCacheCallback(TrainerCallback):
    """Writes the prefix cache's new states to its file at the end of each epoch and of training.

    Args:
        cache: the run's prefix cache.
    """

    def __init__(self, cache: PrefixCache):
        self.cache = cache

    def on_epoch_end(self, args, state, control, **kwargs):
        self.cache.save()

    def on_train_end(self, args, state, control, **kwargs):
        self.cache.save()


class RichProgressCallback(TrainerCallback):
    """A rich progress bar with loss, gate accuracy, gate entropy and tokens/s (main process).

    Without a terminal (a log file), each logged step is printed as one line instead.
    """

    def __init__(self, description: str = "train"):
        self.description = description
        self.console = Console(stderr=True)
        self.progress: Progress | None = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.console.is_terminal:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}"),
            console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps, completed=state.global_step, metrics="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        text = _format_metrics(logs)
        if self.progress is not None and "loss" in logs:
            self.progress.update(self.task, metrics=text)
        elif self.progress is not None:
            self.progress.console.print(f"step {state.global_step}: {text}")
        else:
            self.console.print(f"{self.description} step {state.global_step}/{state.max_steps}: {text}", highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


_SHORT = {
    "loss": "loss", "lm_loss": "lm", "gate_accuracy": "gate acc", "gate_entropy": "gate H",
    "tokens_per_second": "tok/s", "eval_loss": "eval loss", "eval_lm_loss": "eval lm",
    "eval_gate_accuracy": "eval gate acc", "learning_rate": "lr",
}


def _format_metrics(logs: dict) -> str:
    parts = []
    for key, label in _SHORT.items():
        if key in logs and isinstance(logs[key], (int, float)):
            value = logs[key]
            parts.append(f"{label} {value:.0f}" if key == "tokens_per_second" else f"{label} {value:.4g}")
    return "  ".join(parts)
