"""One model trained by :class:`.hf_trainer.MoeEmpathyTrainer` into a run folder: ``last/``,
``best/``, ``log.jsonl`` and ``summary.json``; resuming from a run's newest checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

from rich.console import Console
from transformers import PreTrainedModel
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from moe_empathy.checkpoint import COMPACT_WEIGHTS
from moe_empathy.utils import atomic_write_text, make_temp_dir, move_into_place

from .callbacks import JsonlLogCallback, PrefixCacheCallback, RichProgressCallback
from .collate import DialogueCollator, padding_report
from .config import TrainConfig, training_arguments
from .hf_trainer import STAGING_PREFIX, TRAINER_STATE_NAME, EncodedDialogues, MoeEmpathyTrainer
from .prefix_cache import PrefixCache, use_prefix_cache

SUMMARY_FILE = "summary.json"
MODEL_FILES = ("config.json", "generation_config.json", COMPACT_WEIGHTS, "adapter_config.json", "adapter_model.safetensors")


def copy_model_files(checkpoint: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copies a checkpoint's model files (not its optimizer state) to ``target``, atomically.

    Args:
        checkpoint: a ``checkpoint-N`` folder.
        target: the folder to (re)place.
    """
    source, target = Path(checkpoint), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(target.parent, STAGING_PREFIX + target.name + "-")
    try:
        for name in MODEL_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
        move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_resume(resume: str | os.PathLike | None) -> str | None:
    """A checkpoint folder to resume from: ``resume`` itself, or the newest complete
    ``checkpoint-N`` inside it (staging folders of interrupted saves are ignored).

    Args:
        resume: a ``checkpoint-N`` folder, a run's output folder, or None.
    """
    if resume is None:
        return None
    path = Path(resume)
    if (path / TRAINER_STATE_NAME).is_file():
        return str(path)
    last = get_last_checkpoint(str(path)) if path.is_dir() else None
    if last is None:
        raise FileNotFoundError(f"--resume {path}: no complete checkpoint-N folder found there")
    return last


def run_training(
    config: TrainConfig,
    model: PreTrainedModel,
    pad_token_id: int,
    datasets: dict[str, EncodedDialogues],
    output_dir: str | os.PathLike,
    max_steps: int,
    resume: str | os.PathLike | None = None,
    description: str = "train",
    with_gate: bool = True,
) -> dict:
    """Trains one model with :class:`MoeEmpathyTrainer` and writes ``last/``, ``best/`` and
    ``summary.json`` (with test metrics) under ``output_dir``.

    Args:
        config: the run's config.
        model: the model to train (gated, or a peft baseline).
        pad_token_id: the tokenizer's padding id.
        datasets: ``train``, ``validation`` and ``test`` encoded dialogues.
        output_dir: the run folder.
        max_steps: optimizer steps.
        resume: a checkpoint or run folder to resume from.
        description: label of the progress bar.
        with_gate: feed ``turn_ids``/``gate_mask``/``gate_labels`` (gated models only).

    Returns:
        The summary: steps, final train metrics, validation and test metrics, padding fractions.
    """
    output_dir = Path(output_dir)
    args = training_arguments(config, str(output_dir), max_steps)
    t = config.training
    train_set, cache = datasets["train"], None
    if use_prefix_cache(t.prefix_cache, model, args.world_size):
        cache = PrefixCache(model, train_set.rows, t.prefix_cache_dtype, t.prefix_cache_dir)
        train_set = EncodedDialogues(train_set.rows, with_index=True)
        Console(stderr=True).print(
            f"prefix cache: {cache.path} ({len(cache)} of {len(train_set)} training dialogues cached; the rest are "
            "computed when first met)", highlight=False,
        )
    trainer = MoeEmpathyTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=datasets["validation"],
        data_collator=DialogueCollator(pad_token_id, with_gate=with_gate),
        train_lengths=train_set.lengths,
        bucket_size=config.data.bucket_size,
        sort_by_length=config.data.batching == "bucket",
        prefix_cache=cache,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(JsonlLogCallback(output_dir))
    if cache is not None:
        trainer.add_callback(PrefixCacheCallback(cache))
    if config.training.progress_bar:
        trainer.add_callback(RichProgressCallback(description))
    if with_gate and t.freeze_gate:
        model.gate.requires_grad_(False)
    routing = model.route_by_labels(t.label_routing) if with_gate and t.label_routing > 0 else nullcontext()
    start = time.perf_counter()
    with routing:  # evaluations during training route by label too; the final ones below by the gate
        result = trainer.train(resume_from_checkpoint=resolve_resume(resume))
    elapsed = time.perf_counter() - start
    trainer.save_model(str(output_dir / "last"))
    if args.should_save and trainer.state.best_model_checkpoint:
        copy_model_files(trainer.state.best_model_checkpoint, output_dir / "best")
    validation = trainer.evaluate()
    test = trainer.evaluate(datasets["test"], metric_key_prefix="test")
    train_logs = [log for log in trainer.state.log_history if "loss" in log and "eval_loss" not in log]
    summary = {
        "method": config.method,
        "steps": trainer.state.global_step,
        "train_seconds": round(elapsed, 1),
        "train_loss_mean": result.training_loss,
        "last_train_log": train_logs[-1] if train_logs else None,
        "validation": validation,
        "test": test,
        "best_checkpoint": trainer.state.best_model_checkpoint,
        "best_eval_loss": trainer.state.best_metric,
        "prefix_cache": str(cache.path) if cache is not None else None,
        "dialogues": {name: len(ds) for name, ds in datasets.items()},
        "padding_fraction": padding_report(
            datasets["train"].lengths,
            config.training.per_device_train_batch_size,
            args.world_size,
            config.data.bucket_size,
            config.training.seed,
        ),
    }
    if args.should_save:
        write_summary(output_dir, summary)
    return summary


def write_summary(output_dir: str | os.PathLike, summary: dict) -> None:
    """Writes a run's summary to ``output_dir/summary.json`` (atomically)."""
    atomic_write_text(Path(output_dir) / SUMMARY_FILE, json.dumps(summary, indent=1, default=str) + "\n")
