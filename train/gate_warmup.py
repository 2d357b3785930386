"""Training the gate alone, before the joint run, on long dialogues (``gate_warmup`` in a config).

The gate reads the hidden states entering decoder layer ``gate_layer``. Everything below that
layer is frozen and has no experts, so those states, and the gate's pooled turn features, are
constants of training: they are computed once per dialogue (a forward through the frozen
layers, no backward) and the gate (its norm, memory and projection) is then trained on them for
many epochs in seconds. Long dialogues (up to the evaluation's 30 turns) cost one forward each,
which the joint run, with its backward through the layers above, could not afford.

The objective is the gate's own part of the joint objective (:func:`moe_empathy.losses.gate_turn_losses`):
label cross-entropy, plus the load-balancing and z-losses at the model's weights. The state
with the best validation accuracy is kept; ``gate_warmup.json`` in the run folder logs every
epoch and the accuracy by turn position. The features are kept in the run folder
(``gate_features.safetensors``, with a fingerprint of the base below ``gate_layer`` and of the
dialogues), so a run started again in the same folder reads them back instead of recomputing.

With ``context_replies: shuffled`` every assistant reply of the warm-up dialogues is swapped for
a random one of the same split (:func:`shuffle_replies`), so the gate learns the level from the
user's messages: a gate trained on the scripted replies reads the level off its earlier replies,
which in generation are the model's own.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from moe_empathy.errors import run_command
from moe_empathy.gate import TurnGate
from moe_empathy.losses import IGNORE_INDEX, gate_turn_losses
from moe_empathy.modeling_moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.utils import atomic_write_text

from .collate import DialogueCollator
from .config_sections import GateWarmupSection
from .prefix_cache import base_fingerprint, compute_prefix, corpus_fingerprint

WARMUP_LOG = "gate_warmup.json"
FEATURES_FILE = "gate_features.safetensors"  # kept for studying the gate (load_features)
# Turn positions (1-based, inclusive) the accuracy is reported for, as the evaluation buckets them.
TURN_BUCKETS = {"turns 1-6": (1, 6), "turns 7-15": (7, 15), "turns 16-30": (16, 30), "turns 31+": (31, 10**6)}


@dataclass
class TurnFeatures:
    """The gate's inputs for a set of dialogues.

    Args:
        pooled: ``[dialogues, turns, hidden]`` float32 pooled states of each turn (:meth:`TurnGate.pool_turns`).
        counts: ``[dialogues, turns]`` readable tokens of each turn (0 on turns a dialogue lacks).
        labels: ``[dialogues, turns]`` expert index of each turn, ``IGNORE_INDEX`` for none.
    """

    pooled: torch.Tensor
    counts: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.pooled.shape[0]

    @property
    def labelled(self) -> torch.Tensor:
        """``[dialogues, turns]`` True on turns that have a label and readable tokens."""
        return (self.labels != IGNORE_INDEX) & (self.counts > 0)

    def select(self, index: torch.Tensor) -> "TurnFeatures":
        """The features of the dialogues at ``index``."""
        return TurnFeatures(self.pooled[index], self.counts[index], self.labels[index])

    def to(self, device: torch.device | str) -> "TurnFeatures":
        """The same features on ``device``."""
        return TurnFeatures(self.pooled.to(device), self.counts.to(device), self.labels.to(device))


@torch.no_grad()
def turn_features(model: MoeEmpathyForCausalLM, rows: list[dict], pad_token_id: int, batch_size: int = 4, progress: Progress | None = None) -> TurnFeatures:
    """The gate's pooled turn features of encoded dialogues (a forward through the layers below ``gate_layer``).

    Args:
        model: the gated model.
        rows: encoded dialogues (:func:`.collate.encode_dialogue`).
        pad_token_id: the tokenizer's padding id.
        batch_size: dialogues per forward (sorted by length, so little is padded).
        progress: a progress bar to advance by one per dialogue, or None.
    """
    if not rows:
        raise ValueError("turn_features needs at least one dialogue")
    device = next(model.parameters()).device
    num_turns = max(len(r["gate_labels"]) for r in rows)
    hidden = model.config.text_config.hidden_size
    pooled = torch.zeros(len(rows), num_turns, hidden)
    counts = torch.zeros(len(rows), num_turns, dtype=torch.long)
    labels = torch.full((len(rows), num_turns), IGNORE_INDEX)
    order = sorted(range(len(rows)), key=lambda i: rows[i]["length"])
    task = progress.add_task("gate features", total=len(rows)) if progress is not None else None
    collate = DialogueCollator(pad_token_id)
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collate([rows[i] for i in index]).items()}
        states = compute_prefix(model, batch["input_ids"], batch["attention_mask"])  # [b, seq, hidden]
        p, c = model.gate.pool_turns(states, batch["turn_ids"], batch["gate_mask"], num_turns)  # [b, T, hidden], [b, T]
        pooled[index] = p.float().cpu()
        counts[index] = c.cpu()
        labels[index, : batch["gate_labels"].shape[1]] = batch["gate_labels"].cpu()
        if progress is not None:
            progress.advance(task, len(index))
    return TurnFeatures(pooled, counts, labels)


def shuffle_replies(records: list[dict], seed: int) -> list[dict]:
    """The dialogues with every assistant reply swapped for one drawn at random (with
    replacement) from all the records' replies; user turns and labels are kept.

    The gate then cannot read a turn's level from the replies before it, only from the user's
    messages: in generation those replies are the model's own, and a gate that learned to
    trust them follows its own mistakes.

    Args:
        records: dialogue records (``turns`` with ``role`` and ``content``).
        seed: the draw's seed.
    """
    rng = random.Random(seed)
    pool = [t["content"] for r in records for t in r["turns"] if t["role"] == "assistant"]
    if not pool:
        return records
    return [{**r, "turns": [{**t, "content": rng.choice(pool)} if t["role"] == "assistant" else t for t in r["turns"]]}
            for r in records]


def context_replies(section: GateWarmupSection, seed: int) -> Callable[[list[dict], str], list[dict]] | None:
    """The transform of the warm-up corpus's records that ``section.context_replies`` asks for.

    Args:
        section: the config's ``gate_warmup`` section.
        seed: the run's seed (each split draws with its own seed derived from it).
    """
    if section.context_replies == "scripted":
        return None
    return lambda records, split: shuffle_replies(records, int(hashlib.sha256(f"{seed}:{split}".encode()).hexdigest()[:8], 16))


def features_fingerprint(model: MoeEmpathyForCausalLM, splits: dict[str, list[dict]]) -> str:
    """A hash of what the features depend on: the base below ``gate_layer`` and the dialogues.

    Args:
        model: the gated model.
        splits: the encoded dialogues of each split, in order.
    """
    parts = [base_fingerprint(model), str(model.config.gate_layer)]
    parts += [f"{name}:{corpus_fingerprint(rows)}" for name, rows in sorted(splits.items())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def save_features(features: dict[str, TurnFeatures], path: Path, fingerprint: str = "") -> None:
    """Writes each split's features to one safetensors file (atomically).

    Args:
        features: split name -> features.
        path: the file.
        fingerprint: :func:`features_fingerprint`, kept in the file's metadata.
    """
    tensors = {f"{name}.{key}": getattr(f, key).contiguous() for name, f in features.items() for key in ("pooled", "counts", "labels")}
    staging = path.with_name(path.name + ".tmp")
    save_file(tensors, str(staging), metadata={"fingerprint": fingerprint})
    os.replace(staging, path)


def stored_fingerprint(path: str | os.PathLike) -> str | None:
    """The fingerprint a features file was saved with; None when there is no readable file."""
    try:
        with safe_open(str(path), "pt") as f:
            return (f.metadata() or {}).get("fingerprint")
    except (OSError, SafetensorError):
        return None


def load_features(path: str | os.PathLike) -> dict[str, TurnFeatures]:
    """Reads what :func:`save_features` wrote.

    Args:
        path: the file.
    """
    tensors = load_file(str(path))
    names = sorted({key.split(".")[0] for key in tensors})
    return {name: TurnFeatures(tensors[f"{name}.pooled"], tensors[f"{name}.counts"], tensors[f"{name}.labels"]) for name in names}


def gate_step(model: MoeEmpathyForCausalLM, features: TurnFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate's objective on a batch of features, and its logits.

    Args:
        model: the gated model (its gate and loss weights).
        features: the batch.

    Returns:
        The loss (label cross-entropy per labelled turn + the weighted load-balancing and
        z-losses) and the ``[batch, turns, E]`` logits.
    """
    gate, config = model.gate, model.config
    decided = features.counts > 0  # [batch, T]
    carried = torch.zeros_like(decided)
    logits, _ = gate.decide(features.pooled, features.counts, carried, None)  # [batch, T, E]
    turns = gate_turn_losses(logits, gate.route(logits), decided, features.labels, config.gate_temperature)
    labelled = turns.labelled.sum().clamp(min=1)
    loss = turns.labelled_sum(config) / labelled + config.load_balancing_loss_weight * turns.load_balancing
    return loss, logits


