"""Statistics over dialogues, vectorised with numpy: the cluster bootstrap, per-dialogue trends,
and how a gate's per-turn choices follow the expected levels.

Arrays are ``[D, T]`` (dialogues x turns, NaN or -1 where a dialogue has fewer turns);
bootstrap statistics map resampled dialogue indices ``[B, n]`` to ``[B]`` values.
"""

from __future__ import annotations

from typing import Callable

import numpy as np


# --------------------------------------------------------------------- bootstrap


def bootstrap(
    statistic: Callable[[np.ndarray], np.ndarray], population: np.ndarray, samples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict:
    """A statistic over dialogues and its percentile bootstrap interval.

    Args:
        statistic: maps dialogue indices ``[B, n]`` to ``[B]`` values (vectorised over resamples).
        population: the dialogue indices the statistic is about.
        samples: bootstrap resamples.
        seed: the resampling seed (fixed so that reports are reproducible).
        level: the interval's coverage.

    Returns:
        ``{"value", "ci_low", "ci_high", "n"}``; values are None where undefined (no data).
    """
    population = np.asarray(population)
    if population.size == 0:
        return {"value": None, "ci_low": None, "ci_high": None, "n": 0}
    with np.errstate(invalid="ignore", divide="ignore"):
        value = float(statistic(population[None, :])[0])
        rng = np.random.default_rng(seed)
        draws = statistic(population[rng.integers(0, population.size, (samples, population.size))])
    draws = draws[np.isfinite(draws)]
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2]) if draws.size else (np.nan, np.nan)
    clean = lambda x: float(x) if np.isfinite(x) else None  # noqa: E731
    return {"value": clean(value), "ci_low": clean(low), "ci_high": clean(high), "n": int(population.size)}


def turn_mean(values: np.ndarray, idx: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """Turn-pooled mean of ``values [D, T]`` over resampled dialogues ``idx [B, n]`` -> ``[B]``."""
    picked = values[idx]  # [B, n, T]
    if columns is not None:
        picked = picked[..., columns]
    valid = np.isfinite(picked)
    return np.where(valid, picked, 0).sum((1, 2)) / valid.sum((1, 2))


# --------------------------------------------------------------------- per-dialogue statistics


def per_dialogue_slope(values: np.ndarray) -> np.ndarray:
    """Least-squares slope of ``values [D, T]`` over the turn index, per dialogue -> ``[D]``
    (NaN with fewer than two turns)."""
    turns = np.arange(values.shape[1], dtype=float)
    valid = np.isfinite(values)
    count = valid.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        x_mean = np.where(valid, turns, 0).sum(1) / count
        y_mean = np.where(valid, values, 0).sum(1) / count
        dx = np.where(valid, turns - x_mean[:, None], 0)
        dy = np.where(valid, values - y_mean[:, None], 0)
        slope = (dx * dy).sum(1) / (dx * dx).sum(1)
    return np.where(count >= 2, slope, np.nan)


def per_dialogue_std(values: np.ndarray) -> np.ndarray:
    """Population standard deviation of each dialogue's values ``[D, T]`` -> ``[D]``."""
    with np.errstate(invalid="ignore"):
        return np.nanstd(values, axis=1)


def drift_onset(scores: np.ndarray, targets: np.ndarray, tolerance: float) -> np.ndarray:
    """The first turn (1-based) whose score is more than ``tolerance`` from its target, per
    dialogue -> ``[D]``; a dialogue that never leaves the band gets its length + 1."""
    outside = np.abs(scores - targets) > tolerance  # NaN compares False
    lengths = np.isfinite(targets).sum(1)
    first = np.argmax(outside, axis=1) + 1
    return np.where(outside.any(1), first, lengths + 1).astype(float)


# --------------------------------------------------------------------- gate statistics


def gate_choices(gate: np.ndarray) -> np.ndarray:
    """Expert of largest weight per turn ``[D, T]`` (-1 where there is no turn)."""
    valid = np.isfinite(gate).all(-1)
    return np.where(valid, np.nan_to_num(gate, nan=-1).argmax(-1), -1)


def gate_entropy(gate: np.ndarray) -> np.ndarray:
    """Entropy of each turn's mixture, normalised by ``log E`` (0 = one expert, 1 = uniform) -> ``[D, T]``."""
    with np.errstate(invalid="ignore", divide="ignore"):
        terms = np.where(gate > 0, -gate * np.log(gate), 0.0)
    entropy = terms.sum(-1) / np.log(gate.shape[-1])
    return np.where(np.isfinite(gate).all(-1), entropy, np.nan)


def shift_events(choices: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """How the gate follows each change of expected level.

    A shift happens at turn ``t`` when ``labels[t] != labels[t-1]``. It is followed after
    ``j`` turns when ``choices[t + j]`` is the first choice equal to the new level while the
    label stays at it; a shift not reached before the next one (or the end) is not followed.

    Args:
        choices: ``[D, T]`` chosen expert per turn.
        labels: ``[D, T]`` expected level per turn (-1 = no turn).

    Returns:
        ``[D]`` shifts, ``[D]`` followed shifts, ``[D]`` summed latency (turns) of followed ones.
    """
    num, width = labels.shape
    shifts, followed, latency = np.zeros(num), np.zeros(num), np.zeros(num)
    for d in range(num):
        row = labels[d]
        for t in range(1, width):
            if row[t] < 0 or row[t] == row[t - 1]:
                continue
            shifts[d] += 1
            end = t
            while end + 1 < width and row[end + 1] == row[t]:
                end += 1
            hits = np.flatnonzero(choices[d, t : end + 1] == row[t])
            if hits.size:
                followed[d] += 1
                latency[d] += hits[0]
    return shifts, followed, latency
