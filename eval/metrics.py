"""Empathy-gap, consistency and gate metrics of rollouts, with dialogue-level bootstrap CIs.

Every reply has a measured score (1-5, from a scorer) and an expected level (the script's
label), mapped to a target score: the middle of the level's band on the 1-5 scale
(:data:`moe_empathy.train.taxonomy.LEVEL_TARGET`: the scale maps total EPITOME strength 0-6
linearly to 1-5; a level is a band of that total: low 0-1, medium 2-3, high 4-6). A reply is
in band when its score is within ``tolerance`` of its target. The definitions are spelled out
in ``eval/README.md``. Only numpy is needed here (no torch).

Confidence intervals resample whole dialogues (a cluster bootstrap): turns of one dialogue
are not independent. Comparisons with the base model are paired: the same resampled
dialogues for both systems (every system plays the same scripts). The statistics themselves
(bootstrap, trends, gate choices) are in :mod:`.stats`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from moe_empathy.train.taxonomy import LEVEL_TARGET, LEVELS

from .stats import bootstrap, drift_onset, gate_choices, gate_entropy, per_dialogue_slope, per_dialogue_std, shift_events, turn_mean

if TYPE_CHECKING:  # annotations only: the rollout module needs torch
    from .helpfulness import HelpfulnessScorer
    from .rollout import DialogueRollout
    from .scoring import Scorer

BUCKETS = {"1-5": (1, 5), "6-15": (6, 15), "16-30": (16, 30), "30+": (30, None)}  # inclusive turn ranges (1-based)
EMPTY_REPLY_SCORE = 1.0  # an empty reply shows no empathy


def replies_in_context(rollouts: list[DialogueRollout]) -> tuple[list[str], list[list[dict]], list[tuple[int, int]]]:
    """Every non-empty reply of some rollouts with the dialogue before it.

    Args:
        rollouts: one system's rollouts.

    Returns:
        ``(replies, contexts, where)``: ``where[i]`` is reply ``i``'s ``(dialogue, turn)``.
    """
    responses, contexts, where = [], [], []
    for d, r in enumerate(rollouts):
        history: list[dict] = []
        for t, (user, reply) in enumerate(zip(r.users, r.replies)):
            history.append({"role": "user", "content": user})
            if reply.strip():
                responses.append(reply)
                contexts.append(list(history))
                where.append((d, t))
            history.append({"role": "assistant", "content": reply})
    return responses, contexts, where


def score_rollouts(rollouts: list[DialogueRollout], scorer: Scorer) -> list[list[float]]:
    """Scores every reply of some rollouts in its context (the dialogue before it).

    Args:
        rollouts: one system's rollouts.
        scorer: an empathy scorer.

    Returns:
        ``[dialogues][turns]`` scores on the 1-5 scale; empty replies get
        :data:`EMPTY_REPLY_SCORE` without being sent to the scorer.
    """
    responses, contexts, where = replies_in_context(rollouts)
    scores = [[EMPTY_REPLY_SCORE] * len(r.replies) for r in rollouts]
    for (d, t), s in zip(where, scorer.score(responses, contexts) if responses else []):
        scores[d][t] = float(s.score)
    return scores


def helpfulness_of_rollouts(rollouts: list[DialogueRollout], scorer: HelpfulnessScorer) -> list[list[float]]:
    """Helpfulness (1-5) of every reply of some rollouts in its context; an empty reply gets 1.

    Args:
        rollouts: one system's rollouts.
        scorer: the helpfulness scorer.
    """
    responses, contexts, where = replies_in_context(rollouts)
    values = [[1.0] * len(r.replies) for r in rollouts]
    for (d, t), v in zip(where, scorer.score(responses, contexts) if responses else []):
        values[d][t] = float(v)
    return values


@dataclass
class EvalTable:
    """Per-turn arrays of all systems on the same dialogues (NaN / -1 where a dialogue has
    fewer turns).

    Args:
        tasks: ``[D]`` task of each dialogue.
        task_levels: ``[D]`` the task's own level.
        targets: ``[D, T]`` target score of each reply.
        labels: ``[D, T]`` expected level index (into ``expert_names``), -1 for no turn.
        scores: ``{system: [D, T]}`` measured scores.
        gates: ``{system: [D, T, E]}`` per-turn expert mixtures of systems that have them.
        expert_names: the levels, in expert order.
        replies: ``{system: [dialogues][turns]}`` the replies' text (repetition metrics).
        helpfulness: ``{system: [D, T]}`` helpfulness of each reply (1-5), where it was scored.
    """

    tasks: np.ndarray
    task_levels: np.ndarray
    targets: np.ndarray
    labels: np.ndarray
    scores: dict[str, np.ndarray]
    gates: dict[str, np.ndarray]
    expert_names: list[str]
    replies: dict[str, list[list[str]]] = field(default_factory=dict)
    helpfulness: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_dialogues(self) -> int:
        return len(self.tasks)


def build_table(rollouts: dict[str, list[DialogueRollout]], scores: dict[str, list[list[float]]], expert_names: list[str] = list(LEVELS),
                helpfulness: dict[str, list[list[float]]] | None = None) -> EvalTable:
    """Aligns rollouts and their scores into arrays.

    Args:
        rollouts: ``{system: rollouts}``, every system on the same dialogues in the same order.
        scores: ``{system: [dialogues][turns]}`` from :func:`score_rollouts`.
        expert_names: the levels, in expert order (gate columns).
        helpfulness: ``{system: [dialogues][turns]}`` from :func:`helpfulness_of_rollouts`, or None.
    """
    reference = next(iter(rollouts.values()))
    for name, played in rollouts.items():
        if [r.dialogue_id for r in played] != [r.dialogue_id for r in reference]:
            raise ValueError(f"system {name} played other dialogues than {next(iter(rollouts))}; metrics need the same scripts")
    num, width = len(reference), max(len(r.levels) for r in reference)
    targets = np.full((num, width), np.nan)
    labels = np.full((num, width), -1)
    for d, r in enumerate(reference):
        targets[d, : len(r.levels)] = [LEVEL_TARGET[level] for level in r.levels]
        labels[d, : len(r.levels)] = [expert_names.index(level) for level in r.levels]

    def matrix(rows: list[list[float]]) -> np.ndarray:  # [D, T], NaN past a dialogue's end
        values = np.full((num, width), np.nan)
        for d, row in enumerate(rows):
            values[d, : len(row)] = row
        return values

    table_scores, gates = {}, {}
    for name, played in rollouts.items():
        table_scores[name] = matrix(scores[name])
        if played[0].gate is not None:
            gate = np.full((num, width, len(expert_names)), np.nan)
            for d, r in enumerate(played):
                gate[d, : len(r.gate)] = r.gate
            gates[name] = gate
    return EvalTable(
        tasks=np.array([r.task for r in reference]),
        task_levels=np.array([r.task_level for r in reference]),
        targets=targets,
        labels=labels,
        scores=table_scores,
        gates=gates,
        expert_names=list(expert_names),
        replies={name: [list(r.replies) for r in played] for name, played in rollouts.items()},
        helpfulness={name: matrix(rows) for name, rows in (helpfulness or {}).items()},
    )


# --------------------------------------------------------------------- repetition

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _normalise(text: str) -> str:
    return " ".join(text.split())


def split_sentences(reply: str) -> list[str]:
    """A reply's sentences: split after ``.``, ``!`` or ``?`` followed by white space,
    white space collapsed, empty pieces dropped."""
    return [s for s in (_normalise(p) for p in _SENTENCE_END.split(reply)) if s]


def copy_flags(replies: list[str]) -> np.ndarray:
    """Which replies of one dialogue copy earlier ones -> ``[T]`` of 0/1.

    A reply is a copy when it has at least one sentence and at least half of its sentences
    appear verbatim (white space collapsed, case kept) inside one of the dialogue's earlier
    replies. The first reply is never a copy.

    Args:
        replies: one dialogue's replies, in turn order.
    """
    flags = np.zeros(len(replies))
    earlier: list[str] = []
    for t, reply in enumerate(replies):
        pieces = split_sentences(reply)
        copied = sum(any(piece in before for before in earlier) for piece in pieces)
        flags[t] = float(bool(pieces) and 2 * copied >= len(pieces))
        earlier.append(_normalise(reply))
    return flags


def reply_words(reply: str) -> list[str]:
    """A reply's words: lower-cased, split on white space."""
    return reply.lower().split()


