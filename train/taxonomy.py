"""Task taxonomy of the synthetic dialogues: eight tasks, the empathy level users
expect in each, and the events that move the right level within a task.

Vocabulary (shared by the generator, the data schema and the model's expert names):

* levels: ``low``, ``medium``, ``high``;
* mechanisms (EPITOME, Sharma et al. 2020): ``emotional_reaction``,
  ``interpretation``, ``exploration``, each of strength 0 (none), 1 (weak), 2 (strong).

A level is a band of total mechanism strength (:data:`LEVEL_TOTALS`, :func:`level_of`), so
every labelled assistant turn's mechanisms are consistent with its level by construction.
The 1-5 empathy scale of the evaluation maps the total strength 0-6 linearly to 1-5
(:func:`total_to_score`); a level's target score is the middle of its band on that scale.
"""

from __future__ import annotations

from dataclasses import dataclass

MECHANISMS: tuple[str, ...] = ("emotional_reaction", "interpretation", "exploration")
MAX_STRENGTH = 2  # of one mechanism
MAX_TOTAL = MAX_STRENGTH * len(MECHANISMS)
# Band of total mechanism strength (inclusive) of each level, lowest level first.
LEVEL_TOTALS: dict[str, tuple[int, int]] = {"low": (0, 1), "medium": (2, 3), "high": (4, MAX_TOTAL)}
LEVELS: tuple[str, ...] = tuple(LEVEL_TOTALS)
SHIFTS: tuple[str, ...] = ("up", "down", "none")  # how the target level moves at a reply
# The user's state moves the right level away from the task's own: a user who asks
# to stick to practicalities wants one level less, an upset user one more, a
# distressed user two more (clamped to the range of levels).
STATE_OFFSET: dict[str, int] = {"steady": -1, "neutral": 0, "upset": 1, "distressed": 2}
USER_STATES: tuple[str, ...] = tuple(STATE_OFFSET)


def total_to_score(total: float) -> float:
    """A total mechanism strength (0-6) on the 1-5 empathy scale.

    Args:
        total: the summed strengths (may be fractional, e.g. a scorer's evidence).
    """
    return 1.0 + 4.0 * total / MAX_TOTAL


LEVEL_BAND: dict[str, tuple[float, float]] = {
    level: (total_to_score(low), total_to_score(high)) for level, (low, high) in LEVEL_TOTALS.items()
}  # on the 1-5 scale
LEVEL_TARGET: dict[str, float] = {
    level: (low + high) / 2 for level, (low, high) in LEVEL_BAND.items()
}  # low 1.33, medium 2.67, high 4.33


def level_of(mechanisms: dict[str, int]) -> str:
    """The empathy level that a mechanism profile amounts to.

    Args:
        mechanisms: strength 0-2 for each name in :data:`MECHANISMS`.

    Returns:
        the level whose band (:data:`LEVEL_TOTALS`) holds the total strength:
        ``low`` for 0-1, ``medium`` for 2-3, ``high`` for 4-6.

    Raises:
        ValueError: for a strength outside 0-2, naming the mechanism.
    """
    for name in MECHANISMS:
        if not 0 <= mechanisms[name] <= MAX_STRENGTH:
            raise ValueError(f"{name} has strength {mechanisms[name]!r}; strengths are 0-{MAX_STRENGTH}")
    total = sum(mechanisms[name] for name in MECHANISMS)
    return next(level for level, (_, high) in LEVEL_TOTALS.items() if total <= high)


def target_level(task_level: str, user_state: str) -> str:
    """The level an assistant turn should have.

    Args:
        task_level: the level users expect in the task (:attr:`Task.level`).
        user_state: the user's state at this turn, one of :data:`USER_STATES`.

    Returns:
        the task's level moved by the state's offset (:data:`STATE_OFFSET`),
        clamped to :data:`LEVELS`.
    """
    index = LEVELS.index(task_level) + STATE_OFFSET[user_state]
    return LEVELS[min(max(index, 0), len(LEVELS) - 1)]


@dataclass(frozen=True)
class Task:
    """One conversational task of the taxonomy.

    Attributes:
        name: identifier used in the data (``task`` field) and on the command line.
        title: human-readable name.
        level: the empathy level users expect in this task (user state ``neutral``).
        description: one line for the dataset card and the README.
    """

    name: str
    title: str
    level: str
    description: str = ""


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task(
            "movie_recommendation",
            "Movie recommendation",
            "low",
            "Picking films or series for an evening, a date, a family.",
        ),
        Task(
            "technical_support",
            "Technical support",
            "low",
            "Fixing devices, accounts and software.",
        ),
        Task(
            "travel_planning",
            "Travel planning",
            "low",
            "Routes, bookings, packing and itineraries.",
        ),
        Task(
            "career_advice",
            "Career advice",
            "medium",
            "Job search, interviews, negotiation, changing fields.",
        ),
        Task(
            "health_concern",
            "Health concern",
            "medium",
            "Symptoms, medication questions, appointments, routines.",
        ),
        Task(
            "relationship_advice",
            "Relationship advice",
            "high",
            "Partners, family, friends: conflict and communication.",
        ),
        Task(
            "grief_support",
            "Grief support",
            "high",
            "Living with the death of a person or an animal, and its practicalities.",
        ),
        Task(
            "emotional_support",
            "Emotional support / therapy-like talk",
            "high",
            "Stress, anxiety, low mood, loneliness; not crisis care.",
        ),
    )
}


def get_task(name: str) -> Task:
    """Look a task up by name.

    Args:
        name: one of the keys of :data:`TASKS`.

    Raises:
        ValueError: naming the unknown task and listing the known ones.
    """
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; choose from: {', '.join(TASKS)}"
        ) from None
