"""``MoeEmpathyTrainer``: ``transformers.Trainer`` with our objective, logging and checkpoints.

Objective per optimizer step: the LM loss summed over assistant tokens and divided by the
number of assistant tokens of the whole step (all processes and accumulation steps), plus the
gate-label cross-entropy and z-loss summed over labelled turns and divided by the step's
labelled turns, so any split of one global batch gives the same gradient; plus the
load-balancing loss, a mean per micro-batch (it is not a sum over turns), averaged.

Gated models are checkpointed compact (experts, gate and the base's reference), every
checkpoint through a staging folder renamed into place when complete. The gated model and the
peft baselines (:mod:`.baselines`) train with this class; :func:`.run.run_training` drives it.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.utils.data import Dataset
from transformers import Trainer
from transformers.trainer_callback import ExportableState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from moe_empathy.checkpoint import COMPACT_WEIGHTS
from moe_empathy.losses import gate_turn_losses, lm_loss_sum, next_token_targets
from moe_empathy.modeling_moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.utils import move_into_place

from .collate import IGNORE_INDEX, LengthBucketSampler
from .prefix_cache import PrefixCache, forward_from_prefix, use_prefix_cache

TRAINER_STATE_NAME = "trainer_state.json"
STAGING_PREFIX = "tmp-"  # a folder being written, renamed into place when complete
GATE_METRICS = ("gate_label_loss", "load_balancing_loss", "z_loss", "aux_loss", "gate_entropy", "gate_accuracy")


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
