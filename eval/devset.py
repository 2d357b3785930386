"""The unrated development set of model-written replies for the scorers' calibration.

Every system of :mod:`.systems` plays held-out dialogue scripts (:mod:`.rollout`, the same
rollouts and decoding as ``eval run``); from each system's rollout of each dialogue a few
replies are kept, drawn from early and late turns. Three files are written:

* ``replies.jsonl`` (what raters see, blind to the system): ``id``, ``task``, ``turn`` (from 1), the
  ``context`` a rater needs (the last few messages before the current user message, the
  system's own earlier replies among them), the current ``user`` message and the ``reply``.
  No scorer output and no expected level.
* ``replies_key.jsonl`` (kept from raters, for the analysis): per ``id`` the dialogue, the
  task's level and the turn's expected ``level``, its target score, and the mixture the
  system used (gate or forced expert).
* ``replies_settings.json``: how the set was made (model, systems, seed, turns, counts, time);
  a list, one entry per batch, once ``--append`` has added a batch.

Replies are shuffled with a fixed seed, so systems and tasks are interleaved; identical
(context, user message, reply) items are dropped only while at least ``--min-replies`` remain, and
items already in another rated set (``--exclude``) are always dropped, so that a set kept for
testing is never rated again for fitting.

``python -m moe_empathy.eval.devset --out eval/data/rating/replies.jsonl`` (from the repository
root, ``python -m eval.devset`` works too); ``--help`` lists the settings.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from moe_empathy.train.taxonomy import LEVEL_TARGET, TASKS
from moe_empathy.utils import atomic_write_text, read_jsonl

from .dialogues import EVAL_SEED, select_dialogues, synthesise_split
from .rollout import DialogueRollout, progress_bar, rollout
from .systems import SYSTEMS, build_systems, check_model_dir, check_system_names

# Dialogues of the development set come from the test split's scenarios but with another seed
# than the evaluation's (EVAL_SEED), so calibration is not fitted on the evaluation's own scripts.
DEVSET_SEED = EVAL_SEED + 12
DEFAULT_RANGES = "1-6,16-30"


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """Turn ranges ``"1-6,16-30"`` as inclusive ``(first, last)`` pairs (turns count from 1).

    Args:
        text: comma-separated ``A-B`` ranges (or single turns ``A``), in ascending order.

    Raises:
        ValueError: for a malformed, reversed, overlapping or unordered range.
    """
    ranges = []
    for part in (p.strip() for p in text.split(",")):
        first, _, last = part.partition("-")
        try:
            pair = (int(first), int(last or first))
        except ValueError:
            raise ValueError(f"turn range {part!r} is not of the form A-B (e.g. 1-6)") from None
        if not 1 <= pair[0] <= pair[1]:
            raise ValueError(f"turn range {part!r} must satisfy 1 <= A <= B")
        ranges.append(pair)
    for (_, end), (start, _) in zip(ranges, ranges[1:]):
        if start <= end:
            raise ValueError(f"turn ranges {text!r} overlap or are not in ascending order")
    return ranges


def balanced_dialogues(records: list[dict], per_task: int) -> list[dict]:
    """``per_task`` records of every task, taken in the records' order, interleaved by task.

    Args:
        records: dialogue records with a ``task``.
        per_task: how many dialogues of each task to keep.

    Raises:
        ValueError: when a task of the taxonomy has fewer records than ``per_task``.
    """
    by_task = {task: [r for r in records if r["task"] == task][:per_task] for task in TASKS}
    short = {task: len(kept) for task, kept in by_task.items() if len(kept) < per_task}
    if short:
        raise ValueError(f"too few dialogues of task(s) {short} for {per_task} per task; synthesise more")
    return [group[i] for i in range(per_task) for group in by_task.values()]


def parse_counts(text: str, ranges: int) -> list[int]:
    """Replies to draw from each turn range: one number for all ranges, or one per range.

    Args:
        text: ``"3"`` or comma-separated counts (``"4,5"``).
        ranges: the number of ranges.

    Raises:
        ValueError: for a count below 1 or a list of the wrong length.
    """
    try:
        counts = [int(c) for c in text.split(",")]
    except ValueError:
        raise ValueError(f"--per-range {text!r} is not a number or a comma-separated list of numbers") from None
    if len(counts) == 1:
        counts *= ranges
    if len(counts) != ranges or min(counts) < 1:
        raise ValueError(f"--per-range {text!r}: give one count >= 1, or one for each of the {ranges} ranges")
    return counts


def choose_turns(num_turns: int, ranges: list[tuple[int, int]], counts: list[int], rng: random.Random) -> list[int]:
    """Turns (from 1) to keep from one rollout: ``counts[i]`` distinct turns drawn from range
    ``i``, cut to the dialogue's length (all of a shorter range; none of a range beyond it).

    Args:
        num_turns: turns the rollout played.
        ranges: inclusive turn ranges (:func:`parse_ranges`).
        counts: turns to draw from each range.
        rng: the random source.
    """
    chosen = []
    for (first, last), count in zip(ranges, counts, strict=True):
        pool = list(range(first, min(last, num_turns) + 1))
        chosen += rng.sample(pool, min(count, len(pool)))
    return sorted(chosen)


def reply_context(users: list[str], replies: list[str], turn: int, messages: int) -> list[dict]:
    """The ``messages`` messages before the user message of ``turn`` (from 1), oldest first.

    Args:
        users: the dialogue's user messages.
        replies: the system's replies (at least ``turn - 1`` of them).
        turn: the turn being rated.
        messages: how many earlier messages to give (fewer at the start of a dialogue).
    """
    history = [m for k in range(turn - 1) for m in ({"role": "user", "content": users[k]}, {"role": "assistant", "content": replies[k]})]
    return history[max(0, len(history) - messages) :] if messages else []


def sample_replies(
    rollouts: dict[str, list[DialogueRollout]], ranges: list[tuple[int, int]], counts: list[int], context_messages: int, seed: int,
    same_turns: bool = False,
) -> list[tuple[dict, dict]]:
    """Draws replies from every system's rollouts.

    Each (system, dialogue) draws its own turns, from a random source seeded by the seed, the
    system and the dialogue, so a sample does not depend on which other systems were played;
    with ``same_turns`` the source leaves the system out, so every system is rated on the same
    turns of each dialogue (a paired comparison of the systems).

    Args:
        rollouts: ``{system: rollouts}`` as :func:`.rollout.rollout` returns them.
        ranges: inclusive turn ranges to draw from.
        counts: turns to draw from each range of each rollout.
        context_messages: earlier messages given with each reply.
        seed: the sampling seed.
        same_turns: draw the same turns of a dialogue for every system.

    Returns:
        ``(item, key)`` pairs without ids: ``item`` is what a rater sees, ``key`` the labels.
    """
    pairs = []
    for system, played in rollouts.items():
        for dialogue in played:
            rng = random.Random(f"{seed}:{dialogue.dialogue_id}" if same_turns else f"{seed}:{system}:{dialogue.dialogue_id}")
            for turn in choose_turns(len(dialogue.replies), ranges, counts, rng):
                k = turn - 1
                item = {  # no system name: the raters rate blind
                    "task": dialogue.task,
                    "turn": turn,
                    "context": reply_context(dialogue.users, dialogue.replies, turn, context_messages),
                    "user": dialogue.users[k],
                    "reply": dialogue.replies[k],
                }
                key = {
                    "system": system,
                    "dialogue_id": dialogue.dialogue_id,
                    "task": dialogue.task,
                    "task_level": dialogue.task_level,
                    "turn": turn,
                    "level": dialogue.levels[k],
                    "target": round(LEVEL_TARGET[dialogue.levels[k]], 4),
                    "mixture": None if dialogue.gate is None else [round(w, 4) for w in dialogue.gate[k]],
                    "new_tokens": dialogue.new_tokens[k] if k < len(dialogue.new_tokens) else None,
                }
                pairs.append((item, key))
    return pairs


def _identity(item: dict) -> str:
    return json.dumps([item["context"], item["user"], item["reply"]], sort_keys=True)


def deduplicate(pairs: list[tuple[dict, dict]], minimum: int) -> list[tuple[dict, dict]]:
    """Drops repeats of an identical (context, user message, reply) item, later ones first,
    but only while more than ``minimum`` items remain.

    Args:
        pairs: ``(item, key)`` pairs in sampling order.
        minimum: the fewest items to keep.
    """
    seen: set[str] = set()
    repeats = []
    for i, (item, _) in enumerate(pairs):
        identity = _identity(item)
        if identity in seen:
            repeats.append(i)
        seen.add(identity)
    drop = set(repeats[: max(0, len(pairs) - minimum)])
    return [pair for i, pair in enumerate(pairs) if i not in drop]


def rated_identities(paths: list[str]) -> set[str]:
    """The items of other raters' files, to leave out of a new set (:func:`_identity` of each).

    Args:
        paths: ``replies.jsonl`` files of other rated sets.

    Raises:
        FileNotFoundError: when a file does not exist.
    """
    rated = set()
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--exclude {path}: no such file; pass the replies.jsonl of a rated set")
        rated.update(_identity(row) for row in read_jsonl(path))
    return rated


def shuffle_and_number(pairs: list[tuple[dict, dict]], seed: int, first: int = 1) -> tuple[list[dict], list[dict]]:
    """Shuffles the pairs with a fixed seed and gives each an id (``r001``...) in the new order.

    Args:
        pairs: ``(item, key)`` pairs.
        seed: the shuffling seed.
        first: the number of the first id (after the items of earlier batches).

    Returns:
        ``(items, keys)``, each a list of dicts starting with ``id``.
    """
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    width = max(3, len(str(first + len(pairs) - 1)))
    items, keys = [], []
    for n, i in enumerate(order, first):
        rid = f"r{n:0{width}d}"
        items.append({"id": rid, **pairs[i][0]})
        keys.append({"id": rid, **pairs[i][1]})
    return items, keys


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Writes one JSON object per line, atomically.

    Args:
        path: the file.
        rows: the objects.
    """
    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def check_appendable(out: Path, key_path: Path) -> None:
    """Refuses ``--append`` when there is no set to add to (checked before any rollout)."""
    if not out.exists() or not key_path.exists():
        raise ValueError(f"--append adds to an existing set, but {out} or {key_path} is missing; drop --append to start one")