def distinct_n(replies: list[str], n: int = 2) -> tuple[int, int]:
    """Distinct n-grams of words over some replies (n-grams never span two replies).

    Args:
        replies: the replies.
        n: n-gram length.

    Returns:
        ``(unique n-grams, n-grams)``; distinct-n is their ratio.
    """
    grams = [tuple(w[i : i + n]) for w in map(reply_words, replies) for i in range(len(w) - n + 1)]
    return len(set(grams)), len(grams)


def repetition_metrics(table: EvalTable, system: str, population: np.ndarray, samples: int, seed: int) -> dict:
    """Copy rate, distinct-2, mean reply length (words) and, where scored, mean helpfulness of
    one system's replies.

    Args:
        table: the aligned arrays (with ``replies``).
        system: the system's name.
        population: indices of the dialogues to summarise.
        samples, seed: bootstrap settings (distinct-2 pools n-grams, so it gets no interval).
    """
    dialogues = table.replies[system]
    width = table.targets.shape[1]
    copies, lengths = np.full((len(dialogues), width), np.nan), np.full((len(dialogues), width), np.nan)
    for d, replies in enumerate(dialogues):
        copies[d, : len(replies)] = copy_flags(replies)
        lengths[d, : len(replies)] = [len(reply_words(r)) for r in replies]
    unique, total = distinct_n([r for d in population for r in dialogues[d]], 2)
    boot = lambda fn: bootstrap(fn, population, samples, seed)  # noqa: E731
    metrics = {
        "copy_rate": boot(lambda idx: turn_mean(copies, idx)),
        "distinct_2": {"value": unique / total if total else None, "ci_low": None, "ci_high": None, "n": int(population.size)},
        "reply_words": boot(lambda idx: turn_mean(lengths, idx)),
    }
    if system in table.helpfulness:
        metrics["helpfulness"] = boot(lambda idx: turn_mean(table.helpfulness[system], idx))
    return metrics


