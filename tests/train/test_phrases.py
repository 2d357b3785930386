import shutil
import string

import pytest
import yaml

from moe_empathy.train.phrases import PHRASES_DIR, REPLY_FIELDS, USER_FIELDS, PhraseDataError, load_phrases
from moe_empathy.train.taxonomy import LEVELS, MECHANISMS, TASKS, level_of


def _placeholders(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def test_shipped_data_covers_the_taxonomy():
    phrases = load_phrases()
    assert list(phrases.tasks) == list(TASKS)
    assert set(phrases.assistant.profiles) == set(LEVELS)
    assert set(phrases.assistant.empathy) == set(MECHANISMS)
    for level, profiles in phrases.assistant.profiles.items():
        assert all(level_of(dict(zip(MECHANISMS, p))) == level for p in profiles)
    for name, task in phrases.tasks.items():
        assert len(task.situations) >= 3 and len(task.details) >= 5 and task.triggers, name
        for situation in task.situations.values():
            assert all(_placeholders(ask) <= USER_FIELDS | set(situation.slots) for ask in situation.asks)
            paraphrases = [p for item in situation.help for p in item]
            assert all(_placeholders(p) <= REPLY_FIELDS | set(situation.slots) for p in paraphrases)
    # help items are tuples, so that the generator can remember which items a dialogue said
    item = phrases.tasks["grief_support"].extra_help[0]
    assert isinstance(item, tuple) and {item} == {tuple(item)}


def test_a_copy_loads_to_the_same_phrases(tmp_path):
    shutil.copytree(PHRASES_DIR, tmp_path / "phrases")
    assert load_phrases(tmp_path / "phrases") == load_phrases()


def _edit(data: dict, path: str, value) -> None:
    """Set (or with value None delete) the entry at a dotted path of YAML data; digits are indices."""
    *parents, last = [int(key) if key.isdigit() else key for key in path.split(".")]
    for key in parents:
        data = data[key]
    if value is None:
        del data[last]
    else:
        data[last] = value


BROKEN = [
    # (file, dotted path, new value or None to delete, what the error must say)
    ("tasks/grief_support.yaml", "topic", None,
     r"tasks/grief_support\.yaml: \(top level\): missing key\(s\) \['topic'\]"),
    ("tasks/grief_support.yaml", "colour", "blue", r"tasks/grief_support\.yaml: .*unknown key\(s\) \['colour'\]"),
    ("tasks/grief_support.yaml", "situations.funeral.help.2", "say it plainly",
     r"tasks/grief_support\.yaml: situations\.funeral\.help\[2\]: expected a non-empty list, got str"),
    ("tasks/grief_support.yaml", "followups", [],
     r"tasks/grief_support\.yaml: followups: expected a mapping, got list \[\]"),
    ("tasks/grief_support.yaml", "followups", {},
     r"tasks/grief_support\.yaml: followups: expected at least one follow-up"),
    ("tasks/grief_support.yaml", "followups.What do I tell the kids?", ["Tell {kids} plainly."],
     r"tasks/grief_support\.yaml: followups\.What do I tell the kids\?\[0\]: unknown placeholder\(s\) \['kids'\]"),
    ("tasks/grief_support.yaml", "situations.funeral.asks.0", "Help with {venue} for {detail}.",
     r"tasks/grief_support\.yaml: situations\.funeral\.asks\[0\]: unknown placeholder\(s\) \['venue'\]"),
    ("tasks/grief_support.yaml", "triggers.0.event", "the news about {film}",
     r"tasks/grief_support\.yaml: triggers\[0\]\.event: unknown placeholder\(s\) \['film'\].*may use: detail"),
    ("tasks/travel_planning.yaml", "about.0", "the {trip",
     r"tasks/travel_planning\.yaml: about\[0\]: .*'the \{trip'; write a literal brace"),
    ("user.yaml", "greetings.formal", None,
     r"user\.yaml: greetings: expected one entry for each style .*missing key\(s\) \['formal'\]"),
    ("user.yaml", "emotions.upset.3", 7, r"user\.yaml: emotions\.upset\[3\]: expected a string, got int 7"),
    ("assistant.yaml", "profiles.high.0", [2, 0, 0],
     r"assistant\.yaml: profiles\.high\[0\]: \[2, 0, 0\] is not a high profile"),
    ("assistant.yaml", "profiles.low.1", [0, 0],
     r"assistant\.yaml: profiles\.low\[1\]: expected a list of 3 values, got 2"),
    ("assistant.yaml", "empathy.exploration.2", None,
     r"assistant\.yaml: empathy\.exploration: expected one entry for each strength .*missing key\(s\) \[2\]"),
    ("assistant.yaml", "emotion_echoes.numb", None,
     r"assistant\.yaml: emotion_echoes: no echoes for the emotion\(s\) \['numb'\]"),
]


@pytest.mark.parametrize("file, path, value, message", BROKEN, ids=[f"{b[0]}:{b[1]}" for b in BROKEN])
def test_broken_data_is_refused_naming_file_key_and_problem(tmp_path, file, path, value, message):
    folder = tmp_path / "phrases"
    shutil.copytree(PHRASES_DIR, folder)
    data = yaml.safe_load((folder / file).read_text())
    _edit(data, path, value)
    (folder / file).write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    with pytest.raises(PhraseDataError, match=message):
        load_phrases(folder)


def test_missing_task_file_and_bad_yaml_are_named(tmp_path):
    folder = tmp_path / "phrases"
    shutil.copytree(PHRASES_DIR, folder)
    (folder / "tasks" / "grief_support.yaml").rename(folder / "tasks" / "grief.yaml")
    with pytest.raises(PhraseDataError, match=r"per task.*missing: \['grief_support'\], unknown: \['grief'\]"):
        load_phrases(folder)
    (folder / "tasks" / "grief.yaml").rename(folder / "tasks" / "grief_support.yaml")
    (folder / "user.yaml").write_text("names: [Maya\nstyles: casual\n")
    with pytest.raises(PhraseDataError, match=r"user\.yaml: not valid YAML"):
        load_phrases(folder)
    (folder / "user.yaml").unlink()
    with pytest.raises(PhraseDataError, match=r"user\.yaml: missing"):
        load_phrases(folder)