def write_batch(out: Path, key_path: Path, settings_path: Path, pairs: list[tuple[dict, dict]], settings: dict, seed: int, append: bool) -> list[dict]:
    """Writes a batch of sampled replies: a new set, or (``append``) one more batch after the
    items already in ``out``, numbered after them, its settings added to the list of batches.

    Args:
        out, key_path, settings_path: the raters' file, the key and the settings file.
        pairs: ``(item, key)`` pairs of this batch.
        settings: how this batch was made.
        seed: the shuffling seed.
        append: add to an existing set instead of writing a new one.

    Returns:
        This batch's items, with their ids.
    """
    old_items, old_keys, batches = [], [], []
    if append:
        check_appendable(out, key_path)
        old_items, old_keys = read_jsonl(out), read_jsonl(key_path)
        if [r["id"] for r in old_items] != [r["id"] for r in old_keys]:
            raise ValueError(f"{out} and {key_path} list different ids; the set is damaged")
        if settings_path.exists():
            earlier = json.loads(settings_path.read_text())
            batches = earlier if isinstance(earlier, list) else [earlier]
    items, keys = shuffle_and_number(pairs, seed, first=len(old_items) + 1)
    write_jsonl(out, old_items + items)
    write_jsonl(key_path, old_keys + keys)
    atomic_write_text(settings_path, json.dumps(batches + [settings] if append else settings, indent=1) + "\n")
    return items


