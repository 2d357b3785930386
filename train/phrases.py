"""Phrase data of the template generator: typed loader and schema check.

Everything the template backend says lives in YAML files under ``data/phrases/``
beside this module: ``user.yaml`` (what simulated users say across tasks),
``assistant.yaml`` (how replies and their empathy are composed) and one file per
task in ``tasks/`` (scenarios, requests, helpful content, triggers). Each file's
header comment explains its keys; the dataclasses below are the schema.

:func:`load_phrases` reads the files into those dataclasses and checks them: every
key present and no unknown one, the right types, the vocabulary of
:mod:`.taxonomy` covered (tasks, levels, mechanisms), every mechanism profile
matching its level, and only known placeholders in the templates. Bad data raises
:class:`PhraseDataError` naming the file, the key and the problem.

The evaluation scorers must never read this data (a test enforces it).
"""

from __future__ import annotations

import dataclasses
import functools
import string
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from .taxonomy import LEVELS, MECHANISMS, TASKS, level_of

PHRASES_DIR = Path(__file__).parent / "data" / "phrases"

Options = tuple[str, ...]
# An item of helpful content: its paraphrases. One that starts in lower case is a step
# (a clause completed by a lead such as "you could"), any other a full sentence.
Item = tuple[str, ...]
# A frame of an empathy sentence: pieces, each a tuple of options (one is taken).
Frame = tuple[Options, ...]

# Placeholders a template may use, by who speaks (slots of the task and situation come on top).
# There is no {name}: no user of the corpus says their name, so no reply may use it.
USER_FIELDS = frozenset({"detail", "emotion", "topic"})
REPLY_FIELDS = USER_FIELDS | {"event", "about"}
NAMING_FIELDS = frozenset({"detail"})  # a task's topic, its about names and a trigger's event


class PhraseDataError(ValueError):
    """Phrase data that does not follow the schema; the message names the file, the key and the problem."""


@dataclass(frozen=True)
class Trigger:
    """What makes the user of a task more upset within the dialogue.

    Attributes:
        says: the user's message that discloses it (``{emotion}`` is filled).
        event: the event as the assistant names it (``{event}`` in replies).
    """

    says: str
    event: str


@dataclass(frozen=True)
class Situation:
    """One situation of a task; a scenario is (task, situation, detail).

    Attributes:
        asks: the user's first requests.
        help: items of helpful content, said first.
        slots: values of this situation's own placeholders.
    """

    asks: Options
    help: tuple[Item, ...]
    slots: dict[str, Options]


@dataclass(frozen=True)
class TaskPhrases:
    """The phrases of one task (``tasks/<task>.yaml``).

    Attributes:
        topic: the subject as the assistant names it when the user disclosed no event.
        short: the subject as the user names it when returning to the task.
        about: short names of the subject in the assistant's questions.
        context: a lead that places a situation's advice in the scenario's detail.
        details: the second scenario axis (who / what / where), filled into ``{detail}``.
        situations: situation name -> its phrases.
        slots: values of placeholders that any situation of the task may use.
        followups: what a calm user says to keep the task going -> its answer (an item of
            helpful content), which the reply to that message gives.
        extra_help: items of helpful content for any situation of the task.
        triggers: what can make the user more upset.
    """

    topic: str
    short: str
    about: Options
    context: str
    details: Options
    situations: dict[str, Situation]
    slots: dict[str, Options]
    followups: dict[str, Item]
    extra_help: tuple[Item, ...]
    triggers: tuple[Trigger, ...]


@dataclass(frozen=True)
class UserPhrases:
    """What simulated users say across tasks (``user.yaml``).

    Attributes:
        names: persona names.
        occupations: persona occupations.
        styles: writing styles; the per-style mappings below have one entry for each.
        greetings: how a first message opens, by style.
        fillers: what a message may end with, by style.
        emotions: the feelings a user names, by mood (``upset``, ``distressed``).
        still: said before a follow-up while the user stays upset or distressed.
        calmer: said when the user's state falls back, by style.
        practical: said when the user asks for practicalities only, by style.
        relapse: said when the state rises again after the trigger was told, by style.
    """

    names: Options
    occupations: Options
    styles: Options
    greetings: dict[str, Options]
    fillers: dict[str, Options]
    emotions: dict[str, Options]
    still: Options
    calmer: dict[str, Options]
    practical: dict[str, Options]
    relapse: dict[str, Options]


