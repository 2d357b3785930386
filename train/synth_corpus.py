"""The dataset of the synthetic dialogues: the record schema, its statistics, its card,
and the writer of a corpus (DatasetDict + JSONL + card) to disk.

The backends (:mod:`.synth_template`, :mod:`.synth_llm`, :mod:`.synth_grounded`) build their records with
:func:`user_turn`, :func:`assistant_turn` and :func:`record`; ``train/README.md``
documents the schema.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from moe_empathy.utils import replace_output_dir

from .synth_plan import MAX_TURNS, DialoguePlan, shift_of
from .taxonomy import LEVELS, MECHANISMS, TASKS, target_level

OUTPUT_KIND = "synth"  # recorded in the output folder's marker (see moe_empathy.utils.replace_output_dir)


# ---------------------------------------------------------------- records


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
        backend: ``template``, ``llm`` or ``grounded``.
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


def off_level_turns(record: dict) -> int:
    """How many replies of a dialogue record are labelled with another level than the user's
    state calls for (see :attr:`.synth_plan.SynthConfig.off_level_rate`).

    Args:
        record: a dialogue record of the schema.
    """
    count, state = 0, None
    for t in record["turns"]:
        if t["role"] == "user":
            state = t["user_state"]
        elif state is not None:
            count += t["level"] != target_level(record["task_level"], state)
    return count


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
        ``off_level_turns`` (replies written at another level than the user's state calls
        for, see :attr:`.synth_plan.SynthConfig.off_level_rate`), ``shifts``, ``turn_lengths``, ``distinct_sentence_ratio`` and
        ``ngram4_overlap`` (share of a split's distinct assistant word 4-grams that
        also occur in train).
    """
    tasks, levels, shifts, lengths = Counter(), Counter(), Counter(), Counter()
    off_level = 0
    for dialogues in by_split.values():
        for d in dialogues:
            tasks[d["task"]] += 1
            lengths[_length_bucket(d["num_turns"])] += 1
            off_level += off_level_turns(d)
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
        "off_level_turns": off_level,
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
        "shift within a dialogue; an off-level reply is written, and labelled, at another",
        "level (for training experts, never a gate). Splits are disjoint by scenario (task, situation, detail).",
        "A turn is one exchange: a user message and the assistant's reply.", "",
        "Load with `datasets.load_from_disk(DIR)`; the same records are in `jsonl/`.", "",
        "## Settings", "",
        *[f"- {k}: {v}" for k, v in settings.items()], "",
        "## Counts", "",
        table("split", stats["dialogues"]),
        table("task (dialogues)", stats["tasks"]),
        table("level (assistant turns)", stats["levels"]),
        f"Off-level replies: {stats['off_level_turns']} of {sum(stats['levels'].values())}.", "",
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
            "ask for more dialogues with --dialogues (a few dozen fill every split; the llm and grounded backends keep the "
            "dialogues they finished in OUT.partial.jsonl and reuse them)"
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