# --------------------------------------------------------------------- metric sets


def _bucket_columns(width: int) -> dict[str, np.ndarray]:
    turns = np.arange(1, width + 1)
    return {name: (turns >= lo) & (turns <= (hi if hi is not None else width)) for name, (lo, hi) in BUCKETS.items()}


def empathy_metrics(table: EvalTable, system: str, population: np.ndarray, samples: int, seed: int, tolerance: float) -> dict:
    """Gap, score, over-empathy and consistency of one system over some dialogues.

    Args:
        table: the aligned arrays.
        system: the system's name.
        population: indices of the dialogues to summarise.
        samples, seed: bootstrap settings.
        tolerance: half-width of the band around the target.
    """
    scores, targets = table.scores[system], table.targets
    gap = np.abs(scores - targets)
    base = table.scores.get("base")
    low_turns = np.where(table.task_levels[:, None] == "low", 1.0, np.nan) * np.isfinite(targets)
    high_turns = np.where(table.task_levels[:, None] == "high", 1.0, np.nan) * np.isfinite(targets)
    excess = np.clip(scores - targets, 0, None) * low_turns
    above = np.where(np.isfinite(scores), (scores - targets > tolerance).astype(float), np.nan) * low_turns
    in_band = np.where(np.isfinite(scores), (gap <= tolerance).astype(float), np.nan)
    std, slope, gap_slope = per_dialogue_std(scores), per_dialogue_slope(scores), per_dialogue_slope(gap)
    onset = drift_onset(scores, targets, tolerance)
    boot = lambda fn: bootstrap(fn, population, samples, seed)  # noqa: E731
    nanmean = lambda per: (lambda idx: np.nanmean(per[idx], axis=1))  # noqa: E731
    result = {
        "gap": boot(lambda idx: turn_mean(gap, idx)),
        "score": boot(lambda idx: turn_mean(scores, idx)),
        "target": boot(lambda idx: turn_mean(targets, idx)),
        "in_band": boot(lambda idx: turn_mean(in_band, idx)),
        "over_empathy_low_tasks": boot(lambda idx: turn_mean(excess, idx)),
        "over_empathy_rate_low_tasks": boot(lambda idx: turn_mean(above, idx)),
        "score_std": boot(nanmean(std)),
        "score_slope": boot(nanmean(slope)),
        "gap_slope": boot(nanmean(gap_slope)),
        "drift_onset_median": boot(lambda idx: np.median(onset[idx], axis=1)),
    }
    if base is not None:
        base_gap = np.abs(base - targets)
        result["gap_reduction_vs_base"] = boot(lambda idx: 1 - turn_mean(gap, idx) / turn_mean(base_gap, idx))
        result["score_factor_high_tasks_vs_base"] = boot(lambda idx: turn_mean(scores * high_turns, idx) / turn_mean(base * high_turns, idx))
    buckets = {}
    for name, columns in _bucket_columns(targets.shape[1]).items():
        if not columns.any():
            continue
        entry = {
            "gap": boot(lambda idx, c=columns: turn_mean(gap, idx, c)),
            "score": boot(lambda idx, c=columns: turn_mean(scores, idx, c)),
            "in_band": boot(lambda idx, c=columns: turn_mean(in_band, idx, c)),
        }
        if base is not None:
            entry["gap_reduction_vs_base"] = boot(lambda idx, c=columns: 1 - turn_mean(gap, idx, c) / turn_mean(base_gap, idx, c))
        buckets[name] = entry
    result["by_bucket"] = buckets
    return result


