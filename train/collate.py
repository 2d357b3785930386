"""Dialogues to tensors: whole-turn truncation, per-turn gate labels, length buckets, padding.

A dialogue record (see ``train/README.md``) becomes one row: the chat-template tokens,
``turn_ids`` (the exchange of each token), ``gate_mask`` (what the gate may read),
``labels`` (assistant tokens only) and ``gate_labels`` (the expert index of each turn's
target level). Batches are right-padded, so every row keeps positions 0, 1, 2... whatever
the batch (the result of a row does not depend on its batch mates), and drawn by
:class:`LengthBucketSampler`, which puts dialogues of similar length together.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from statistics import median
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler
from transformers import PreTrainedTokenizerBase

from moe_empathy.losses import IGNORE_INDEX
from moe_empathy.turns import encode_chat


def encode_dialogue(
    record: dict,
    tokenizer: PreTrainedTokenizerBase,
    markers: tuple[list[int], list[int]],
    expert_names: Sequence[str],
    max_length: int,
) -> dict | None:
    """Tokenises one dialogue record, keeping only the whole turns that fit in ``max_length``.

    Args:
        record: a dialogue with ``turns`` (alternating user / assistant messages, assistant
            ones carrying their target ``level``).
        tokenizer: a tokenizer with a chat template.
        markers: ``(user_turn_marker, assistant_turn_marker)`` from ``find_turn_markers``.
        expert_names: expert order; a turn's gate label is the index of its level here.
        max_length: most tokens kept.

    Returns:
        Lists ``input_ids``, ``turn_ids``, ``gate_mask``, ``labels`` (``[seq]`` each),
        ``gate_labels`` (``[turns]``) and ``length``; None when not even the first turn fits.
    """
    messages = [{"role": t["role"], "content": t["content"]} for t in record["turns"]]
    levels = [t.get("level") for t in record["turns"] if t["role"] == "assistant"]
    unknown = {level for level in levels if level not in expert_names}
    if unknown:
        raise ValueError(
            f"dialogue {record.get('dialogue_id', '?')} has levels {sorted(map(str, unknown))} that are not "
            f"expert names {list(expert_names)}; set model.expert_names to the data's levels"
        )
    encoded = encode_chat(tokenizer, messages, markers=markers)
    input_ids = encoded["input_ids"][0]  # [seq]
    turn_ids = encoded["turn_ids"][0]  # [seq]
    keep = len(input_ids)
    if keep > max_length:
        # Cut at the start of the first turn that does not fit: only whole turns remain.
        cut = int(turn_ids[max_length])
        starts = (turn_ids == cut).nonzero()
        keep = int(starts[0]) if len(starts) else max_length
        if cut == 0 or keep == 0:
            return None
    turns = int(turn_ids[:keep].max()) + 1
    return {
        "input_ids": input_ids[:keep].tolist(),
        "turn_ids": turn_ids[:keep].tolist(),
        "gate_mask": encoded["gate_mask"][0, :keep].tolist(),
        "labels": encoded["labels"][0, :keep].tolist(),
        "gate_labels": [expert_names.index(level) for level in levels[:turns]],
        "length": keep,
    }


def restrict_to_expert(row: dict, expert: int) -> dict | None:
    """Keeps the LM labels of the turns whose gate label is ``expert`` (per-level baselines).

    Args:
        row: an encoded dialogue (:func:`encode_dialogue`).
        expert: the expert index whose turns are trained.

    Returns:
        The row with other turns' labels set to -100, or None if it has no such turn.
    """
    chosen = {k for k, label in enumerate(row["gate_labels"]) if label == expert}
    if not chosen:
        return None
    labels = [lab if turn in chosen else IGNORE_INDEX for lab, turn in zip(row["labels"], row["turn_ids"])]
    return {**row, "labels": labels}


def balance_label_turns(rows: list[dict], tasks: Sequence[str], seed: int) -> list[dict]:
    """Caps the LM-labelled turns of each (task, level) at the median task's count for that level.

    In the corpus a level is tied to tasks (72% of high turns are grief, emotional or relationship
    support), so an expert trained on all its turns also learns those tasks' content (the high
    expert then speaks of a loss on any prompt). Here every task gives a level's expert at most
    as many turns as the median task that has the level; the turns over the cap, drawn at random,
    lose their LM labels but stay in the context. Rows left with no labelled turn are dropped.

    Args:
        rows: encoded dialogues (:func:`encode_dialogue`).
        tasks: each row's task, in order.
        seed: seeds the draw of the turns kept.

    Returns:
        The rows with the over-cap turns' labels set to -100 (new dicts; ``rows`` is untouched).
    """
    if len(tasks) != len(rows):
        raise ValueError(f"got {len(tasks)} tasks for {len(rows)} rows; give each row its task")
    turns: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)  # (task, level) -> [(row, turn)]
    for index, (row, task) in enumerate(zip(rows, tasks)):
        for turn, level in enumerate(row["gate_labels"]):
            turns[(task, level)].append((index, turn))
    counts: dict[int, list[int]] = defaultdict(list)  # level -> its turn count in each task that has it
    for (_, level), members in turns.items():
        counts[level].append(len(members))
    rng = random.Random(seed)
    dropped: dict[int, set[int]] = defaultdict(set)  # row -> turns whose labels go
    for (_, level), members in sorted(turns.items()):
        cap = int(median(counts[level]))
        if len(members) > cap:
            for index, turn in rng.sample(members, len(members) - cap):
                dropped[index].add(turn)
    balanced = []
    for index, row in enumerate(rows):
        gone = dropped.get(index, set())
        if len(gone) == len(row["gate_labels"]):
            continue
        labels = [IGNORE_INDEX if turn in gone else lab for lab, turn in zip(row["labels"], row["turn_ids"])]
        balanced.append({**row, "labels": labels})
    return balanced


@dataclass
class DialogueCollator:
    """Right-pads encoded dialogues into a batch (with their ``dialogue_index`` when the rows carry one).

    Args:
        pad_token_id: id written on padding positions.
        with_gate: also emit ``turn_ids``, ``gate_mask`` and ``gate_labels`` (False for plain
            peft models, which do not take them).
    """

    pad_token_id: int
    with_gate: bool = True

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        turns = max(len(r["gate_labels"]) for r in rows)

        def pad(key: str, value: int, size: int) -> torch.Tensor:
            return torch.tensor([r[key] + [value] * (size - len(r[key])) for r in rows], dtype=torch.long)

        batch = {
            "input_ids": pad("input_ids", self.pad_token_id, width),  # [batch, seq]
            "attention_mask": torch.tensor(
                [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows], dtype=torch.long
            ),  # [batch, seq]
            "labels": pad("labels", IGNORE_INDEX, width),  # [batch, seq]
        }
        if "dialogue_index" in rows[0]:
            batch["dialogue_index"] = torch.tensor([r["dialogue_index"] for r in rows], dtype=torch.long)  # [batch]
        if self.with_gate:
            batch["turn_ids"] = pad("turn_ids", -1, width)  # [batch, seq]
            batch["gate_mask"] = pad("gate_mask", 0, width)  # [batch, seq]
            batch["gate_labels"] = pad("gate_labels", IGNORE_INDEX, turns)  # [batch, turns]
        return batch


class LengthBucketSampler(Sampler[int]):
    """Seeded shuffling that batches dialogues of similar length together.

    Each epoch's order depends only on ``(seed, epoch)``, so a resumed run sees the same
    batches as an uninterrupted one. With ``sort=True`` the shuffled dialogues are cut into
    buckets of ``bucket_size`` global batches, each bucket is sorted by length and cut into
    global batches, and the batches are shuffled. Consecutive runs of ``global_batch_size``
    indices form one global batch, which accelerate splits across processes in order: the
    same dialogues meet in one optimizer step whatever the number of processes.

    Args:
        lengths: token count of every dialogue.
        global_batch_size: dialogues per micro-batch over all processes.
        bucket_size: global batches per bucket.
        seed: seed of the order.
        sort: bucket by length (False: plain seeded shuffling).
    """

    def __init__(self, lengths: Sequence[int], global_batch_size: int, bucket_size: int = 32, seed: int = 0, sort: bool = True):
        self.lengths = list(lengths)
        self.global_batch_size = global_batch_size
        self.bucket_size = bucket_size
        self.seed = seed
        self.sort = sort
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's global batches, in order."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.global_batch_size
        if not self.sort:
            return [order[i : i + size] for i in range(0, len(order), size)]
        span = size * self.bucket_size
        batches = []
        for start in range(0, len(order), span):
            bucket = sorted(order[start : start + span], key=lambda i: -self.lengths[i])
            batches.extend(bucket[i : i + size] for i in range(0, len(bucket), size))
        shuffle = torch.randperm(len(batches), generator=generator).tolist()
        # The ragged last batch stays last, so every earlier global batch is full.
        full = [b for b in shuffle if len(batches[b]) == size] + [b for b in shuffle if len(batches[b]) != size]
        return [batches[b] for b in full]

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of padded positions when each batch is padded to its longest row.

    Args:
        lengths: token count of every dialogue.
        batches: index lists (per-device micro-batches).
    """
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches if b)
    return 1.0 - real / padded if padded else 0.0


def padding_report(lengths: Sequence[int], per_device_batch_size: int, world_size: int = 1, bucket_size: int = 32, seed: int = 0) -> dict[str, float]:
    """Padding fraction of one epoch: length buckets against plain pad-to-longest batches.

    Args:
        lengths: token count of every dialogue.
        per_device_batch_size: rows per device and micro-batch.
        world_size: processes.
        bucket_size: global batches per bucket.
        seed: seed of the order.

    Returns:
        ``{"bucket": fraction, "pad": fraction}``.
    """
    report = {}
    for name, sort in (("bucket", True), ("pad", False)):
        sampler = LengthBucketSampler(lengths, per_device_batch_size * world_size, bucket_size, seed, sort=sort)
        micro = [b[i : i + per_device_batch_size] for b in sampler.batches() for i in range(0, len(b), per_device_batch_size)]
        report[name] = padding_fraction(lengths, micro)
    return report
