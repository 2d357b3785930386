"""Planning of the synthetic dialogues: everything about a dialogue except its wording.

A *turn* is one exchange: a user message and the assistant's reply (the unit the
model's per-turn gate routes). A plan fixes the task, the scenario (task, situation,
detail) and its split, the persona, the user's state at each turn and so the target
level and mechanisms of each reply. Both backends realise the same plans: the
template backend (:mod:`.synth_template`) and the LLM backend (:mod:`.synth_llm`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from .phrases import load_phrases
from .taxonomy import LEVELS, MECHANISMS, STATE_OFFSET, TASKS, get_task, target_level

SPLITS = ("train", "validation", "test")
MAX_TURNS = 40


@dataclass
class SynthConfig:
    """What to generate.

    Attributes:
        dialogues: number of dialogues in all splits together.
        min_turns: fewest exchanges (user message + reply) in a dialogue.
        max_turns: most exchanges in a dialogue (at most 40).
        seed: dialogue ``i`` depends only on (seed, i), never on ``dialogues``.
        tasks: task names to draw from (default: all eight).
        shift_rate: chance, at each exchange after the first, that the user's
            state changes so that the right level changes.
        off_level_rate: chance that a reply is written at one of the two levels other than
            the one the user's state calls for (drawn evenly). Such a turn is labelled with the
            level it is written at, so that each expert meets its level after every kind of
            message (a forced expert is then asked for nothing it never saw); a gate cannot
            infer those labels, so only an expert corpus uses them (0: every reply fits).
        split_fractions: shares of each task's scenarios in train/validation/test.
    """

    dialogues: int = 1000
    min_turns: int = 2
    max_turns: int = 12
    seed: int = 0
    tasks: tuple[str, ...] = tuple(TASKS)
    shift_rate: float = 0.2
    off_level_rate: float = 0.0
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)

    def __post_init__(self):
        self.tasks = tuple(self.tasks)
        for name in self.tasks:
            get_task(name)
        if not self.tasks:
            raise ValueError("tasks is empty; name at least one of: " + ", ".join(TASKS))
        if self.dialogues < 1:
            raise ValueError(f"dialogues must be at least 1, got {self.dialogues}")
        if not 1 <= self.min_turns <= MAX_TURNS or not 1 <= self.max_turns <= MAX_TURNS:
            raise ValueError(
                f"min_turns and max_turns must lie in 1..{MAX_TURNS}, "
                f"got {self.min_turns} and {self.max_turns}"
            )
        if self.min_turns > self.max_turns:
            raise ValueError(
                f"min_turns ({self.min_turns}) is above max_turns ({self.max_turns}); "
                "pass a --min-turns no larger than --max-turns"
            )
        if not 0.0 <= self.shift_rate <= 1.0:
            raise ValueError(f"shift_rate must lie in [0, 1], got {self.shift_rate}")
        if not 0.0 <= self.off_level_rate <= 1.0:
            raise ValueError(f"off_level_rate must lie in [0, 1], got {self.off_level_rate}")
        if len(self.split_fractions) != 3 or abs(sum(self.split_fractions) - 1) > 1e-6:
            raise ValueError(f"split_fractions must be three shares summing to 1, got {self.split_fractions}")


# ---------------------------------------------------------------- scenarios


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "big")


def scenarios(task: str) -> list[str]:
    """All scenario ids of a task: ``task/situation/detail_index``.

    Args:
        task: a task name.
    """
    spec = load_phrases().tasks[task]
    return [
        f"{task}/{situation}/{i}"
        for situation in spec.situations
        for i in range(len(spec.details))
    ]


def scenario_splits(fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> dict[str, str]:
    """Assign every scenario to one split, per task, in fixed shares.

    Args:
        fractions: shares of train/validation/test among each task's scenarios.

    Returns:
        scenario id -> split name; each task has scenarios in all three splits.
    """
    assignment = {}
    for task in TASKS:
        ids = sorted(scenarios(task), key=_stable_hash)
        n_val = max(1, round(fractions[1] * len(ids)))
        n_test = max(1, round(fractions[2] * len(ids)))
        for i, sid in enumerate(ids):
            assignment[sid] = "validation" if i < n_val else "test" if i < n_val + n_test else "train"
    return assignment


# ---------------------------------------------------------------- plans


@dataclass
class DialoguePlan:
    """Everything about a dialogue except its wording.

    Attributes:
        dialogue_id: unique id, stable for (seed, index).
        task: task name.
        scenario_id: ``task/situation/detail_index``; splits never share one.
        split: train, validation or test.
        persona: name, age, occupation, style of the simulated user.
        states: the user's state at each turn (see ``taxonomy.STATE_OFFSET``).
        levels: empathy level each assistant reply is written at: the one the user's state
            calls for, or another one on an off-level turn (:attr:`SynthConfig.off_level_rate`).
        mechanisms: target mechanism strengths of each assistant reply.
        emotion: the feeling the user names when distressed or upset.
        trigger: index of the task trigger the user discloses at the first rise.
        seed: seed of the dialogue's own random stream.
    """

    dialogue_id: str
    task: str
    scenario_id: str
    split: str
    persona: dict
    states: list[str]
    levels: list[str]
    mechanisms: list[dict[str, int]]
    emotion: str
    trigger: int
    seed: str = field(repr=False, default="")

    @property
    def situation(self) -> str:
        return self.scenario_id.split("/")[1]

    @property
    def detail(self) -> str:
        return load_phrases().tasks[self.task].details[int(self.scenario_id.split("/")[2])]


def _plan_states(rng, task_level: str, turns: int, shift_rate: float) -> list[str]:
    states = ["neutral"]
    for _ in range(1, turns):
        current = target_level(task_level, states[-1])
        options = [s for s in STATE_OFFSET if target_level(task_level, s) != current]
        states.append(rng.choice(options) if rng.random() < shift_rate else states[-1])
    return states


def _plan_levels(rng, task_level: str, states: list[str], off_level_rate: float) -> list[str]:
    levels = [target_level(task_level, s) for s in states]
    if off_level_rate:  # drawn only then, so that the corpora of rate 0 stay as they were
        for turn, level in enumerate(levels):
            if rng.random() < off_level_rate:
                levels[turn] = rng.choice([other for other in LEVELS if other != level])
    return levels


def plan_dialogue(config: SynthConfig, index: int, splits: dict[str, str]) -> DialoguePlan:
    """Plan dialogue ``index`` of a run.

    Args:
        config: the run's configuration.
        index: position of the dialogue in the run.
        splits: scenario id -> split, from :func:`scenario_splits`.
    """
    phrases = load_phrases()
    seed = f"{config.seed}:{index}"
    rng = random.Random(seed)
    task = rng.choice(config.tasks)
    scenario_id = rng.choice(scenarios(task))
    turns = rng.randint(config.min_turns, config.max_turns)
    task_level = TASKS[task].level
    states = _plan_states(rng, task_level, turns, config.shift_rate)
    levels = _plan_levels(rng, task_level, states, config.off_level_rate)
    mechanisms = [dict(zip(MECHANISMS, rng.choice(phrases.assistant.profiles[lv]))) for lv in levels]
    persona = {
        "name": rng.choice(phrases.user.names),
        "age": rng.randint(18, 79),
        "occupation": rng.choice(phrases.user.occupations),
        "style": rng.choice(phrases.user.styles),
    }
    mood = "distressed" if "distressed" in states or task_level == "high" else "upset"
    return DialoguePlan(
        dialogue_id=f"s{config.seed}-{index:07d}",
        task=task,
        scenario_id=scenario_id,
        split=splits[scenario_id],
        persona=persona,
        states=states,
        levels=levels,
        mechanisms=mechanisms,
        emotion=rng.choice(phrases.user.emotions[mood]),
        trigger=rng.randrange(len(phrases.tasks[task].triggers)),
        seed=seed,
    )


def plans(config: SynthConfig) -> list[DialoguePlan]:
    """Plans of all the dialogues of a run, in order.

    Args:
        config: the run's configuration.
    """
    splits = scenario_splits(config.split_fractions)
    return [plan_dialogue(config, i, splits) for i in range(config.dialogues)]


def shift_of(levels: list[str], turn: int) -> str:
    """``up``, ``down`` or ``none``: how the target level moved at this turn.

    Args:
        levels: target levels of a dialogue's replies.
        turn: index of the turn.
    """
    if turn == 0 or levels[turn] == levels[turn - 1]:
        return "none"
    return "up" if LEVELS.index(levels[turn]) > LEVELS.index(levels[turn - 1]) else "down"