def _portable(path: str | Path | None) -> str | None:
    """A path as given, relative to the current folder when it lies inside it."""
    if path is None:
        return None
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m moe_empathy.eval.devset", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the raters' file (.jsonl); the key and the run's settings go beside it as <name>_key.jsonl and <name>_settings.json")
    parser.add_argument("--key", default=None, help="the key file (default: beside --out, <name>_key.jsonl)")
    parser.add_argument("--model", default=None, help="gated model folder (default: the shipped checkpoint)")
    parser.add_argument("--systems", default=None, help=f"comma-separated, from: {', '.join(SYSTEMS)} (default: all; with --from-run, the run's)")
    parser.add_argument("--single-lora", default=None, help="peft adapter folder of the single-LoRA baseline (default: MODEL/baselines/single_lora)")
    parser.add_argument("--experts-dir", default=None, help="per-level peft adapters for `external` (default: MODEL/baselines/per_level, else the gated model's own experts)")
    parser.add_argument("--per-task", type=int, default=1, help="dialogues of each of the eight tasks")
    parser.add_argument("--turns", type=int, default=30, help="turns played per dialogue")
    parser.add_argument("--ranges", default=DEFAULT_RANGES, help="turn ranges to draw replies from (inclusive, from 1)")
    parser.add_argument("--per-range", default="4,5", help="replies drawn from each range of each system's rollout of a dialogue: one count, or one per range")
    parser.add_argument("--context-messages", type=int, default=3, help="earlier messages shown with each reply")
    parser.add_argument("--min-replies", type=int, default=320, help="identical items are dropped only while this many remain")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="reply length cap (the evaluation's default)")
    parser.add_argument("--batch-size", type=int, default=40, help="dialogues generated together")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    parser.add_argument("--seed", type=int, default=DEVSET_SEED, help="seed of the synthesised test-split dialogues, the turn draws and the shuffle")
    parser.add_argument("--exclude", default="", help="comma-separated replies.jsonl files of other rated sets: their items are never drawn again")
    parser.add_argument("--append", action="store_true", help="add a batch to the set in --out (ids continue after its last one) instead of writing a new set")
    parser.add_argument("--same-turns", action="store_true", help="rate every system on the same turns of each dialogue (paired; default: each system draws its own)")
    parser.add_argument("--from-run", default=None,
                        help="sample the replies of a finished `moe-empathy eval run` (its output folder) instead of playing dialogues; "
                             "--systems then picks among the run's systems, and the settings of playing are the run's")
    return parser