@dataclass(frozen=True)
class AssistantPhrases:
    """How the assistant's replies are composed (``assistant.yaml``).

    Attributes:
        profiles: mechanism strengths (in :data:`.taxonomy.MECHANISMS` order) drawn for a reply, by level.
        empathy: mechanism -> strength (1 or 2) -> frames of its sentences.
        emotion_echoes: words that reflect a feeling back, by the user's own word.
        neutral_openers: how a reply with no empathy in front may open.
        bridges: leads from the empathy to the helpful part.
        step_leads: leads that complete a step.
        sentence_leads: leads that fit in front of any sentence.
        recaps: leads of an item said earlier in the dialogue.
        step_connectives: introduce a second step in the same reply.
        sentence_connectives: introduce a second sentence in the same reply.
        run_ons: join a short reaction straight onto the advice.
        step_joins: join two steps in one sentence.
    """

    profiles: dict[str, tuple[tuple[int, int, int], ...]]
    empathy: dict[str, dict[int, tuple[Frame, ...]]]
    emotion_echoes: dict[str, Options]
    neutral_openers: Options
    bridges: Options
    step_leads: Options
    sentence_leads: Options
    recaps: Options
    step_connectives: Options
    sentence_connectives: Options
    run_ons: Options
    step_joins: Options


@dataclass(frozen=True)
class Phrases:
    """The whole phrase inventory.

    Attributes:
        user: from ``user.yaml``.
        assistant: from ``assistant.yaml``.
        tasks: task name -> from ``tasks/<task>.yaml``, in the order of :data:`.taxonomy.TASKS`.
    """

    user: UserPhrases
    assistant: AssistantPhrases
    tasks: dict[str, TaskPhrases]


@functools.cache
def load_phrases(folder: str | Path = PHRASES_DIR) -> Phrases:
    """Read and check the phrase data (cached per folder).

    Args:
        folder: holds ``user.yaml``, ``assistant.yaml`` and ``tasks/<task>.yaml`` for every
            task of :data:`.taxonomy.TASKS`; default: the data shipped with the package.

    Raises:
        PhraseDataError: a file is missing or does not follow the schema; the message
            names the file, the key and the problem.
    """
    folder = Path(folder)
    task_files = {path.stem for path in (folder / "tasks").glob("*.yaml")}
    if task_files != set(TASKS):
        raise PhraseDataError(
            f"{folder / 'tasks'}: expected one file per task, <task>.yaml for {', '.join(TASKS)}; "
            f"missing: {sorted(set(TASKS) - task_files)}, unknown: {sorted(task_files - set(TASKS))}"
        )
    user = _read(folder, "user.yaml", UserPhrases)
    assistant = _read(folder, "assistant.yaml", AssistantPhrases)
    tasks = {name: _read(folder, f"tasks/{name}.yaml", TaskPhrases) for name in TASKS}
    _check_user(folder / "user.yaml", user)
    _check_assistant(folder / "assistant.yaml", assistant, user)
    for name, task in tasks.items():
        _check_task(folder / "tasks" / f"{name}.yaml", task)
    return Phrases(user=user, assistant=assistant, tasks=tasks)


# ---------------------------------------------------------------- reading into the schema


def _read(folder: Path, name: str, schema: type):
    path = folder / name
    if not path.is_file():
        raise PhraseDataError(f"{path}: missing; the phrase data needs user.yaml, assistant.yaml and tasks/")
    try:
        # the C loader when PyYAML has it: the same result, about 20 times faster
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as error:
        raise PhraseDataError(f"{path}: not valid YAML: {error}") from None
    return _convert(data, schema, path, "")


def _fail(file: Path, key: str, problem: str) -> typing.NoReturn:
    raise PhraseDataError(f"{file}: {key or '(top level)'}: {problem}")


