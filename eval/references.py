"""References for the evaluation's gap that need no model, on the same scripts' targets: the
constant reply, the task-selection ceiling, and the label ceilings of simple readers (how much
of a turn's expected level a lookup on the dialogue's text recovers).

Only numpy is needed (like :mod:`.metrics`).
"""

from __future__ import annotations

import re
from collections import Counter

import numpy as np

from moe_empathy.train.taxonomy import LEVEL_TARGET, LEVELS

from .metrics import EvalTable
from .stats import bootstrap, turn_mean


def best_constant(targets: np.ndarray) -> tuple[float, float]:
    """The single fixed score with the smallest mean ``|target - score|`` over some targets, and
    that gap: the targets' median (lower median for an even count: any value between the two
    middle ones gives the same gap).

    Args:
        targets: ``[n]`` target scores (NaN ignored).
    """
    values = np.sort(targets[np.isfinite(targets)])
    if values.size == 0:
        return float("nan"), float("nan")
    best = float(values[(values.size - 1) // 2])
    return best, float(np.abs(values - best).mean())


def reference_gaps(table: EvalTable, population: np.ndarray, samples: int, seed: int) -> dict:
    """Gaps that need no model, on the same scripts' targets:

    * ``constant_reply``: the best single fixed score at every turn of every dialogue (what
      the same reply everywhere would reach with a perfectly calibrated scorer);
    * ``task_selection``: the best fixed score per task (the ceiling of any choice made from
      the task alone, such as ``external``'s forced expert, with perfect experts).

    Args:
        table: the aligned arrays.
        population: indices of the dialogues to summarise.
        samples, seed: bootstrap settings.

    Returns:
        ``{"constant_reply": {value, ci_low, ci_high, n, score}, "task_selection": {..., "scores": {task: score}}}``.
    """
    targets = table.targets

    def constant(idx: np.ndarray) -> np.ndarray:
        return np.array([best_constant(targets[row].ravel())[1] for row in idx])

    def by_task(idx: np.ndarray) -> np.ndarray:
        out = []
        for row in idx:
            total = count = 0.0
            for task in set(table.tasks[row]):
                picked = targets[row[table.tasks[row] == task]].ravel()
                _, gap = best_constant(picked)
                n = np.isfinite(picked).sum()
                total, count = total + gap * n, count + n
            out.append(total / count if count else np.nan)
        return np.array(out)

    everyone = targets[population].ravel()
    return {
        "constant_reply": bootstrap(constant, population, samples, seed) | {"score": best_constant(everyone)[0]},
        "task_selection": bootstrap(by_task, population, samples, seed) | {
            "scores": {task: best_constant(targets[population[table.tasks[population] == task]].ravel())[0]
                       for task in sorted(set(table.tasks[population]))}},
    }




# --------------------------------------------------------------------- label ceilings of readers

_NOT_WORD = re.compile(r"[^a-z0-9' ]+")
READERS = ("task only", "task + current message", "task + last two state changes")


def _norm(text: str) -> str:
    return " ".join(_NOT_WORD.sub(" ", text.lower()).split())


def _features(text: str) -> list[str]:
    """A message's words and word pairs (after :func:`_norm`)."""
    words = _norm(text).split()
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class NaiveBayes:
    """A multinomial naive Bayes text classifier over words and word pairs (add-one smoothing).

    Args:
        texts: training messages.
        labels: their classes.
    """

    def __init__(self, texts: list[str], labels: list[str]):
        if not texts:
            raise ValueError("a naive Bayes classifier needs at least one training message")
        self.classes = sorted(set(labels))
        rows = [self.classes.index(label) for label in labels]
        docs = [_features(t) for t in texts]
        self.vocab = {f: i for i, f in enumerate(sorted({f for doc in docs for f in doc}))}
        counts = np.ones((len(self.classes), len(self.vocab)))  # [classes, features], add-one smoothing
        for row, doc in zip(rows, docs):
            np.add.at(counts[row], [self.vocab[f] for f in doc], 1.0)
        self.log_prior = np.log(np.bincount(rows, minlength=len(self.classes)) / len(rows))  # [classes]
        self.log_likelihood = np.log(counts / counts.sum(axis=1, keepdims=True))  # [classes, features]

    def predict(self, text: str) -> str:
        """The most probable class of one message (features unseen in training are ignored)."""
        index = [self.vocab[f] for f in _features(text) if f in self.vocab]
        return self.classes[int(np.argmax(self.log_prior + self.log_likelihood[:, index].sum(axis=1)))]


class StateReader:
    """Reads the user's state from the messages' text alone: whether a message changes the state
    (the first message always sets it), and to which state. Two :class:`NaiveBayes` classifiers
    fitted on the training dialogues' ``user_state`` annotations, so that paraphrases unseen in
    training are still read.

    Args:
        train: labelled dialogue records with ``user_state`` on every user turn.
    """

    def __init__(self, train: list[dict]):
        texts, changed, states = [], [], []
        for record in train:
            previous = None
            for k, u in enumerate(_user_turns(record, needs_state=True)):
                texts.append(u["content"])
                changed.append("change" if k == 0 or u["user_state"] != previous else "same")
                states.append(u["user_state"])
                previous = u["user_state"]
        self.change = NaiveBayes(texts, changed)
        self.state = NaiveBayes([t for t, c in zip(texts, changed) if c == "change"],
                                [s for s, c in zip(states, changed) if c == "change"])

    def changes(self, record: dict) -> list[list[str]]:
        """For each user turn, the states read at the state changes up to it (oldest first); a
        message read as a change to the state already held changes nothing."""
        out, read = [], []
        for k, u in enumerate(_user_turns(record)):
            if k == 0 or self.change.predict(u["content"]) == "change":
                state = self.state.predict(u["content"])
                if not read or state != read[-1]:
                    read.append(state)
            out.append(list(read))
        return out


def _user_turns(record: dict, needs_state: bool = False) -> list[dict]:
    users = [t for t in record["turns"] if t["role"] == "user"]
    for k, u in enumerate(users):
        if needs_state and "user_state" not in u:
            raise ValueError(f"dialogue {record.get('dialogue_id', '?')}: user turn {k + 1} has no user_state; "
                             "fit the readers on the generator's dialogues, which annotate it")
    return users


def reader_keys(record: dict, reader: str, states: StateReader | None = None) -> list[tuple]:
    """The lookup key of each user turn of a dialogue record for one reader.

    Args:
        record: a dialogue record (``task``, ``turns``).
        reader: one of :data:`READERS`.
        states: the fitted :class:`StateReader` (the state-change reader only).
    """
    users = _user_turns(record)
    if reader == "task only":
        return [(record["task"],) for _ in users]
    if reader == "task + current message":
        return [(record["task"], _norm(u["content"])) for u in users]
    if reader != "task + last two state changes":
        raise ValueError(f"unknown reader {reader!r}; choose from {READERS}")
    if states is None:
        raise ValueError("the state-change reader needs a StateReader fitted on training dialogues")
    return [(record["task"], *read[-2:]) for read in states.changes(record)]


def _labels(record: dict) -> list[str]:
    return [t["level"] for t in record["turns"] if t["role"] == "assistant"]


def fit_reader(train: list[dict], reader: str, states: StateReader | None = None) -> dict[tuple, str]:
    """A lookup key -> most frequent level over the training dialogues' turns (ties: lower level).

    Args:
        train: labelled dialogue records of the generator's training split.
        reader: one of :data:`READERS`.
        states: the fitted :class:`StateReader` (the state-change reader only).
    """
    counts: dict[tuple, Counter] = {}
    for record in train:
        for key, level in zip(reader_keys(record, reader, states), _labels(record)):
            counts.setdefault(key, Counter())[level] += 1
    return {key: max(LEVELS, key=lambda level: (c[level], -LEVELS.index(level))) for key, c in counts.items()}


def reader_ceilings(train: list[dict], scripts: list[dict], samples: int, seed: int) -> list[dict]:
    """How much of each turn's expected level simple readers recover on the evaluation scripts.

    Args:
        train: the generator's training-split dialogues (the lookups and the state reader are fitted on them).
        scripts: the evaluated dialogues, in the table's order.
        samples, seed: bootstrap settings (dialogues resampled).

    Returns:
        ``[{"reader", "accuracy", "gap", "seen"}]``: accuracy and gap with intervals; ``seen`` =
        share of turns whose key occurs in training (the others back off to the task's lookup).
    """
    task_lookup = fit_reader(train, "task only")
    states = StateReader(train)
    width = max(len(_labels(r)) for r in scripts)
    out = []
    for reader in READERS:
        lookup = fit_reader(train, reader, states)
        correct, gap = np.full((len(scripts), width), np.nan), np.full((len(scripts), width), np.nan)
        seen = total = 0
        for d, record in enumerate(scripts):
            for t, (key, level) in enumerate(zip(reader_keys(record, reader, states), _labels(record))):
                guess = lookup.get(key)
                seen, total = seen + (guess is not None), total + 1
                if guess is None:
                    if (record["task"],) not in task_lookup:
                        raise ValueError(f"task {record['task']!r} has no dialogue in the readers' training split; "
                                         "fit them on a split that covers every evaluated task")
                    guess = task_lookup[(record["task"],)]
                correct[d, t] = float(guess == level)
                gap[d, t] = abs(LEVEL_TARGET[guess] - LEVEL_TARGET[level])
        population = np.arange(len(scripts))
        out.append({
            "reader": reader,
            "accuracy": bootstrap(lambda idx: turn_mean(correct, idx), population, samples, seed),
            "gap": bootstrap(lambda idx: turn_mean(gap, idx), population, samples, seed),
            "seen": seen / total if total else 0.0,
        })
    return out
