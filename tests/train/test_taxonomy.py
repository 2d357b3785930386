import pytest

from moe_empathy.train.phrases import load_phrases
from moe_empathy.train.taxonomy import LEVELS, MECHANISMS, STATE_OFFSET, TASKS, get_task, level_of, target_level


def test_eight_tasks_with_expected_levels():
    expected = {
        "movie_recommendation": "low", "technical_support": "low", "travel_planning": "low",
        "career_advice": "medium", "health_concern": "medium",
        "relationship_advice": "high", "grief_support": "high", "emotional_support": "high",
    }
    assert {name: task.level for name, task in TASKS.items()} == expected
    assert set(load_phrases().tasks) == set(TASKS)


def test_unknown_task_error_names_it_and_the_choices():
    with pytest.raises(ValueError, match="unknown task 'cooking'.*movie_recommendation"):
        get_task("cooking")


def test_every_profile_matches_its_level():
    for level, profiles in load_phrases().assistant.profiles.items():
        for profile in profiles:
            assert level_of(dict(zip(MECHANISMS, profile))) == level


@pytest.mark.parametrize("task", TASKS.values(), ids=lambda t: t.name)
def test_user_state_can_move_the_level_within_every_task(task):
    reachable = {target_level(task.level, state) for state in STATE_OFFSET}
    assert target_level(task.level, "neutral") == task.level
    assert len(reachable) >= 2
    assert reachable <= set(LEVELS)