def gate_metrics(table: EvalTable, system: str, population: np.ndarray, samples: int, seed: int) -> dict:
    """How a system's per-turn expert choice matches the expected levels.

    Args:
        table: the aligned arrays.
        system: a system with per-turn mixtures (gated, or external's forced choice).
        population: indices of the dialogues to summarise.
        samples, seed: bootstrap settings.
    """
    gate, labels = table.gates[system], table.labels
    choices = gate_choices(gate)
    valid = labels >= 0
    correct = np.where(valid, (choices == labels).astype(float), np.nan)
    shift_turn = np.zeros_like(valid)
    shift_turn[:, 1:] = valid[:, 1:] & (labels[:, 1:] != labels[:, :-1])
    correct_after_shift = np.where(shift_turn, correct, np.nan)
    switches = np.full(labels.shape, np.nan)
    switches[:, 1:] = np.where(valid[:, 1:], (choices[:, 1:] != choices[:, :-1]).astype(float), np.nan)
    entropy = gate_entropy(gate)
    shifts, followed, latency = shift_events(choices, labels)
    boot = lambda fn: bootstrap(fn, population, samples, seed)  # noqa: E731
    names = table.expert_names
    confusion = np.zeros((len(names), len(names)), dtype=int)
    for d in population:
        for t in np.flatnonzero(valid[d]):
            confusion[labels[d, t], choices[d, t]] += 1
    return {
        "accuracy": boot(lambda idx: turn_mean(correct, idx)),
        "accuracy_at_shifts": boot(lambda idx: turn_mean(correct_after_shift, idx)),
        "entropy": boot(lambda idx: turn_mean(entropy, idx)),
        "switch_rate": boot(lambda idx: turn_mean(switches, idx)),
        "shift_follow_rate": boot(lambda idx: followed[idx].sum(1) / shifts[idx].sum(1)),
        "shift_latency": boot(lambda idx: latency[idx].sum(1) / followed[idx].sum(1)),
        "shifts": int(shifts[population].sum()),
        "confusion": {"labels": names, "rows_expected_columns_chosen": confusion.tolist()},
    }


def by_turn(table: EvalTable, system: str) -> dict:
    """Mean score, target and gap at each turn (1-based position = list index + 1), per task level.

    Args:
        table: the aligned arrays.
        system: the system's name.
    """
    out = {}
    groups = {"all": np.ones(table.num_dialogues, dtype=bool)} | {level: table.task_levels == level for level in LEVELS}
    for group, rows in groups.items():
        if not rows.any():
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=RuntimeWarning)  # turns no dialogue of the group has
            scores, targets = table.scores[system][rows], table.targets[rows]
            out[group] = {
                "score": _listify(np.nanmean(scores, 0)),
                "target": _listify(np.nanmean(targets, 0)),
                "gap": _listify(np.nanmean(np.abs(scores - targets), 0)),
            }
    return out


def _listify(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


def compute_metrics(table: EvalTable, tolerance: float, samples: int = 1000, seed: int = 0) -> dict:
    """All metrics of all systems: overall, per task, per turn bucket, per turn, and the gate.

    Args:
        table: the aligned arrays.
        tolerance: half-width of the band around the target.
        samples: bootstrap resamples.
        seed: bootstrap seed.
    """
    everyone = np.arange(table.num_dialogues)
    systems = {}
    for name in table.scores:
        entry = {"overall": empathy_metrics(table, name, everyone, samples, seed, tolerance), "by_task": {}}
        for task in sorted(set(table.tasks)):
            entry["by_task"][task] = empathy_metrics(table, name, np.flatnonzero(table.tasks == task), samples, seed, tolerance)
            entry["by_task"][task].pop("by_bucket")
        entry["by_turn"] = by_turn(table, name)
        if name in table.replies:
            entry["repetition"] = repetition_metrics(table, name, everyone, samples, seed)
        if name in table.gates:
            entry["gate"] = gate_metrics(table, name, everyone, samples, seed)
            entry["gate_by_task"] = {
                task: gate_metrics(table, name, np.flatnonzero(table.tasks == task), samples, seed) for task in sorted(set(table.tasks))
            }
        systems[name] = entry
    return systems