def sampled_run(folder: str, names: list[str] | None, ranges: list[tuple[int, int]]) -> tuple[dict[str, list[DialogueRollout]], dict]:
    """The rollouts of a finished evaluation run, for the systems asked for.

    Args:
        folder: the run's output folder.
        names: the systems to sample (each must be in the run), or None for all of the run's.
        ranges: the turn ranges to draw from (checked against the run's turns).

    Returns:
        ``(rollouts, settings)``: ``{system: rollouts}`` and how the replies were played.
    """
    from .cli import read_run

    metrics, rollouts = read_run(folder)
    names = list(rollouts) if names is None else names
    missing = [n for n in names if n not in rollouts]
    if missing:
        raise ValueError(f"{folder} has no rollouts of {', '.join(missing)} (it has {', '.join(rollouts)}); pass --systems among those")
    run = metrics["settings"]
    if ranges[-1][0] > run["turns"]:
        raise ValueError(f"the run played {run['turns']} turns; a --ranges beyond that gives no reply")
    settings = {"from_run": _portable(folder), "model": run["model"], "systems": {n: run["systems"][n] for n in names},
                "split": run["split"], "dialogues": run["dialogues"], "turns": run["turns"], "max_new_tokens": run["max_new_tokens"]}
    return {n: rollouts[n] for n in names}, settings


