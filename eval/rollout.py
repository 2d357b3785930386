"""Batched multi-turn rollouts: a system answers every user turn of scripted dialogues, its
own replies staying in the context.

Two modes give the same greedy replies:

* ``cached`` (default): one KV cache per batch is carried from turn to turn, so each turn
  prefills only the new user message (for the gated model, each earlier turn's keys and
  values were computed with that turn's gate, as in training; the gate's state travels on
  the cache). Rows whose reply ended early keep their padding in the cache, masked out.
* ``reencode``: every turn re-encodes the whole dialogue so far from scratch (the
  throughput reference).

Both modes feed the very same token ids: the replies' generated ids, not a re-tokenisation
of their text, joined by the chat template's own separators.

A system with a ``repeat_guard`` decodes with :class:`moe_empathy.generation.ReplyRepetitionLogitsProcessor`,
given each row's earlier replies (generated ids, stop tokens left out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import groupby
from typing import TYPE_CHECKING, Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import LogitsProcessorList, PreTrainedTokenizerBase

from moe_empathy.cache import GrowingCache, gate_state_of
from moe_empathy.modeling_moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.turns import padding_id

from .chat_tokens import RowTokens, TurnTokens, batch_tensors, eos_ids_of, split_reply
from .systems import EvalSystem

if TYPE_CHECKING:
    from .progress import RunProgress

MODES = ("cached", "reencode")


@dataclass
class DialogueRollout:
    """One dialogue as a system played it.

    Args:
        system: the system's name.
        dialogue_id, task, task_level: from the script.
        users: the scripted user messages.
        replies: the system's replies (decoded, special tokens dropped).
        levels: the expected empathy level of each reply (the script's labels).
        gate: ``[turns][experts]`` the mixture used for each turn (chosen by the gate, or
            forced), or None for systems without experts.
        new_tokens: generated tokens of each reply (its end-of-turn token included).
    """

    system: str
    dialogue_id: str
    task: str
    task_level: str
    users: list[str]
    replies: list[str] = field(default_factory=list)
    levels: list[str] = field(default_factory=list)
    gate: list[list[float]] | None = None
    new_tokens: list[int] = field(default_factory=list)


@dataclass
class RolloutStats:
    """Throughput of one rollout run.

    Args:
        mode: ``cached`` or ``reencode``.
        turns: replies generated.
        seconds: wall-clock time spent generating.
        prefill_tokens: prompt tokens run through the model (padding included).
        decode_tokens: tokens decoded (rows x decode steps, finished rows included: the work done).
        resumed_batches: batches read back from an interrupted run's progress, not computed.
        resumed_seconds: the seconds those batches took when they were computed.
    """

    mode: str
    turns: int = 0
    seconds: float = 0.0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    resumed_batches: int = 0
    resumed_seconds: float = 0.0

    @property
    def turns_per_second(self) -> float:
        return self.turns / self.seconds if self.seconds else float("nan")

    @property
    def tokens_per_second(self) -> float:
        """Prefill and decoded tokens per second."""
        return (self.prefill_tokens + self.decode_tokens) / self.seconds if self.seconds else float("nan")

    def summary(self) -> dict:
        """The report's throughput entry."""
        return {
            "mode": self.mode, "turns": self.turns, "seconds": self.seconds, "turns_per_second": self.turns_per_second,
            "prefill_tokens": self.prefill_tokens, "decode_tokens": self.decode_tokens, "tokens_per_second": self.tokens_per_second,
        }

    def add(self, other: "RolloutStats") -> None:
        """Adds another run's turns, seconds and tokens (e.g. one batch's) to these.

        Args:
            other: the counters to add.
        """
        self.turns += other.turns
        self.seconds += other.seconds
        self.prefill_tokens += other.prefill_tokens
        self.decode_tokens += other.decode_tokens


def rollout_batch(
    system: EvalSystem,
    records: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int = 48,
    mode: str = "cached",
    stats: RolloutStats | None = None,
    on_turn=None,
) -> list[DialogueRollout]:
    """Plays one batch of dialogues with the same number of turns.

    Args:
        system: the system that answers.
        records: checked dialogue records, all with the same number of turns.
        tokenizer: the model's tokenizer (with its chat template).
        max_new_tokens: cap on each reply's length.
        mode: ``cached`` (carry the KV cache) or ``reencode`` (re-encode every turn).
        stats: throughput counters to update, or None.
        on_turn: called with the batch size after every turn (progress), or None.

    Returns:
        One :class:`DialogueRollout` per record, in order.
    """
    if mode not in MODES:
        raise ValueError(f"unknown rollout mode {mode!r}; choose from {MODES}")
    counts = {len(r["turns"]) // 2 for r in records}
    if len(counts) != 1:
        raise ValueError(f"a rollout batch needs dialogues of one length; got lengths {sorted(counts)}")
    num_turns = counts.pop()
    model = system.model
    pad_id = padding_id(tokenizer)
    eos_ids = eos_ids_of(model, tokenizer)
    template = TurnTokens(tokenizer)
    results = [
        DialogueRollout(
            system.name,
            str(r.get("dialogue_id", i)),
            r["task"],
            r["task_level"],
            users=[t["content"] for t in r["turns"][0::2]],
            levels=[t["level"] for t in r["turns"][1::2]],
            gate=[] if system.gated or system.forced_expert else None,
        )
        for i, r in enumerate(records)
    ]
    names = getattr(model, "expert_names", None)
    # The one-hot mixture of each row's selected expert, for systems that select one.
    forced = [[float(n == system.forced_expert(r)) for n in names] for r in records] if system.forced_expert else None
    real = [RowTokens() for _ in records]  # every row's tokens so far, without padding
    reply_ids: list[list[list[int]]] = [[] for _ in records]  # each row's replies so far, stop tokens left out (the guard's input)
    stops = [""] * len(records)  # the token text that ended each row's last reply
    cache = GrowingCache(model.config.get_text_config()) if mode == "cached" else None
    carried: dict[str, torch.Tensor] | None = None  # cached mode: the batch so far, padding holes masked
    # Turns are given explicitly to a gated model, so that a reply's content can never open a turn.
    with_turns = isinstance(model, MoeEmpathyForCausalLM)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=sorted(eos_ids), return_dict_in_generate=True)
    start = time.perf_counter()
    with system.routing(records), torch.no_grad():
        for turn in range(num_turns):
            chunks = []
            for b, (r, res) in enumerate(zip(records, results)):
                if turn == 0:
                    chunks.append(RowTokens().add(template.first(system.system_message(r), res.users[0]), 0, 1))
                else:
                    closing, opening = template.next(res.users[turn], stops[b])
                    chunks.append(RowTokens().add(closing, turn - 1, 0).add(opening, turn, 1))
            if mode == "cached":
                chunk = batch_tensors(chunks, pad_id)
                carried = chunk if carried is None else {k: torch.cat([carried[k], chunk[k]], 1) for k in chunk}
                inputs = carried
                prefill = inputs["input_ids"].shape[1] - cache.get_seq_length()
            else:
                inputs = batch_tensors([r + c for r, c in zip(real, chunks)], pad_id)
                prefill = inputs["input_ids"].shape[1]
            given = inputs if with_turns else {k: inputs[k] for k in ("input_ids", "attention_mask")}
            prompt_width = inputs["input_ids"].shape[1]
            guard = LogitsProcessorList([system.repeat_guard.processor(reply_ids, prompt_width)] if system.repeat_guard else [])
            out = model.generate(**given, cache=cache, logits_processor=guard, **kwargs)
            new = out.sequences[:, prompt_width:]  # [batch, generated]
            new_turns = torch.full_like(new, turn)  # [batch, generated]
            new_mask = torch.zeros_like(new)
            for b, res in enumerate(results):
                row = new[b].tolist()
                length, stop = split_reply(row, eos_ids)
                stops[b] = tokenizer.convert_ids_to_tokens(stop) if stop is not None else ""
                new_mask[b, :length] = 1
                real[b] = real[b] + chunks[b].add(row[:length], turn, 0)
                reply_ids[b].append([t for t in row[:length] if t not in eos_ids])
                res.new_tokens.append(length)
                res.replies.append(tokenizer.decode(row[:length], skip_special_tokens=True).strip())
                if res.gate is not None:
                    state = gate_state_of(cache if mode == "cached" else out.cache)
                    res.gate.append(forced[b] if forced is not None else state.turn_weights[b, turn].tolist())
            if mode == "cached":
                carried = {
                    "input_ids": out.sequences,
                    "attention_mask": torch.cat([carried["attention_mask"], new_mask], 1),
                    "turn_ids": torch.cat([carried["turn_ids"], new_turns], 1),
                    "gate_mask": torch.cat([carried["gate_mask"], torch.zeros_like(new)], 1),
                }
            if stats is not None:
                stats.turns += len(records)
                stats.prefill_tokens += prefill * len(records)
                stats.decode_tokens += new.numel()
            if on_turn is not None:
                on_turn(len(records))
    if stats is not None:
        stats.seconds += time.perf_counter() - start
    return results


def make_batches(records: list[dict], batch_size: int) -> list[list[int]]:
    """Indices of the records in each batch: equal length, in stable order.

    Args:
        records: checked dialogue records.
        batch_size: the most dialogues per batch.
    """
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    key = lambda i: len(records[i]["turns"])  # noqa: E731
    batches = []
    for _, group in groupby(sorted(range(len(records)), key=key), key=key):
        group = list(group)
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    return batches


def progress_bar() -> Progress:
    """A rich progress bar counting turns, with turns/s and ETA."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("turns"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )


def rollout(
    systems: list[EvalSystem],
    records: list[dict],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int = 40,
    max_new_tokens: int = 48,
    mode: str = "cached",
    progress: Progress | None = None,
    journal: "RunProgress | None" = None,
    on_batch: Callable[[str, int], None] | None = None,
) -> tuple[dict[str, list[DialogueRollout]], dict[str, RolloutStats]]:
    """Plays every dialogue with every system.

    Args:
        systems: the systems.
        records: checked dialogue records (see :mod:`.dialogues`).
        tokenizer: the tokenizer shared by the systems.
        batch_size: dialogues generated together.
        max_new_tokens: cap on each reply's length.
        mode: ``cached`` or ``reencode``.
        progress: a rich progress display to add a task to, or None for no display.
        journal: the run's progress (:class:`.progress.RunProgress`): batches finished by an
            earlier session are read from it instead of computed, and every computed batch is
            recorded in it (under ``<system>.<mode>``); None keeps nothing.
        on_batch: called with ``(<system>.<mode>, batch index)`` after each computed batch
            is recorded, or None.

    Returns:
        ``({system: rollouts in record order}, {system: throughput})``; a system's throughput
        counts the batches read from ``journal`` too (their number and seconds are in its
        ``resumed_batches`` and ``resumed_seconds``).
    """
    total = sum(len(r["turns"]) // 2 for r in records) * len(systems)
    task = progress.add_task(f"rollouts ({mode})", total=total, rate="") if progress is not None else None
    done = {"turns": 0, "start": time.perf_counter()}

    def advance(n: int) -> None:
        done["turns"] += n
        if progress is not None:
            rate = done["turns"] / max(time.perf_counter() - done["start"], 1e-9)
            progress.update(task, advance=n, rate=f"{rate:.2f} turns/s")

    results, stats = {}, {}
    batches = make_batches(records, batch_size)
    for system in systems:
        key = f"{system.name}.{mode}"
        totals = stats[system.name] = RolloutStats(mode)
        played: dict[int, DialogueRollout] = {}
        finished = journal.finished(key, batches, records) if journal is not None else {}
        for index, batch in enumerate(batches):
            if index in finished:
                out, counted = finished[index]
                totals.add(counted)
                totals.resumed_batches += 1
                totals.resumed_seconds += counted.seconds
                if progress is not None:
                    progress.update(task, advance=counted.turns)
            else:
                counted = RolloutStats(mode)
                out = rollout_batch(system, [records[i] for i in batch], tokenizer, max_new_tokens, mode, counted, advance)
                totals.add(counted)
                if journal is not None:
                    journal.record(key, index, batch, out, counted)
                if on_batch is not None:
                    on_batch(key, index)
            played.update(zip(batch, out))
        results[system.name] = [played[i] for i in range(len(records))]
    return results, stats
