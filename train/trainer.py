"""Joint training of the experts and the gate with ``transformers.Trainer`` (accelerate underneath).

``moe-empathy train --config train/configs/NAME.yaml`` or, for several processes,
``accelerate launch -m moe_empathy.train.trainer --config ...``. The ``method`` of the
config picks the gated model or a baseline (see :mod:`.baselines`); all of them share the
data pipeline, the loss bookkeeping, the callbacks and the checkpoint format here.

Objective per optimizer step: the LM loss summed over assistant tokens and divided by the
number of assistant tokens of the whole step (all processes and accumulation steps), plus the
gate-label cross-entropy and z-loss summed over labelled turns and divided by the step's
labelled turns, so any split of one global batch gives the same gradient; plus the
load-balancing loss, a mean per micro-batch (it is not a sum over turns), averaged.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.utils.data import Dataset
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_callback import ExportableState, PrinterCallback, ProgressCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from moe_empathy.losses import gate_turn_losses, lm_loss_sum, next_token_targets
from moe_empathy.checkpoint import COMPACT_WEIGHTS
from moe_empathy.modeling_moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.utils import atomic_write_text, make_temp_dir, move_into_place

from .collate import IGNORE_INDEX, DialogueCollator, LengthBucketSampler, padding_report
from .config import BUDGET_KEYS, TrainConfig, changed_keys, load_config, merge_config_values, training_arguments
from .prefix_cache import PrefixCache, forward_from_prefix, use_prefix_cache

TRAINER_STATE_NAME = "trainer_state.json"
STAGING_PREFIX = "tmp-"
LOG_FILE = "log.jsonl"
GATE_METRICS = ("gate_label_loss", "load_balancing_loss", "z_loss", "aux_loss", "gate_entropy", "gate_accuracy")
SUMMARY_FILE = "summary.json"
CONFIG_RECORD = "config.yaml"  # the config a run was started with (written once, checked on resume)
MODEL_FILES = ("config.json", "generation_config.json", COMPACT_WEIGHTS, "adapter_config.json", "adapter_model.safetensors")


class EncodedDialogues(Dataset):
    """Encoded dialogues (rows of :func:`.collate.encode_dialogue`) as a map-style dataset.

    Args:
        rows: the encoded dialogues.
        with_index: add each row's dataset index as ``dialogue_index`` (the prefix cache's key).
    """

    def __init__(self, rows: list[dict], with_index: bool = False):
        self.rows = rows
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {**self.rows[index], "dialogue_index": index} if self.with_index else self.rows[index]

    @property
    def lengths(self) -> list[int]:
        return [r["length"] for r in self.rows]


@dataclass
class _Buffer:
    """Sums and counts of the logged quantities since the last log."""

    sums: dict
    counts: dict

    @classmethod
    def empty(cls) -> "_Buffer":
        return cls(defaultdict(float), defaultdict(float))

    def add(self, name: str, total: float, count: float) -> None:
        self.sums[name] += float(total)
        self.counts[name] += float(count)


class MoeEmpathyTrainer(Trainer):
    """``Trainer`` with our objective, length-bucketed batches, compact and atomic checkpoints.

    Logs, besides ``loss``: ``lm_loss`` (per assistant token), ``gate_label_loss``,
    ``load_balancing_loss``, ``z_loss``, ``aux_loss``, ``gate_accuracy`` (argmax against the
    per-turn labels), ``gate_entropy`` (nats, per turn) and ``tokens_per_second``.

    Args:
        train_lengths: token count of every training dialogue (for the length buckets).
        bucket_size: global batches per length bucket.
        sort_by_length: bucket by length (False: plain seeded shuffling, padding to the longest).
        prefix_cache: train on the cached states entering ``gate_layer`` (batches then carry
            ``dialogue_index``); one process only.
        *args, **kwargs: as for ``Trainer``.
    """

    def __init__(
        self,
        *args,
        train_lengths: list[int],
        bucket_size: int = 32,
        sort_by_length: bool = True,
        prefix_cache: PrefixCache | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if self.is_fsdp_enabled and self._is_gated() and "FULL_STATE_DICT" not in str(self.accelerator.state.fsdp_plugin.state_dict_type):
            raise ValueError(
                "a gated model's checkpoints are written from the full state dict that FSDP gathers, got fsdp_state_dict_type "
                f"{self.accelerator.state.fsdp_plugin.state_dict_type}; set fsdp_state_dict_type: FULL_STATE_DICT in the accelerate config"
            )
        self.train_lengths = train_lengths
        self.bucket_size = bucket_size
        self.sort_by_length = sort_by_length
        self.prefix_cache = prefix_cache
        if prefix_cache is not None:
            use_prefix_cache("on", self.accelerator.unwrap_model(self.model), self.accelerator.num_processes)
        self._buffers = {"train": _Buffer.empty(), "eval": _Buffer.empty()}
        self._metric_prefix = "eval"
        self._last_log_time = time.perf_counter()
        self._turns_in_step: torch.Tensor | None = None

    # ----------------------------------------------------------------- data

    def _get_train_sampler(self, train_dataset=None) -> LengthBucketSampler:
        global_batch = self.args.per_device_train_batch_size * self.args.world_size
        return LengthBucketSampler(
            self.train_lengths, global_batch, self.bucket_size, seed=self.args.seed, sort=self.sort_by_length
        )

    # ----------------------------------------------------------------- objective

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """LM loss on assistant tokens plus the gate's weighted losses (see the module docstring)."""
        labels = inputs.pop("labels")  # [batch, seq]
        index = inputs.pop("dialogue_index", None)  # [batch], only with a prefix cache
        targets = next_token_targets(labels)  # [batch, seq]
        if index is not None and self.prefix_cache is not None:
            # The top layers only, on the cached prefix; logits only where a label is predicted.
            keep = targets != IGNORE_INDEX  # [batch, seq]
            outputs = self._forward_from_prefix(model, inputs, index, keep)
            targets = targets[keep]  # [n]
        else:
            outputs = model(**inputs)
        lm_sum, tokens = lm_loss_sum(outputs.logits, targets)  # logits [batch, seq, vocab], or [n, vocab] from the prefix
        aux = getattr(outputs, "aux_loss", None)
        aux = aux if aux is not None else lm_sum.new_zeros(())
        if model.training and num_items_in_batch is not None:
            # Sums over this process's tokens (turns) / tokens (turns) of the whole step; DDP
            # averages over processes, hence the factor.
            processes = self.accelerator.num_processes
            loss = lm_sum / num_items_in_batch * processes
            if getattr(outputs, "gate_logits", None) is not None and self._turns_in_step is not None:
                config = self.accelerator.unwrap_model(model).config
                turns = gate_turn_losses(
                    outputs.gate_logits, outputs.gate_weights, outputs.turn_mask, inputs["gate_labels"], config.gate_temperature
                )
                loss = loss + turns.labelled_sum(config) / self._turns_in_step * processes
                aux = config.load_balancing_loss_weight * turns.load_balancing
            loss = loss + aux / self.current_gradient_accumulation_steps
        else:
            loss = lm_sum / tokens.clamp(min=1) + aux
        self._record(outputs, inputs, lm_sum.detach(), tokens, "train" if model.training else "eval")
        return (loss, outputs) if return_outputs else loss

    def _forward_from_prefix(self, model, inputs: dict, index: torch.Tensor, keep: torch.Tensor):
        """The gated model's output from ``gate_layer`` up on the cached prefix of the batch's dialogues.

        Args:
            model: the model being trained (one process, so not wrapped for data parallelism).
            inputs: the batch without ``labels``.
            index: ``[batch]`` dataset index of each row.
            keep: ``[batch, seq]`` positions whose logits are wanted.
        """
        unwrapped = self.accelerator.unwrap_model(model)
        with self.accelerator.autocast():  # the mixed precision the wrapped forward would apply
            prefix = self.prefix_cache.batch(unwrapped, index, inputs["input_ids"], inputs["attention_mask"])
            return forward_from_prefix(
                unwrapped, prefix, inputs["attention_mask"], inputs["turn_ids"], inputs["gate_mask"], inputs.get("gate_labels"), keep
            )

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Also counts the labelled turns of the whole optimizer step (all processes)."""
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._turns_in_step = None
        if batches and all("gate_labels" in b for b in batches):
            turns = sum((b["gate_labels"] != IGNORE_INDEX).sum() for b in batches).to(device)
            if self.accelerator.num_processes > 1:
                turns = self.accelerator.reduce(turns, reduction="sum")
            self._turns_in_step = turns.clamp(min=1)
        return batches, num_items_in_batch

    @torch.no_grad()
    def _record(self, outputs, inputs, lm_sum: torch.Tensor, tokens: torch.Tensor, split: str) -> None:
        buffer = self._buffers[split]
        buffer.add("lm_loss", lm_sum, tokens)
        buffer.add("tokens", inputs["attention_mask"].sum(), 0)
        if getattr(outputs, "gate_weights", None) is None:
            return
        for name in ("gate_label_loss", "load_balancing_loss", "z_loss", "aux_loss"):
            buffer.add(name, getattr(outputs, name), 1)
        weights = outputs.gate_weights.float()  # [batch, turns, E]
        present = outputs.turn_mask  # [batch, turns]
        entropy = -(weights * weights.clamp(min=1e-12).log()).sum(-1)  # [batch, turns]
        buffer.add("gate_entropy", entropy[present].sum(), present.sum())
        gate_labels = inputs.get("gate_labels")
        if gate_labels is not None:
            width = min(gate_labels.shape[1], weights.shape[1])
            labels = gate_labels[:, :width]  # [batch, turns]
            known = labels != IGNORE_INDEX
            correct = (weights[:, :width].argmax(-1) == labels) & known
            buffer.add("gate_accuracy", correct.sum(), known.sum())

    def _flush(self, split: str) -> dict[str, float]:
        """Averages of the buffer over all processes since the last flush; empties it."""
        buffer, self._buffers[split] = self._buffers[split], _Buffer.empty()
        # A fixed list, so that every process reduces the same tensor whatever its batches held.
        names = ["lm_loss", "tokens"] + (list(GATE_METRICS) if self._is_gated() else [])
        stats = torch.tensor([[buffer.sums[n], buffer.counts[n]] for n in names], dtype=torch.float64, device=self.args.device)
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="sum")
        metrics = {}
        for name, (total, count) in zip(names, stats.tolist()):
            if name == "tokens":
                continue
            if count > 0:
                metrics[name] = total / count
        if split == "train":
            now = time.perf_counter()
            metrics["tokens_per_second"] = stats[names.index("tokens"), 0].item() / max(now - self._last_log_time, 1e-9)
            self._last_log_time = now
        return metrics

    def _is_gated(self) -> bool:
        return isinstance(self.accelerator.unwrap_model(self.model), MoeEmpathyForCausalLM)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        self._metric_prefix = metric_key_prefix
        self._buffers["eval"] = _Buffer.empty()
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._metric_prefix = "eval"

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds our separately kept losses and gate metrics to the Trainer's logs (in place,
        so ``evaluate`` returns them too)."""
        prefix = self._metric_prefix
        if f"{prefix}_loss" in logs:
            logs.update({f"{prefix}_{k}": v for k, v in self._flush("eval").items()})
        elif "loss" in logs:
            logs.update(self._flush("train"))
        super().log(logs, start_time)

    # ----------------------------------------------------------------- checkpoints

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Gated models are saved compact (experts + gate + the base's reference).

        Args:
            output_dir: the folder to write (default: the run's output folder).
            state_dict: the full state the Trainer gathered from the shards under FSDP (the
                model's own parameters are then only this process's shards); None otherwise.
        """
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        if not isinstance(model, MoeEmpathyForCausalLM):
            return super()._save(output_dir, state_dict=state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            model.save_pretrained(output_dir, compact=True, state_dict=state_dict)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        unwrapped = self.accelerator.unwrap_model(model)
        path = Path(resume_from_checkpoint) / COMPACT_WEIGHTS
        if not isinstance(unwrapped, MoeEmpathyForCausalLM):
            return super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        if not path.is_file():
            raise FileNotFoundError(f"{resume_from_checkpoint} has no {COMPACT_WEIGHTS}; it is not a checkpoint of a gated run")
        state = load_file(str(path))
        expected = set(unwrapped.expert_state_dict())
        if set(state) != expected:
            raise ValueError(
                f"{path} does not match the model being trained (missing {sorted(expected - set(state))[:3]}, "
                f"unexpected {sorted(set(state) - expected)[:3]}); resume with the config the run was started with"
            )
        if self.is_fsdp_enabled:
            # Every process reads the whole tensors and keeps its shard of each.
            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            unwrapped.load_state_dict(state, strict=False)

    def _save_checkpoint(self, model, trial) -> None:
        """Writes ``checkpoint-N`` into a staging folder and renames it into place when complete,
        so a run killed while saving leaves the earlier checkpoints the newest usable ones. A save
        that fails (a full disk) removes its staging folder and says which checkpoint is intact."""
        run_dir = self._get_output_dir(trial=trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = os.path.join(run_dir, STAGING_PREFIX + name)
        try:
            self._save_checkpoint_via(run_dir, name, staging)
        except OSError as err:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if err.errno != errno.ENOSPC:
                raise
            intact = get_last_checkpoint(run_dir)
            kept = f"{os.path.basename(intact)} and earlier are intact" if intact else "no earlier checkpoint exists"
            raise OSError(
                errno.ENOSPC,
                f"no space left on the disk while saving {name} in {run_dir} ({err}); {kept}: free some space "
                f"and resume with --resume {run_dir}",
            ) from err

    def _save_checkpoint_via(self, run_dir: str, name: str, staging: str) -> None:
        """Writes ``run_dir/name`` through ``staging`` (see :meth:`_save_checkpoint`)."""
        final = os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a run killed while saving
        self.accelerator.wait_for_everyone()
        self.store_flos()
        self.save_model(staging, _internal_call=True)
        if self.state.best_global_step:
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.best_global_step}")
            if self.state.best_global_step == self.state.global_step or os.path.isdir(best):
                self.state.best_model_checkpoint = best
        if not self.args.save_only_model:
            self._save_optimizer_and_scheduler(staging)
            self._save_scaler(staging)
            self._save_rng_state(staging)
        if self.args.should_save:
            for callback in self.callback_handler.callbacks + [self.control]:
                if isinstance(callback, ExportableState):
                    self.state.stateful_callbacks[callback.__class__.__name__] = callback.state()
            self.state.save_to_json(os.path.join(staging, TRAINER_STATE_NAME))
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            move_into_place(staging, final)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()


# --------------------------------------------------------------------- callbacks


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


# --------------------------------------------------------------------- running


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
    start = time.perf_counter()
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
    from .baselines import run_method

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


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Registers the ``train`` subcommand.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.
    """
    parser = subparsers.add_parser("train", help="train the experts and the gate (or a baseline) from a YAML config")
    _add_arguments(parser)
    parser.set_defaults(func=run_train_command)
    return parser


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="a YAML training config, e.g. train/configs/tiny.yaml")
    parser.add_argument("--output", default=None, help="run folder (default: training.output_dir of the config)")
    parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: training.max_steps)")
    parser.add_argument("--resume", default=None, help="a checkpoint-N folder, or a run folder to resume from its newest checkpoint")


def run_train_command(args: argparse.Namespace) -> dict:
    """Runs the ``train`` subcommand.

    Args:
        args: the parsed arguments of :func:`add_parser`.
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
    returns the exit code (user errors end as one line, see :func:`moe_empathy.cli.run_command`)."""
    from moe_empathy.cli import run_command

    parser = argparse.ArgumentParser(prog="moe_empathy.train.trainer", description=__doc__.split("\n")[0])
    _add_arguments(parser)
    return run_command(run_train_command, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