def play_dialogues(args: argparse.Namespace, names: list[str], ranges: list[tuple[int, int]], console) -> tuple[dict[str, list[DialogueRollout]], dict]:
    """Plays the systems on synthesised test-split dialogues.

    Args:
        args: the parsed arguments (:func:`build_parser`).
        names: the systems to play.
        ranges: the turn ranges that will be drawn from (checked against ``--turns``).
        console: where to say what is played.

    Returns:
        ``(rollouts, settings)``: ``{system: rollouts}`` and how the replies were played.
    """
    import torch

    from moe_empathy.loading import default_checkpoint, load_model_and_tokenizer

    if ranges[-1][0] > args.turns:
        raise ValueError(f"--ranges {args.ranges} reaches beyond --turns {args.turns}: a range there gives no reply")
    model_dir = check_model_dir(args.model) if args.model else default_checkpoint()
    # Enough synthesised dialogues that every task has --per-task of them.
    pool = synthesise_split("test", max(40, 8 * args.per_task * 3), args.turns, args.seed)
    records = select_dialogues(balanced_dialogues(pool, args.per_task), len(TASKS) * args.per_task, args.turns)
    model, tokenizer, _ = load_model_and_tokenizer(model_dir)
    systems = build_systems(names, model, tokenizer, model_dir, args.single_lora, args.experts_dir)
    console.print(
        f"[bold]devset[/bold]: {len(records)} test dialogues x {args.turns} turns, systems {', '.join(names)}, "
        f"{args.max_new_tokens} new tokens, {torch.get_num_threads()} thread(s)"
    )
    start = time.perf_counter()
    with progress_bar() as progress:
        rollouts, _ = rollout(systems, records, tokenizer, args.batch_size, args.max_new_tokens, "cached", progress)
    seconds = time.perf_counter() - start
    console.print(f"rollouts took {seconds / 60:.1f} min")
    settings = {"model": _portable(model_dir), "systems": {s.name: s.description for s in systems}, "single_lora": _portable(args.single_lora),
                "experts_dir": _portable(args.experts_dir), "split": "test", "dialogues": len(records), "turns": args.turns,
                "max_new_tokens": args.max_new_tokens, "rollout_seconds": round(seconds, 1), "threads": torch.get_num_threads()}
    return rollouts, settings


def main(argv: list[str] | None = None) -> dict:
    """Plays the systems (or reads a finished run's replies), samples, and writes the raters'
    file and the key.

    Args:
        argv: command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The run's settings and counts (also printed).
    """
    import torch
    from rich.console import Console

    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    console = Console(highlight=False)
    out = Path(args.out)
    key_path = Path(args.key) if args.key else out.with_name(f"{out.stem}_key.jsonl")
    settings_path = out.with_name(f"{out.stem}_settings.json")
    names = check_system_names([n.strip() for n in args.systems.split(",") if n.strip()]) if args.systems else None
    ranges = parse_ranges(args.ranges)
    counts = parse_counts(args.per_range, len(ranges))
    if args.append:
        check_appendable(out, key_path)
    excluded = [p for p in args.exclude.split(",") if p]
    rated = rated_identities(excluded)
    if args.from_run:
        rollouts, played = sampled_run(args.from_run, names, ranges)
    else:
        rollouts, played = play_dialogues(args, names or list(SYSTEMS), ranges, console)
    pairs = sample_replies(rollouts, ranges, counts, args.context_messages, args.seed, args.same_turns)
    fresh = [pair for pair in pairs if _identity(pair[0]) not in rated]
    kept = deduplicate(fresh, args.min_replies)
    settings = {**played, "seed": args.seed, "ranges": args.ranges, "per_range": counts, "same_turns": args.same_turns, "context_messages": args.context_messages,
                "exclude": [_portable(p) for p in excluded], "sampled": len(pairs), "excluded": len(pairs) - len(fresh), "kept": len(kept)}
    items = write_batch(out, key_path, settings_path, kept, settings, args.seed, args.append)
    console.print(f"sampled {len(pairs)} replies, kept {len(items)} ({items[0]['id']}-{items[-1]['id']})")
    console.print(f"wrote {out}, {key_path} and {settings_path}")
    return settings


if __name__ == "__main__":
    main()