def _describe(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


def _convert(value, hint, file: Path, key: str):
    """``value`` read from YAML, checked against a type of the schema and converted to it.

    Args:
        value: what the YAML file holds at ``key``.
        hint: ``str``, ``int``, ``tuple[X, ...]`` (non-empty), ``tuple[X, Y, ...]`` (fixed
            length), ``dict[K, V]`` or a dataclass (a mapping with exactly its fields).
        file: the file read, for errors.
        key: the dotted key path, for errors.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        fields = typing.get_type_hints(hint)
        value = _convert(value, dict[str, object], file, key)
        problem = _key_mismatch(value, fields)
        if problem:
            _fail(file, key, f"{problem}; the keys are: {', '.join(fields)}")
        return hint(**{f: _convert(value[f], fields[f], file, _join(key, f)) for f in fields})
    if hint is object:
        return value
    if hint in (str, int):
        if type(value) is not hint:
            _fail(file, key, f"expected {'a string' if hint is str else 'an integer'}, got {_describe(value)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            _fail(file, key, f"expected a mapping, got {_describe(value)}")
        return {_convert(k, args[0], file, _join(key, str(k))): _convert(v, args[1], file, _join(key, str(k)))
                for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list) or not value:
            _fail(file, key, f"expected a non-empty list, got {_describe(value)}")
        if args[-1] is Ellipsis:
            return tuple(_convert(v, args[0], file, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            _fail(file, key, f"expected a list of {len(args)} values, got {len(value)}")
        return tuple(_convert(v, a, file, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    raise TypeError(f"the phrase schema has a type the reader does not handle: {hint}")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _key_mismatch(mapping: dict, expected) -> str:
    """What is wrong with the keys of ``mapping`` (empty when they are ``expected``)."""
    missing, unknown = [k for k in expected if k not in mapping], [k for k in mapping if k not in expected]
    problems = [f"missing key(s) {missing}"] if missing else []
    return "; ".join(problems + ([f"unknown key(s) {unknown}"] if unknown else []))


# ---------------------------------------------------------------- checks across keys


def _same_keys(file: Path, key: str, mapping: dict, expected, what: str) -> None:
    problem = _key_mismatch(mapping, expected)
    if problem:
        _fail(file, key, f"expected one entry for each {what} ({', '.join(map(str, expected))}): {problem}")


def _placeholders(file: Path, key: str, templates, allowed) -> None:
    """Check that ``templates`` (strings, nested in tuples) use only the placeholders ``allowed``."""
    if isinstance(templates, str):
        try:
            used = {name for _, name, _, _ in string.Formatter().parse(templates) if name is not None}
        except ValueError as error:
            _fail(file, key, f"{error} in {templates!r}; write a literal brace as {{{{ or }}}}")
        unknown = sorted(used - set(allowed))
        if unknown:
            _fail(file, key, f"unknown placeholder(s) {unknown} in {templates!r}; "
                             f"this text may use: {', '.join(sorted(allowed)) or 'none'}")
        return
    for i, template in enumerate(templates):
        _placeholders(file, f"{key}[{i}]", template, allowed)


def _check_user(file: Path, user: UserPhrases) -> None:
    for key in ("greetings", "fillers", "calmer", "practical", "relapse"):
        _same_keys(file, key, getattr(user, key), user.styles, "style of `styles`")
        for style, options in getattr(user, key).items():
            _placeholders(file, f"{key}.{style}", options, USER_FIELDS)
    _same_keys(file, "emotions", user.emotions, ("upset", "distressed"), "mood")
    _placeholders(file, "still", user.still, USER_FIELDS)
    for key in ("names", "occupations", "styles"):
        _placeholders(file, key, getattr(user, key), ())


def _check_assistant(file: Path, assistant: AssistantPhrases, user: UserPhrases) -> None:
    _same_keys(file, "profiles", assistant.profiles, LEVELS, "level")
    for level, profiles in assistant.profiles.items():
        for i, profile in enumerate(profiles):
            strengths = dict(zip(MECHANISMS, profile))
            if not set(profile) <= {0, 1, 2} or level_of(strengths) != level:
                _fail(file, f"profiles.{level}[{i}]", f"{list(profile)} is not a {level} profile: strengths "
                      "are 0-2 and their total is 0-1 for low, 2-3 for medium, 4-6 for high")
    _same_keys(file, "empathy", assistant.empathy, MECHANISMS, "mechanism")
    for mechanism, by_strength in assistant.empathy.items():
        _same_keys(file, f"empathy.{mechanism}", by_strength, (1, 2), "strength")
        for strength, frames in by_strength.items():
            _placeholders(file, f"empathy.{mechanism}.{strength}", frames, REPLY_FIELDS)
    emotions = [word for words in user.emotions.values() for word in words]
    missing = [word for word in emotions if word not in assistant.emotion_echoes]
    if missing:
        _fail(file, "emotion_echoes",
              f"no echoes for the emotion(s) {missing} of user.yaml; add an entry for each")
    for key, hint in typing.get_type_hints(AssistantPhrases).items():
        if hint == Options:  # the openers, leads and connectives
            _placeholders(file, key, getattr(assistant, key), REPLY_FIELDS)


def _check_task(file: Path, task: TaskPhrases) -> None:
    shared = set(task.slots)
    for key in ("topic", "about"):
        _placeholders(file, key, getattr(task, key), NAMING_FIELDS | shared)
    _placeholders(file, "context", task.context, REPLY_FIELDS | shared)
    _placeholders(file, "details", task.details, ())
    if not task.followups:
        _fail(file, "followups", "expected at least one follow-up (question -> its answer's paraphrases)")
    _placeholders(file, "followups", tuple(task.followups), USER_FIELDS | shared)
    for question, answer in task.followups.items():
        _placeholders(file, f"followups.{question}", answer, REPLY_FIELDS | shared)
    _placeholders(file, "extra_help", task.extra_help, REPLY_FIELDS | shared)
    _placeholders(file, "slots", tuple(task.slots.values()), ())
    for i, trigger in enumerate(task.triggers):
        _placeholders(file, f"triggers[{i}].says", trigger.says, USER_FIELDS | shared)
        _placeholders(file, f"triggers[{i}].event", trigger.event, NAMING_FIELDS)
    for name, situation in task.situations.items():
        own = shared | set(situation.slots)
        _placeholders(file, f"situations.{name}.asks", situation.asks, USER_FIELDS | own)
        _placeholders(file, f"situations.{name}.help", situation.help, REPLY_FIELDS | own)
        _placeholders(file, f"situations.{name}.slots", tuple(situation.slots.values()), ())