@torch.no_grad()
def accuracy_by_turn(model: MoeEmpathyForCausalLM, features: TurnFeatures) -> dict[str, float | None]:
    """The gate's top expert against the labels: over all labelled turns and per :data:`TURN_BUCKETS`.

    Args:
        model: the gated model.
        features: the dialogues to score.
    """
    _, logits = gate_step(model, features)
    labelled = features.labelled  # [n, T]
    right = (logits.argmax(-1) == features.labels) & labelled
    position = torch.arange(1, labelled.shape[1] + 1, device=labelled.device).expand_as(labelled)
    out = {"all": (right.sum() / labelled.sum()).item() if labelled.any() else None}
    for name, (low, high) in TURN_BUCKETS.items():
        inside = labelled & (position >= low) & (position <= high)
        out[name] = (right & inside).sum().item() / inside.sum().item() if inside.any() else None
    return out


def format_accuracy(accuracy: dict[str, float | None]) -> str:
    """One line of :func:`accuracy_by_turn`'s result: ``all 90.2%, turns 1-6 95.0%, ...`` (empty buckets left out).

    Args:
        accuracy: bucket name -> accuracy, or None for a bucket without turns.
    """
    return ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items() if v is not None)


def train_gate(model: MoeEmpathyForCausalLM, train: TurnFeatures, validation: TurnFeatures, section: GateWarmupSection, seed: int, progress: Progress | None = None) -> dict:
    """Trains ``model.gate`` on features; keeps the state with the best validation accuracy.

    Args:
        model: the gated model; only its gate changes.
        train, validation: the features to train and select on.
        section: epochs, batch size, learning rate, weight decay.
        seed: seed of the batch order.
        progress: a progress bar, or None.

    Returns:
        The log: one entry per epoch (train loss, validation accuracy by turn) and the best epoch.
    """
    gate = model.gate
    gate.train()
    params = [p for p in gate.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=section.learning_rate, weight_decay=section.weight_decay)
    steps_per_epoch = math.ceil(len(train) / section.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=section.epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    epochs, best, best_state = [], None, None
    task = progress.add_task("gate warm-up", total=section.epochs) if progress is not None else None
    for epoch in range(1, section.epochs + 1):
        order, total = torch.randperm(len(train), generator=generator), 0.0
        for start in range(0, len(train), section.batch_size):
            loss, _ = gate_step(model, train.select(order[start : start + section.batch_size]))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item()
        gate.eval()
        accuracy = accuracy_by_turn(model, validation)
        gate.train()
        epochs.append({"epoch": epoch, "train_loss": total / steps_per_epoch, "validation_accuracy": accuracy})
        if best is None or accuracy["all"] > best["validation_accuracy"]["all"]:
            best, best_state = epochs[-1], copy.deepcopy(gate.state_dict())
        if progress is not None:
            progress.advance(task)
    gate.load_state_dict(best_state)
    gate.eval()
    return {"epochs": epochs, "best": best}


def warm_up_gate(
    model: MoeEmpathyForCausalLM,
    splits: dict[str, list[dict]],
    pad_token_id: int,
    section: GateWarmupSection,
    seed: int,
    output_dir: str | os.PathLike,
    device: torch.device | str | None = None,
) -> dict:
    """Computes the gate's features of the warm-up corpus, trains the gate on them, and writes
    ``gate_warmup.json`` (the log, and the test split's accuracy by turn) to ``output_dir``.

    Args:
        model: the gated model.
        splits: the warm-up corpus's encoded ``train``, ``validation`` and ``test`` dialogues.
        pad_token_id: the tokenizer's padding id.
        section: the config's ``gate_warmup`` section.
        seed: the run's seed.
        output_dir: the run folder.
        device: where to compute the features and train the gate (the training's device, so
            that a GPU run does not do this stage on the CPU); None: where the model is.

    Returns:
        What ``gate_warmup.json`` holds.
    """
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    path, fingerprint = output_dir / FEATURES_FILE, features_fingerprint(model, splits)
    with Progress(*columns, transient=False) as progress:
        if stored_fingerprint(path) == fingerprint:  # a restarted run: same base, gate layer and dialogues
            progress.console.print(f"gate features: read back from {path}")
            features = load_features(path)
        else:
            features = {name: turn_features(model, rows, pad_token_id, progress=progress) for name, rows in splits.items()}
            save_features(features, path, fingerprint)
        features = {name: f.to(device) for name, f in features.items()}
        before = accuracy_by_turn(model, features["test"])
        log = train_gate(model, features["train"], features["validation"], section, seed, progress)
    log["test_accuracy_before"] = before
    log["test_accuracy"] = accuracy_by_turn(model, features["test"])
    log["dialogues"] = {name: len(f) for name, f in features.items()}
    log["turns"] = {name: int((f.labels != IGNORE_INDEX).sum()) for name, f in features.items()}
    atomic_write_text(output_dir / WARMUP_LOG, json.dumps(log, indent=1) + "\n")
    return log


# --------------------------------------------------------------------- comparing gate memories


def compare_memories(model: MoeEmpathyForCausalLM, features: dict[str, TurnFeatures], memories: list[str], section: GateWarmupSection, seed: int) -> dict:
    """Trains a fresh gate of each memory kind on the same features; their test accuracy by turn.

    Args:
        model: a gated model (its gate's shape and loss weights; its own gate is put back after).
        features: ``train``, ``validation`` and ``test`` features (:func:`load_features`).
        memories: gate memory kinds to compare (``none``, ``ema``, ``gru``).
        section: the warm-up's settings.
        seed: seed of the gates' initialisation and batch order.

    Returns:
        memory -> ``{"validation": ..., "test": ...}`` accuracy by turn.
    """
    config, own = model.config, model.gate
    results = {}
    try:
        for memory in memories:
            torch.manual_seed(seed)
            model.gate = TurnGate(
                config.text_config.hidden_size, config.num_experts, config.gate_hidden_size, config.gate_type, config.gate_top_k,
                config.gate_temperature, memory, config.gate_memory_decay, config.gate_memory_size,
            )
            log = train_gate(model, features["train"], features["validation"], section, seed)
            results[memory] = {"validation": log["best"]["validation_accuracy"], "test": accuracy_by_turn(model, features["test"])}
    finally:
        model.gate = own
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m moe_empathy.train.gate_warmup --model DIR --features FILE``: compares gate
    memories on a run's stored features (``gate_features.safetensors``)."""
    parser = argparse.ArgumentParser(prog="moe_empathy.train.gate_warmup", description="Compare gate memories on stored warm-up features.")
    parser.add_argument("--model", required=True, help="a gated model folder (the gate's shape and loss weights)")
    parser.add_argument("--features", required=True, help="a run's gate_features.safetensors")
    parser.add_argument("--memories", default="none,ema,gru", help="comma-separated gate memory kinds")
    parser.add_argument("--epochs", type=int, default=40, help="warm-up epochs per gate")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    def run(args: argparse.Namespace) -> dict:
        from moe_empathy.loading import load_model_and_tokenizer

        model, _, _ = load_model_and_tokenizer(args.model)
        section = GateWarmupSection(epochs=args.epochs)
        results = compare_memories(model, load_features(args.features), [m.strip() for m in args.memories.split(",")], section, seed=0)
        for memory, result in results.items():
            print(f"gate memory {memory}: test accuracy {format_accuracy(result['test'])}")
        if args.json:
            atomic_write_text(Path(args.json), json.dumps(results, indent=1) + "\n")
        return results

    return run_command(run, args)


if __name__ == "__main__":
    sys.exit(main())
