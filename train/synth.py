"""Synthetic multi-turn empathy dialogues: plans, the template backend, and the
writer of the dataset (DatasetDict + JSONL + dataset card).

A *turn* is one exchange: a user message and the assistant's reply (the unit the
model's per-turn gate routes). Every dialogue is planned first (task, scenario,
persona, the user's state at each turn and so the target level of each reply);
the template backend then realises the plan from :mod:`.phrases`, and the LLM
backend (:mod:`.synth_llm`) realises the same plans with a chat model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from moe_empathy.utils import check_output_dir, replace_output_dir

from . import phrases
from .taxonomy import LEVELS, MECHANISMS, STATE_OFFSET, TASKS, get_task, level_of, target_level

SPLITS = ("train", "validation", "test")
MAX_TURNS = 40
OUTPUT_KIND = "synth"  # recorded in the output folder's marker (see moe_empathy.utils.replace_output_dir)


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
        split_fractions: shares of each task's scenarios in train/validation/test.
    """

    dialogues: int = 1000
    min_turns: int = 2
    max_turns: int = 12
    seed: int = 0
    tasks: tuple[str, ...] = tuple(TASKS)
    shift_rate: float = 0.2
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
    spec = phrases.TASKS[task]
    return [
        f"{task}/{situation}/{i}"
        for situation in spec["situations"]
        for i in range(len(spec["details"]))
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
        levels: target empathy level of each assistant reply.
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
        return phrases.TASKS[self.task]["details"][int(self.scenario_id.split("/")[2])]


def _plan_states(rng, task_level: str, turns: int, shift_rate: float) -> list[str]:
    states = ["neutral"]
    for _ in range(1, turns):
        current = target_level(task_level, states[-1])
        options = [s for s in STATE_OFFSET if target_level(task_level, s) != current]
        states.append(rng.choice(options) if rng.random() < shift_rate else states[-1])
    return states


def plan_dialogue(config: SynthConfig, index: int, splits: dict[str, str]) -> DialoguePlan:
    """Plan dialogue ``index`` of a run.

    Args:
        config: the run's configuration.
        index: position of the dialogue in the run.
        splits: scenario id -> split, from :func:`scenario_splits`.
    """
    seed = f"{config.seed}:{index}"
    rng = random.Random(seed)
    task = rng.choice(config.tasks)
    scenario_id = rng.choice(scenarios(task))
    turns = rng.randint(config.min_turns, config.max_turns)
    task_level = TASKS[task].level
    states = _plan_states(rng, task_level, turns, config.shift_rate)
    levels = [target_level(task_level, s) for s in states]
    mechanisms = [dict(zip(MECHANISMS, rng.choice(phrases.PROFILES[lv]))) for lv in levels]
    persona = {
        "name": rng.choice(phrases.NAMES),
        "age": rng.randint(18, 79),
        "occupation": rng.choice(phrases.OCCUPATIONS),
        "style": rng.choice(phrases.STYLES),
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
        emotion=rng.choice(phrases.EMOTIONS[mood]),
        trigger=rng.randrange(len(phrases.TASKS[task]["triggers"])),
        seed=seed,
    )


def shift_of(levels: list[str], turn: int) -> str:
    """``up``, ``down`` or ``none``: how the target level moved at this turn.

    Args:
        levels: target levels of a dialogue's replies.
        turn: index of the turn.
    """
    if turn == 0 or levels[turn] == levels[turn - 1]:
        return "none"
    return "up" if LEVELS.index(levels[turn]) > LEVELS.index(levels[turn - 1]) else "down"


# ---------------------------------------------------------------- template backend

_SENTENCE_START = re.compile(r"(^|[.!?]\s+)([a-z])")
_KEEP_CAPITAL = ("I", "I'm", "I'd", "I'll", "I've")


def _capitalise(text: str) -> str:
    return _SENTENCE_START.sub(lambda m: m.group(1) + m.group(2).upper(), text)


def _second_person(text: str) -> str:
    return re.sub(r"\bmy\b", "your", text)


def _lower_first(text: str) -> str:
    """Lower-case the first letter of a template so that it can follow a lead,
    unless it starts with a placeholder, "I" or an acronym."""
    word = text.split(" ", 1)[0].rstrip(",;:")
    if text.startswith("{") or word in _KEEP_CAPITAL or word[1:2].isupper():
        return text
    return text[0].lower() + text[1:]


def _lead(lead: str, text: str) -> str:
    return lead + _lower_first(text) if lead else text


class _Filler:
    """Fills placeholders in the user's voice or the assistant's (second person)."""

    def __init__(self, plan: DialoguePlan, rng):
        spec = phrases.TASKS[plan.task]
        slots = {**spec["slots"], **spec["situations"][plan.situation]["slots"]}
        self.user = {
            "name": plan.persona["name"],
            "detail": plan.detail,
            "emotion": plan.emotion,
            "topic": spec["short"],
            **{slot: rng.choice(options) for slot, options in slots.items()},
        }
        self.assistant = {key: _second_person(value) for key, value in self.user.items()}
        self.assistant["topic"] = self.assistant["event"] = spec["topic"].format(**self.assistant)

    def __call__(self, template: str, voice: str = "assistant", **extra) -> str:
        values = self.user if voice == "user" else self.assistant
        return _capitalise(template.format(**{**values, **extra}))


def _user_message(plan, turn, filler, rng, used_trigger) -> tuple[str, bool]:
    spec = phrases.TASKS[plan.task]
    style = plan.persona["style"]
    state, previous = plan.states[turn], plan.states[turn - 1] if turn else None
    if turn == 0:
        asks = spec["situations"][plan.situation]["asks"]
        greeting, ask = rng.choice(phrases.GREETINGS[style]), filler(rng.choice(asks), "user")
        if greeting and greeting[-1] not in ".!?":
            ask = ask[0].lower() + ask[1:] if not ask.startswith("I ") else ask
        text = f"{greeting} {ask}"
    elif state == previous:
        text = filler(rng.choice(spec["followups"]), "user")
        if state in ("upset", "distressed") and rng.random() < 0.3:
            text = f"{filler(rng.choice(phrases.STILL), 'user')} {text}"
    elif STATE_OFFSET[state] > STATE_OFFSET[previous] and state != "neutral" and not used_trigger:
        trigger, event = spec["triggers"][plan.trigger]
        filler.assistant["event"] = event.format(**filler.assistant)
        return filler(trigger, "user"), True
    elif STATE_OFFSET[state] > STATE_OFFSET[previous]:
        text = filler(rng.choice(phrases.RELAPSE[style]), "user")
    elif state == "steady":
        text = filler(rng.choice(phrases.PRACTICAL[style]), "user")
    else:
        text = filler(rng.choice(phrases.CALMER[style]), "user")
    if style == "casual" and not text.startswith("I "):
        text = text[0].lower() + text[1:]
    return (text + rng.choice(phrases.FILLERS[style])).strip(), used_trigger


def _empathy(rng, mechanism: str, strength: int, named: bool) -> str:
    """One sentence (a template) of a mechanism at a strength, composed from a frame's pieces.

    Args:
        rng: the dialogue's random stream.
        mechanism: one of ``taxonomy.MECHANISMS``.
        strength: 1 (weak) or 2 (strong).
        named: the reply already addresses the user by name, so this sentence does not.
    """
    text = ""
    for options in rng.choice(phrases.EMPATHY[mechanism][strength]):
        piece = rng.choice(options)
        if "{name}" in piece and (named or "{name}" in text):
            piece = next(o for o in options if "{name}" not in o)
        if piece:
            text += piece if not text or piece[0] in ",;:.!?" else " " + piece
    return text


def _is_step(item: str) -> bool:
    return item[0].islower()


def _after(opener: str, lead: str) -> str:
    # after an opener, only leads that complete a step ("you could") are kept
    return "" if opener and (":" in lead or lead.endswith(", ")) else lead


def _advice(rng, items: list[tuple[str, str]], opener: str, context: str, named: bool) -> str:
    """The helpful part of a reply (a template): one or two items with leads and connectives.

    Args:
        rng: the dialogue's random stream.
        items: (paraphrase, kind) pairs in order; a paraphrase is a step or a full
            sentence, kind is ``situation``, ``extra`` or ``repeat`` (said before).
        opener: what comes before the first item ("" for nothing).
        context: the task's lead placing advice in the scenario's detail.
        named: the reply already addresses the user by name, so no lead does.
    """
    (first, kind), rest = items[0], items[1:]
    if kind == "repeat":
        lead = rng.choice(phrases.RECAPS)
    else:
        lead = rng.choice(phrases.STEP_LEADS if _is_step(first) else phrases.SENTENCE_LEADS)
    if rng.random() < 0.4:
        opener = _lead(opener, context)
    if named or "{name}" in opener:
        lead = "" if "{name}" in lead else lead
    text = _lead(_after(opener, lead), first)
    if _is_step(first) and rest and _is_step(rest[0][0]) and rest[0][1] == kind and rng.random() < 0.5:
        text += rng.choice(phrases.STEP_JOINS) + rest.pop(0)[0]
    sentences = [_lead(opener, text + ("." if _is_step(first) else ""))]
    for item, kind in rest:
        if kind == "repeat":
            connective = rng.choice(phrases.RECAPS).replace("{name}, ", "")
        else:
            connective = rng.choice(phrases.STEP_CONNECTIVES if _is_step(item) else phrases.SENTENCE_CONNECTIVES)
        sentences.append(_lead(connective, item) + ("." if _is_step(item) else ""))
    return " ".join(sentences)


def _next_help(plan, rng, help_queue: list, said: set, count: int) -> list[tuple[str, str]]:
    """Take the next ``count`` items of helpful content, refilling the queue with
    the task's general items when it runs dry, and pick a paraphrase of each.

    Args:
        plan: the dialogue's plan.
        rng: the dialogue's random stream.
        help_queue: items still to say, situation items first.
        said: items said so far in the dialogue (updated).
        count: how many items.

    Returns:
        (paraphrase, kind) pairs, kind as in :func:`_advice`.
    """
    situation = phrases.TASKS[plan.task]["situations"][plan.situation]["help"]
    chosen = []
    for _ in range(count):
        if not help_queue:
            extra = list(phrases.TASKS[plan.task]["extra_help"])
            rng.shuffle(extra)
            help_queue.extend(extra)
        item = help_queue.pop(0)
        kind = "repeat" if item in said else "situation" if item in situation else "extra"
        said.add(item)
        chosen.append((rng.choice(item), kind))
    return chosen


def _assistant_message(plan, turn, filler, rng, help_queue, said) -> str:
    strengths = plan.mechanisms[turn]
    feeling = []
    for mechanism in ("emotional_reaction", "interpretation"):
        if strengths[mechanism]:
            named = any("{name}" in sentence for sentence in feeling)
            feeling.append(_empathy(rng, mechanism, strengths[mechanism], named))
    if len(feeling) == 2 and rng.random() < 0.3:
        feeling.reverse()
    if not feeling:
        opener = rng.choice(phrases.NEUTRAL_OPENERS)
    elif rng.random() < 0.5 and feeling[-1][-1] == "." and len(feeling[-1]) < 40:
        # a short reaction runs on into the advice
        opener = feeling.pop()[:-1] + rng.choice(phrases.RUN_ONS)
    else:
        opener = rng.choice(phrases.BRIDGES) if rng.random() < 0.3 else ""
    spec = phrases.TASKS[plan.task]
    items = _next_help(plan, rng, help_queue, said, rng.choice((1, 1, 2)))
    named = any("{name}" in part for part in feeling)
    parts = feeling + [_advice(rng, items, opener, spec["context"], named)]
    if strengths["exploration"]:
        named = any("{name}" in part for part in parts)
        parts.append(_empathy(rng, "exploration", strengths["exploration"], named))
    about = rng.choice(spec["about"]).format(**filler.assistant)
    return filler(" ".join(parts), emotion=rng.choice(phrases.EMOTION_ECHOES[plan.emotion]), about=about)


def render_template(plan: DialoguePlan) -> dict:
    """Write out a planned dialogue from the phrase inventory.

    Args:
        plan: the dialogue's plan.

    Returns:
        one record of the dataset schema (see ``train/README.md``).
    """
    rng = random.Random(plan.seed + ":text")
    filler = _Filler(plan, rng)
    help_queue = list(phrases.TASKS[plan.task]["situations"][plan.situation]["help"])
    said, used_trigger = set(), False
    turns = []
    for turn in range(len(plan.states)):
        text, used_trigger = _user_message(plan, turn, filler, rng, used_trigger)
        turns.append(user_turn(text, plan.states[turn]))
        reply = _assistant_message(plan, turn, filler, rng, help_queue, said)
        turns.append(assistant_turn(reply, plan, turn))
    return record(plan, turns, backend="template")


def user_turn(content: str, state: str) -> dict:
    """A user turn of the schema.

    Args:
        content: the message.
        state: the user's state at this turn.
    """
    return {"role": "user", "content": content, "level": None, "mechanisms": None,
            "user_state": state, "shift": None}


def assistant_turn(content: str, plan: DialoguePlan, turn: int) -> dict:
    """An assistant turn of the schema, labelled from the plan.

    Args:
        content: the reply.
        plan: the dialogue's plan.
        turn: index of the exchange.
    """
    return {"role": "assistant", "content": content, "level": plan.levels[turn],
            "mechanisms": dict(plan.mechanisms[turn]), "user_state": None,
            "shift": shift_of(plan.levels, turn)}


def record(plan: DialoguePlan, turns: list[dict], backend: str) -> dict:
    """A dialogue record of the schema.

    Args:
        plan: the dialogue's plan.
        turns: alternating user and assistant turns.
        backend: ``template`` or ``llm``.
    """
    return {
        "dialogue_id": plan.dialogue_id,
        "scenario_id": plan.scenario_id,
        "task": plan.task,
        "task_level": TASKS[plan.task].level,
        "persona": dict(plan.persona),
        "situation": plan.situation,
        "detail": plan.detail,
        "emotion": plan.emotion,
        "num_turns": len(plan.states),
        "backend": backend,
        "turns": turns,
    }


def plans(config: SynthConfig) -> list[DialoguePlan]:
    """Plans of all the dialogues of a run, in order.

    Args:
        config: the run's configuration.
    """
    splits = scenario_splits(config.split_fractions)
    return [plan_dialogue(config, i, splits) for i in range(config.dialogues)]


def generate(config: SynthConfig) -> dict[str, list[dict]]:
    """Generate a corpus with the template backend.

    Args:
        config: the run's configuration.

    Returns:
        split name -> dialogue records.
    """
    by_split = {name: [] for name in SPLITS}
    for plan in plans(config):
        by_split[plan.split].append(render_template(plan))
    return by_split


# ---------------------------------------------------------------- dataset, statistics, card


def features():
    """The ``datasets.Features`` of the dialogue schema."""
    from datasets import Features, List, Value

    mechanisms = {name: Value("int8") for name in MECHANISMS}
    turn = {
        "role": Value("string"), "content": Value("string"), "level": Value("string"),
        "mechanisms": mechanisms, "user_state": Value("string"), "shift": Value("string"),
    }
    persona = {"name": Value("string"), "age": Value("int32"), "occupation": Value("string"),
               "style": Value("string")}
    return Features({
        "dialogue_id": Value("string"), "scenario_id": Value("string"), "task": Value("string"),
        "task_level": Value("string"), "persona": persona, "situation": Value("string"),
        "detail": Value("string"), "emotion": Value("string"), "num_turns": Value("int32"),
        "backend": Value("string"), "turns": List(turn),
    })


_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9']+")


def corpus_stats(by_split: dict[str, list[dict]], sample: int = 4000) -> dict:
    """Counts and variation figures of a corpus.

    Args:
        by_split: split name -> dialogue records.
        sample: the variation figures read the first ``sample`` dialogues of each
            split (the counts read all).

    Returns:
        dict with ``dialogues`` (per split), ``tasks``, ``levels`` (assistant turns),
        ``shifts``, ``turn_lengths``, ``distinct_sentence_ratio`` and
        ``ngram4_overlap`` (share of a split's distinct assistant word 4-grams that
        also occur in train).
    """
    tasks, levels, shifts, lengths = Counter(), Counter(), Counter(), Counter()
    for dialogues in by_split.values():
        for d in dialogues:
            tasks[d["task"]] += 1
            lengths[_length_bucket(d["num_turns"])] += 1
            for t in d["turns"]:
                if t["role"] == "assistant":
                    levels[t["level"]] += 1
                    shifts[t["shift"]] += 1
    sentences, distinct, grams = 0, set(), {}
    for name, dialogues in by_split.items():
        grams[name] = set()
        for d in dialogues[:sample]:
            for t in d["turns"]:
                if t["role"] != "assistant":
                    continue
                parts = _SENTENCE.split(t["content"])
                sentences += len(parts)
                distinct.update(parts)
                words = _WORD.findall(t["content"].lower())
                grams[name].update(zip(words, words[1:], words[2:], words[3:]))
    train = grams.get("train", set())
    overlap = {
        name: len(g & train) / len(g) if g else 0.0
        for name, g in grams.items() if name != "train"
    }
    return {
        "dialogues": {name: len(ds) for name, ds in by_split.items()},
        "tasks": dict(sorted(tasks.items())),
        "levels": {lv: levels[lv] for lv in LEVELS},
        "shifts": {k: shifts[k] for k in ("up", "down", "none")},
        "turn_lengths": dict(sorted(lengths.items(), key=lambda kv: int(kv[0].split("-")[0]))),
        "distinct_sentence_ratio": len(distinct) / sentences if sentences else 0.0,
        "ngram4_overlap": overlap,
        "stats_sample": sample,
    }


def _length_bucket(turns: int) -> str:
    for low, high in ((1, 5), (6, 10), (11, 20), (21, 30), (31, 40)):
        if turns <= high:
            return f"{low}-{high}"
    raise ValueError(f"a dialogue has {turns} turns, more than {MAX_TURNS}")


def dataset_card(stats: dict, settings: dict) -> str:
    """The README.md of a generated corpus.

    Args:
        stats: from :func:`corpus_stats`.
        settings: how the corpus was made (backend, seed, turn range, ...).
    """
    def table(title, counts):
        rows = "\n".join(f"| {k} | {v} |" for k, v in counts.items())
        return f"| {title} | count |\n| --- | --- |\n{rows}\n"

    overlap = ", ".join(f"{k}: {v:.3f}" for k, v in stats["ngram4_overlap"].items())
    lines = [
        "---", "license: apache-2.0", "task_categories:", "- text-generation", "---", "",
        "# Synthetic multi-turn empathy dialogues", "",
        "Made by `moe-empathy synth`. Each dialogue is a task conversation in which every",
        "assistant reply carries a target empathy level (low, medium, high) and the EPITOME",
        "mechanisms it uses (emotional_reaction, interpretation, exploration; 0-2 each).",
        "The target level follows the task and the user's state at each turn, so it can",
        "shift within a dialogue. Splits are disjoint by scenario (task, situation, detail).",
        "A turn is one exchange: a user message and the assistant's reply.", "",
        "Load with `datasets.load_from_disk(DIR)`; the same records are in `jsonl/`.", "",
        "## Settings", "",
        *[f"- {k}: {v}" for k, v in settings.items()], "",
        "## Counts", "",
        table("split", stats["dialogues"]),
        table("task (dialogues)", stats["tasks"]),
        table("level (assistant turns)", stats["levels"]),
        table("level shift at the turn", stats["shifts"]),
        table("turns per dialogue", stats["turn_lengths"]),
        "## Variation", "",
        f"Computed on the first {stats['stats_sample']} dialogues of each split.", "",
        f"- distinct assistant sentences / all assistant sentences: {stats['distinct_sentence_ratio']:.4f}",
        f"- share of distinct assistant word 4-grams also found in train: {overlap}", "",
        "## Limitations", "",
        "Synthetic text: the wording is narrower than real users' and the labels are the",
        "targets the text was steered to, not human ratings. Not for crisis support.", "",
    ]
    return "\n".join(lines)


def write_corpus(by_split: dict[str, list[dict]], out: str | Path, settings: dict,
                 overwrite: bool = False) -> dict:
    """Write a corpus as DatasetDict, JSONL and card, atomically.

    Everything is written to a temporary folder beside ``out`` and renamed into
    place at the end, so ``out`` is either untouched or complete; only an earlier corpus
    written by this command is ever replaced.

    Args:
        by_split: split name -> dialogue records.
        out: the output folder.
        settings: shown in the card.
        overwrite: replace an earlier corpus in ``out``.

    Returns:
        the statistics written to the card (also saved as ``stats.json``).

    Raises:
        FileExistsError: ``out`` exists and is not empty, and ``overwrite`` is false or it is
            not an earlier corpus of ``moe-empathy synth`` (see :func:`moe_empathy.utils.check_output_dir`).
        ValueError: a split has no dialogue (``datasets`` cannot save an empty split).
    """
    from datasets import Dataset, DatasetDict

    empty = [name for name, records in by_split.items() if not records]
    if empty:
        total = sum(len(records) for records in by_split.values())
        raise ValueError(
            f"{total} dialogues leave the split(s) {empty} empty (splits are drawn by scenario, about 80/10/10); "
            "ask for more dialogues with --dialogues (a few dozen fill every split; the llm backend keeps the "
            "dialogues it finished in OUT.partial.jsonl and reuses them)"
        )
    with replace_output_dir(out, overwrite, OUTPUT_KIND) as tmp:
        schema = features()
        DatasetDict({
            name: Dataset.from_list(records, features=schema) for name, records in by_split.items()
        }).save_to_disk(str(tmp))
        (tmp / "jsonl").mkdir()
        for name, records in by_split.items():
            with open(tmp / "jsonl" / f"{name}.jsonl", "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
        stats = corpus_stats(by_split)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        (tmp / "README.md").write_text(dataset_card(stats, settings))
    return stats


# ---------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``synth`` subcommand.

    Args:
        subparsers: the object returned by ``ArgumentParser.add_subparsers()``.
    """
    p = subparsers.add_parser("synth", help="generate synthetic multi-turn empathy dialogues")
    p.add_argument("--out", required=True, help="output folder (DatasetDict + jsonl/ + README.md)")
    p.add_argument("--dialogues", type=int, default=1000, help="number of dialogues (all splits)")
    p.add_argument("--min-turns", type=int, default=2, help="fewest exchanges per dialogue")
    p.add_argument("--max-turns", type=int, default=12, help=f"most exchanges per dialogue (<= {MAX_TURNS})")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    p.add_argument("--backend", choices=("template", "llm"), default="template")
    p.add_argument("--model", default=None,
                   help="llm backend: folder of a local Hugging Face chat model (default: embedded SmolLM2)")
    p.add_argument("--batch-size", type=int, default=8, help="llm backend: dialogues generated together")
    p.add_argument("--max-new-tokens", type=int, default=96, help="llm backend: tokens per message")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier corpus written by this command in --out")
    p.set_defaults(func=run_synth)
    return p


def run_synth(args: argparse.Namespace) -> dict:
    """Run the ``synth`` subcommand.

    Args:
        args: the parsed arguments of :func:`add_parser`.
    """
    config = SynthConfig(
        dialogues=args.dialogues, min_turns=args.min_turns, max_turns=args.max_turns,
        seed=args.seed, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
    )
    check_output_dir(args.out, args.overwrite, OUTPUT_KIND)
    start = time.perf_counter()
    if args.backend == "template":
        by_split = generate(config)
        settings = {"backend": "template"}
    else:
        from .synth_llm import LLMSynthConfig, generate_llm

        llm = LLMSynthConfig(model=args.model, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens)
        by_split = generate_llm(config, llm, progress_file=Path(f"{args.out}.partial.jsonl"))
        settings = {"backend": "llm", "model": args.model or "embedded SmolLM2-135M-Instruct"}
    settings.update(seed=config.seed, dialogues=config.dialogues,
                    turns=f"{config.min_turns}-{config.max_turns}", tasks=", ".join(config.tasks))
    stats = write_corpus(by_split, args.out, settings, overwrite=args.overwrite)
    if args.backend == "llm":
        Path(f"{args.out}.partial.jsonl").unlink(missing_ok=True)
    print(f"wrote {sum(stats['dialogues'].values())} dialogues to {args.out} "
          f"in {time.perf_counter() - start:.1f} s; distinct sentence ratio "
          f"{stats['distinct_sentence_ratio']:.3f}; 4-gram overlap with train {stats['ngram4_overlap']}")
    return stats
