"""Held-out dialogue scripts for evaluation: loading, schema checks, synthesis.

A script is a dialogue record of the synthetic corpus (see ``train/README.md``): its user
turns drive a rollout and its assistant turns' ``level`` labels say what each reply should
be. The scripted assistant replies themselves are never shown to an evaluated system.
"""

from __future__ import annotations

import json
from itertools import zip_longest
from pathlib import Path

from moe_empathy.train.taxonomy import LEVELS, SHIFTS

EVAL_SEED = 20251104  # synthesised evaluation dialogues; training corpora use other seeds


def validate_record(record, where: str, labelled: bool = True) -> dict:
    """Checks one dialogue record and raises a ValueError naming the field at fault.

    Args:
        record: a dialogue record (``task``, ``task_level``, ``turns`` as in the corpus schema).
        where: how to name the record in messages (file and index).
        labelled: require the labels (``task``, ``task_level``, each reply's ``level``) and a
            reply for every user message; False checks only the messages.

    Returns:
        The record.
    """
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a dialogue record (a JSON object), got {type(record).__name__}")
    name = f"{where} ({record['dialogue_id']})" if isinstance(record.get("dialogue_id"), str) else where
    for key in ("task", "task_level") if labelled else ():
        if not isinstance(record.get(key), str):
            raise ValueError(f"{name}: field {key!r} is missing or not a string")
    if labelled and record["task_level"] not in LEVELS:
        raise ValueError(f"{name}: task_level is {record['task_level']!r}; expected one of {list(LEVELS)}")
    turns = record.get("turns")
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{name}: field 'turns' is missing or empty; expected alternating user/assistant messages")
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if not isinstance(turn, dict):
            raise ValueError(f"{name}: turns[{i}] is a {type(turn).__name__}, not an object with role and content")
        if turn.get("role") != expected:
            raise ValueError(f"{name}: turns[{i}].role is {turn.get('role')!r}; expected {expected!r} (turns alternate, user first)")
        if not isinstance(turn.get("content"), str) or not turn["content"].strip():
            raise ValueError(f"{name}: turns[{i}].content is missing or empty")
        if expected == "assistant":
            if (labelled or turn.get("level") is not None) and turn.get("level") not in LEVELS:
                raise ValueError(f"{name}: turns[{i}].level is {turn.get('level')!r}; expected one of {list(LEVELS)}")
            if turn.get("shift") is not None and turn["shift"] not in SHIFTS:
                raise ValueError(f"{name}: turns[{i}].shift is {turn['shift']!r}; expected one of {list(SHIFTS)}")
    if labelled and len(turns) % 2:
        raise ValueError(f"{name}: 'turns' ends with a user message without its labelled reply (turns[{len(turns) - 1}])")
    return record


def read_dialogue_file(path: str | Path, labelled: bool = True) -> list[dict]:
    """Reads dialogue records from a ``.jsonl`` file (one per line) or a ``.json`` file (one
    record or a list), checking each.

    Args:
        path: the file.
        labelled: require the labels (see :func:`validate_record`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dialogue file {path} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            loaded = json.loads(text)
            records = loaded if isinstance(loaded, list) else [loaded]
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON{' lines' if path.suffix == '.jsonl' else ''}: {err}") from err
    if not records:
        raise ValueError(f"{path} holds no dialogue record")
    return [validate_record(r, f"{path.name} record {i}", labelled) for i, r in enumerate(records)]


def load_split(data: str | Path, split: str) -> list[dict]:
    """The records of one split of a corpus written by ``moe-empathy synth``.

    Args:
        data: the corpus folder (``jsonl/<split>.jsonl`` or a saved ``DatasetDict``), or a
            ``.json``/``.jsonl`` file of records (``split`` is then ignored).
        split: ``train``, ``validation`` or ``test``.
    """
    data = Path(data)
    if data.is_file():
        return read_dialogue_file(data)
    jsonl = data / "jsonl" / f"{split}.jsonl"
    if jsonl.is_file():
        return read_dialogue_file(jsonl)
    if (data / "dataset_dict.json").is_file():
        from datasets import load_from_disk

        corpus = load_from_disk(str(data))
        if split not in corpus:
            raise ValueError(f"{data} has no {split!r} split; it has {list(corpus)}")
        return [validate_record(r, f"{data.name}/{split} record {i}") for i, r in enumerate(corpus[split])]
    raise FileNotFoundError(f"{data} is neither a dialogue file nor a corpus folder written by `moe-empathy synth`")


def synthesise_split(split: str, dialogues: int, turns: int, seed: int = EVAL_SEED) -> list[dict]:
    """Template-generated dialogues of exactly ``turns`` exchanges from one split's scenarios,
    taken in turn from each task.

    Args:
        split: the split whose scenarios to draw from.
        dialogues: how many to return.
        turns: exchanges per dialogue (at most the generator's maximum).
        seed: the generator's seed.
    """
    from moe_empathy.train.synth import MAX_TURNS, SynthConfig, generate

    if not 1 <= turns <= MAX_TURNS:
        raise ValueError(f"the dialogue generator writes 1..{MAX_TURNS} turns; --turns {turns} needs --data with longer dialogues")
    records: list[dict] = []
    total = max(4 * dialogues, 32)
    while len(records) < dialogues:
        # Scenarios split about 80/10/10, so a held-out split needs ~10x as many dialogues.
        total *= 4
        records = generate(SynthConfig(dialogues=total, min_turns=turns, max_turns=turns, seed=seed))[split]
    by_task: dict[str, list[dict]] = {}
    for record in records:
        by_task.setdefault(record["task"], []).append(record)
    # Round-robin over tasks, so that every task is represented even in a small evaluation.
    mixed = [r for group in zip_longest(*by_task.values()) for r in group if r is not None]
    return mixed[:dialogues]


def select_dialogues(records: list[dict], dialogues: int, turns: int) -> list[dict]:
    """The first ``dialogues`` records, each cut to its first ``turns`` exchanges.

    Args:
        records: checked dialogue records.
        dialogues: how many to keep.
        turns: the most exchanges to keep per dialogue.
    """
    if dialogues < 1 or turns < 1:
        raise ValueError(f"--dialogues and --turns must be >= 1, got {dialogues} and {turns}")
    return [dict(r, turns=r["turns"][: 2 * turns], num_turns=min(len(r["turns"]) // 2, turns)) for r in records[:dialogues]]
