"""Command line: ``moe-empathy eval run`` (rollouts, metrics, report), ``moe-empathy eval rescore``
(a finished run's replies scored again) and ``moe-empathy inspect`` (one dialogue's per-turn gate
weights)."""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from moe_empathy.utils import atomic_path

from .acceptance import AcceptanceTargets, RunSize, check_targets
from .dialogues import EVAL_SEED, load_split, read_dialogue_file, select_dialogues, synthesise_split
from .embedding import EmbeddingScorer
from .helpfulness import HelpfulnessScorer
from .metrics import build_table, compute_metrics, helpfulness_of_rollouts, score_rollouts
from .progress import RunProgress, check_progress
from .references import reader_ceilings, reference_gaps
from .report import check_output_dir, plot_gate_heatmaps, write_outputs
from .rollout import MODES, DialogueRollout, progress_bar, rollout
from .scorers import SCORERS, get_scorer
from .systems import SYSTEMS, build_systems, check_model_dir, check_system_names


# The two sizes of `eval run`, with the time each must fit on 2 CPU cores: the standard
# evaluation (the defaults) and `--quick` for development. Both print the same tables.
STANDARD_RUN = RunSize(dialogues=12, turns=30, systems=len(SYSTEMS), max_new_tokens=32)
QUICK_RUN = RunSize(dialogues=8, turns=10, systems=len(SYSTEMS), max_new_tokens=32)
RUN_MINUTES = {STANDARD_RUN: 30.0, QUICK_RUN: 5.0}
READER_TRAIN_DIALOGUES = 400  # training-split dialogues the readers' lookups are fitted on (about 10 s)


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def check_scorer_names(names: list[str]) -> list[str]:
    """Validates scorer names.

    Args:
        names: the requested scorers.
    """
    unknown = [n for n in names if n not in SCORERS]
    if unknown or not names:
        raise ValueError(f"unknown scorer(s) {unknown or names}; choose from: {', '.join(SCORERS)}")
    return names


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``eval run``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--model", required=True, help="gated model folder (written by save_pretrained or `moe-empathy train`)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated, from: {', '.join(SYSTEMS)}")
    parser.add_argument("--split", default="test", help="split of the dialogues (default test)")
    parser.add_argument("--quick", action="store_true", help=f"development size: {QUICK_RUN.dialogues} dialogues x {QUICK_RUN.turns} turns, {QUICK_RUN.max_new_tokens} new tokens (about {RUN_MINUTES[QUICK_RUN]:g} minutes on 2 cores); the same tables")
    parser.add_argument("--dialogues", type=int, default=None, help=f"dialogues to play (default {STANDARD_RUN.dialogues}; {QUICK_RUN.dialogues} with --quick)")
    parser.add_argument("--turns", type=int, default=None, help=f"turns to play per dialogue, at most (default {STANDARD_RUN.turns}; {QUICK_RUN.turns} with --quick)")
    parser.add_argument("--data", default=None, help="corpus folder or .json/.jsonl dialogue file (default: synthesise held-out dialogues of --turns turns)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run with the same arguments: its finished batches (kept in OUT.partial) are not computed again")
    parser.add_argument("--scorers", default="lexical", help=f"comma-separated, from: {', '.join(SCORERS)}; the first drives the tables")
    parser.add_argument("--single-lora", default=None, help="peft adapter folder of the single-LoRA baseline (default: MODEL/baselines/single_lora)")
    parser.add_argument("--experts-dir", default=None, help="folder of per-level peft adapters for `external` (default: MODEL/baselines/per_level, else the gated model's own experts)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help=f"reply length cap (default {STANDARD_RUN.max_new_tokens}; {QUICK_RUN.max_new_tokens} with --quick)")
    parser.add_argument("--batch-size", type=int, default=40, help="dialogues generated together (of equal length; every system plays a mixed batch)")
    parser.add_argument("--no-repeat-guard", action="store_true", help="decode every system without the repeat guard of the model's generation_config.json (for comparison)")
    parser.add_argument("--mode", choices=MODES, default="cached", help="carry the KV cache across turns, or re-encode every turn")
    parser.add_argument("--compare-reencode", action="store_true", help="also time the gated system (else the first) re-encoding every turn, and check it gives the same replies")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the intervals")
    parser.add_argument("--tolerance", type=float, default=1.0, help="half-width of the band around the target score: a reply is in band when |score - target| <= this")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="seed of synthesised dialogues")
    add_target_arguments(parser)
    parser.set_defaults(func=run_eval)


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the acceptance thresholds that ``eval run`` and ``eval rescore`` check.

    Args:
        parser: the subcommand's parser.
    """
    targets = parser.add_argument_group("acceptance targets", "thresholds the report checks the gated model against (the metrics do not depend on them)")
    targets.add_argument("--target-gap-reduction", type=float, default=0.7266, help="least gap reduction of gated vs base, a fraction (default: the paper's 0.7266)")
    targets.add_argument("--target-gap-factor", type=float, default=1.05, help="most gap of gated as a multiple of external's (experts selected by task)")
    targets.add_argument("--target-minutes", type=float, default=None,
                         help=f"time budget of a run of the chosen size (default {RUN_MINUTES[STANDARD_RUN]:g} for the standard "
                         f"{STANDARD_RUN.dialogues} x {STANDARD_RUN.turns} x {STANDARD_RUN.systems} systems, {RUN_MINUTES[QUICK_RUN]:g} with --quick)")


def _resolved(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def run_settings(args: argparse.Namespace, model_dir: Path, records: list[dict], systems: list) -> dict:
    """Everything that determines the results of ``eval run``: what a resumed run must repeat.

    Args:
        args: the parsed command line.
        model_dir: the gated checkpoint's folder.
        records: the selected dialogue records.
        systems: the built systems (their adapter folders and repeat guard are recorded).
    """
    guard = systems[0].repeat_guard
    dialogues = json.dumps(records, sort_keys=True).encode()
    return {
        "model": _resolved(model_dir),
        "single_lora": _resolved(args.single_lora),
        "experts_dir": _resolved(args.experts_dir),
        "systems": [s.name for s in systems],
        "split": args.split,
        "data": _resolved(args.data),
        "seed": args.seed,
        "dialogues": len(records),
        "dialogues_sha256": hashlib.sha256(dialogues).hexdigest(),
        "turns": args.turns,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "mode": args.mode,
        "compare_reencode": args.compare_reencode,
        "repeat_guard": None if guard is None else {"ngram_size": guard.ngram_size, "penalty": guard.penalty},
        "scorers": _names(args.scorers),
        "bootstrap": args.bootstrap,
        "tolerance": args.tolerance,
    }


def run_size(args: argparse.Namespace) -> RunSize:
    """The size the run's time budget is about: ``--quick``'s or the standard one."""
    return QUICK_RUN if args.quick else STANDARD_RUN


def fill_run_size(args: argparse.Namespace) -> None:
    """Sets ``--dialogues``, ``--turns`` and ``--max-new-tokens`` not given to the chosen size's (in place).

    Args:
        args: the parsed command line of ``eval run``.
    """
    size = run_size(args)
    for name in ("dialogues", "turns", "max_new_tokens"):
        if getattr(args, name) is None:
            setattr(args, name, getattr(size, name))


def acceptance_targets(args: argparse.Namespace, size: RunSize) -> AcceptanceTargets:
    """The acceptance thresholds of the parsed command line.

    Args:
        args: the parsed command line of ``eval run`` or ``eval rescore``.
        size: the run size the time budget is about.

    Raises:
        ValueError: naming a threshold that is not positive.
    """
    minutes = args.target_minutes if args.target_minutes is not None else RUN_MINUTES[size]
    for flag, value in (("target_gap_reduction", args.target_gap_reduction), ("target_gap_factor", args.target_gap_factor), ("target_minutes", minutes)):
        if not value > 0:
            raise ValueError(f"--{flag.replace('_', '-')} is {value}; pass a positive number")
    return AcceptanceTargets(gap_reduction=args.target_gap_reduction, gap_factor=args.target_gap_factor, minutes=minutes, full_run=size)


def reader_training_split(args: argparse.Namespace) -> tuple[list[dict] | None, str]:
    """The generator's training split that the readers' lookups are fitted on: synthesised with
    the evaluation's seed and length (disjoint scenarios from its held-out split), or the
    ``train`` split of a ``--data`` corpus folder.

    Args:
        args: the parsed command line of ``eval run``.

    Returns:
        ``(records, "")``, or ``(None, why)`` when ``--data`` is a single file (no training split).
    """
    if args.data is None:
        return synthesise_split("train", READER_TRAIN_DIALOGUES, args.turns, args.seed), ""
    if Path(args.data).is_file():
        return None, f"--data {args.data} is a single file, without the corpus's training split"
    return load_split(args.data, "train"), ""


def run_eval(args: argparse.Namespace, on_batch: Callable[[str, int], None] | None = None) -> dict:
    """Runs ``moe-empathy eval run``: checks every input first, then rolls out, scores, and writes.

    Finished batches are recorded beside ``--out`` as the rollouts go (:mod:`.progress`);
    with ``--resume`` the batches an interrupted run finished are read back, not computed.

    Args:
        args: the parsed command line.
        on_batch: called with ``(<system>.<mode>, batch index)`` after each computed batch is
            recorded (a progress hook), or None.

    Returns:
        The metrics written to ``metrics.json``.
    """
    from moe_empathy.loading import load_model_and_tokenizer

    console = Console(highlight=False)
    names = check_system_names(_names(args.systems))
    scorer_names = check_scorer_names(_names(args.scorers))
    fill_run_size(args)
    targets = acceptance_targets(args, run_size(args))
    check_output_dir(args.out, args.overwrite)
    check_progress(args.out, args.resume)
    model_dir = check_model_dir(args.model)
    if args.data is not None:
        records = load_split(args.data, args.split)
        source = str(args.data)
    else:
        records = synthesise_split(args.split, args.dialogues, args.turns, args.seed)
        source = f"synthesised (template backend, seed {args.seed})"
    records = select_dialogues(records, args.dialogues, args.turns)
    scorers = {name: get_scorer(name) for name in scorer_names}
    model, tokenizer, description = load_model_and_tokenizer(model_dir)
    systems = build_systems(names, model, tokenizer, model_dir, args.single_lora, args.experts_dir, repeat_guard=not args.no_repeat_guard)
    console.print(f"[bold]eval run[/bold]: {len(records)} dialogues x <= {args.turns} turns, systems {', '.join(names)}, model {description}")
    journal = RunProgress.start(args.out, run_settings(args, model_dir, records, systems), args.resume)
    console.print(f"progress kept in {journal.folder}" + (" (resumed)" if args.resume else ""))
    start = time.perf_counter()
    with progress_bar() as progress:
        rollouts, stats = rollout(systems, records, tokenizer, args.batch_size, args.max_new_tokens, args.mode, progress, journal, on_batch)
        resumed = sum(s.resumed_batches for s in stats.values())
        if resumed:
            console.print(f"read {resumed} finished batch(es) back from {journal.folder}")
        # An interrupted run's earlier sessions count with the time their batches took.
        elapsed = time.perf_counter() - start + sum(s.resumed_seconds for s in stats.values())
        throughput = {name: s.summary() for name, s in stats.items()}
        notes = []
        if args.compare_reencode:
            other = "reencode" if args.mode == "cached" else "cached"
            probe = next((s for s in systems if s.gated), systems[0])
            again, again_stats = rollout([probe], records, tokenizer, args.batch_size, args.max_new_tokens, other, progress, journal, on_batch)
            throughput[f"{probe.name} ({other})"] = again_stats[probe.name].summary()
            same = sum(a.replies == b.replies for a, b in zip(rollouts[probe.name], again[probe.name]))
            notes.append(f"{probe.name}: {same} of {len(records)} dialogues got identical replies in {args.mode} and {other} modes.")
    tables, results, references = score_and_measure(console, rollouts, scorers, model.expert_names, args.tolerance, args.bootstrap)
    train, why = reader_training_split(args)
    if train is None:
        notes.append(f"Label ceilings of simple readers not computed: {why}.")
    else:
        references["readers"] = reader_ceilings(train, records, args.bootstrap, 0)
    turns_played = max(len(r["turns"]) // 2 for r in records)
    timing = {"seconds": elapsed, "dialogues": len(records), "turns": turns_played, "systems": len(systems), "max_new_tokens": args.max_new_tokens}
    notes += [f"{s.name}: {s.description}." for s in systems if s.name == "external" and s.sources.get("experts") == "gated model's experts"]
    notes.append(f"Rollouts took {elapsed / 60:.1f} min on {torch.get_num_threads()} CPU threads" if not torch.cuda.is_available() else f"Rollouts took {elapsed / 60:.1f} min")
    metrics = {
        "settings": {
            "model": description,
            "systems": {s.name: s.description for s in systems},
            "split": args.split,
            "data": source,
            "dialogues": len(records),
            "turns": turns_played,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
            "mode": args.mode,
            "scorers": scorer_names,
            "bootstrap_samples": args.bootstrap,
            "tolerance": args.tolerance,
            "expert_names": model.expert_names,
        },
        "targets": check_targets(results[scorer_names[0]], targets, timing),
        "references": references,
        "scorers": results,
        "throughput": throughput,
        "timing": timing,
        "notes": notes,
    }
    out = write_outputs(args.out, metrics, rollouts, tables[scorer_names[0]], args.overwrite)
    journal.remove()
    _print_summary(console, metrics)
    console.print(f"wrote {out / 'report.md'}, {out / 'metrics.json'}, rollouts.jsonl and plots")
    return metrics


def score_and_measure(console: Console, rollouts: dict[str, list[DialogueRollout]], scorers: dict, expert_names: list[str],
                      tolerance: float, bootstrap: int) -> tuple[dict, dict, dict]:
    """Scores every reply with every scorer and the helpfulness scorer, and computes the metrics
    and the constant-reply and task-selection references (of the first scorer).

    Args:
        console: where to say what is being scored.
        rollouts: ``{system: rollouts}``.
        scorers: ``{name: scorer}``, the first driving the tables.
        expert_names: the gated model's experts.
        tolerance: half-width of the band around the target score.
        bootstrap: resamples for the intervals.

    Returns:
        ``(tables, results, references)``, the first two by scorer name.
    """
    replies = sum(len(r.replies) for v in rollouts.values() for r in v)
    console.print(f"scoring {replies} replies with the helpfulness scorer")
    helper = HelpfulnessScorer(embedder=next((s.raw for s in scorers.values() if isinstance(getattr(s, "raw", None), EmbeddingScorer)), None))
    helpfulness = {system: helpfulness_of_rollouts(played, helper) for system, played in rollouts.items()}
    tables = {}
    for name, scorer in scorers.items():
        console.print(f"scoring {replies} replies with {name}")
        scored = {system: score_rollouts(played, scorer) for system, played in rollouts.items()}
        tables[name] = build_table(rollouts, scored, expert_names, helpfulness)
    results = {name: compute_metrics(table, tolerance, samples=bootstrap) for name, table in tables.items()}
    dialogues = len(next(iter(rollouts.values())))
    references = reference_gaps(tables[next(iter(scorers))], np.arange(dialogues), bootstrap, 0)
    return tables, results, references


def add_rescore_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``eval rescore``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--run", required=True, help="folder written by `eval run`: its rollouts.jsonl and metrics.json are read")
    parser.add_argument("--out", required=True, help="output folder (not --run: the run's own report stays as it was)")
    parser.add_argument("--scorers", default=None, help=f"comma-separated, from: {', '.join(SCORERS)}; the first drives the tables (default: the run's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_target_arguments(parser)
    parser.set_defaults(func=run_rescore)


def read_run(folder: str | Path) -> tuple[dict, dict[str, list[DialogueRollout]]]:
    """The metrics and the rollouts of a finished ``eval run``.

    Args:
        folder: the run's output folder.

    Returns:
        ``(metrics, {system: rollouts})``, systems and dialogues in the run's order.
    """
    folder = Path(folder)
    missing = [name for name in ("metrics.json", "rollouts.jsonl") if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: pass the output folder of a finished `moe-empathy eval run`")
    metrics = json.loads((folder / "metrics.json").read_text())
    fields = DialogueRollout.__dataclass_fields__
    rollouts: dict[str, list[DialogueRollout]] = {}
    for line in (folder / "rollouts.jsonl").read_text().splitlines():
        row = json.loads(line)
        rollouts.setdefault(row["system"], []).append(DialogueRollout(**{k: row[k] for k in fields}))
    return metrics, rollouts


def run_rescore(args: argparse.Namespace) -> dict:
    """Runs ``moe-empathy eval rescore``: the replies of a finished run, scored again (with other
    or changed scorers) into a new report; nothing is generated, so the rollouts' timing and
    throughput are the run's.

    Args:
        args: the parsed command line.

    Returns:
        The metrics written to ``metrics.json``.
    """
    console = Console(highlight=False)
    if Path(args.out).resolve() == Path(args.run).resolve():
        raise ValueError(f"--out {args.out} is the run's own folder; write the rescored report to another folder")
    run_metrics, rollouts = read_run(args.run)
    settings = dict(run_metrics["settings"])
    scorer_names = check_scorer_names(_names(args.scorers)) if args.scorers else settings["scorers"]
    dims = (settings["dialogues"], settings["turns"], settings["max_new_tokens"])
    size = QUICK_RUN if dims == (QUICK_RUN.dialogues, QUICK_RUN.turns, QUICK_RUN.max_new_tokens) else STANDARD_RUN
    targets = acceptance_targets(args, size)
    check_output_dir(args.out, args.overwrite)
    scorers = {name: get_scorer(name) for name in scorer_names}
    tables, results, references = score_and_measure(console, rollouts, scorers, settings["expert_names"],
                                                    settings["tolerance"], settings["bootstrap_samples"])
    if "readers" in run_metrics["references"]:  # the readers recover labels, whatever the scorer
        references["readers"] = run_metrics["references"]["readers"]
    settings["scorers"] = scorer_names
    metrics = {
        **run_metrics,
        "settings": settings,
        "targets": check_targets(results[scorer_names[0]], targets, run_metrics["timing"]),
        "references": references,
        "scorers": results,
        "notes": run_metrics["notes"] + [f"Rescored with {', '.join(scorer_names)} from the replies of {args.run}."],
    }
    out = write_outputs(args.out, metrics, rollouts, tables[scorer_names[0]], args.overwrite)
    _print_summary(console, metrics)
    console.print(f"wrote {out / 'report.md'}, {out / 'metrics.json'}, rollouts.jsonl and plots")
    return metrics


def _print_summary(console: Console, metrics: dict) -> None:
    systems = metrics["scorers"][metrics["settings"]["scorers"][0]]
    table = Table(title="empathy gap (lower is better)")
    for column in ("system", "gap", "reduction vs base", "gate accuracy"):
        table.add_column(column, justify="right" if column != "system" else "left")
    for name, entry in systems.items():
        gap = entry["overall"]["gap"]["value"]
        reduction = (entry["overall"].get("gap_reduction_vs_base") or {}).get("value")
        accuracy = entry.get("gate", {}).get("accuracy", {}).get("value")
        table.add_row(
            name,
            "n/a" if gap is None else f"{gap:.3f}",
            "n/a" if reduction is None else f"{100 * reduction:.1f}%",
            "" if accuracy is None else f"{100 * accuracy:.1f}%",
        )
    console.print(table)
    for target in metrics["targets"]:
        mark = {True: "[green]met[/green]", False: "[red]missed[/red]", None: "[yellow]n/a[/yellow]"}[target["met"]]
        console.print(f"  {mark}  {target['target']}: {target['measured']}")


# --------------------------------------------------------------------- inspect


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``inspect``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--model", required=True, help="gated model folder")
    parser.add_argument("--dialogue", required=True, help=".json or .jsonl file of dialogue records (schema of `moe-empathy synth`)")
    parser.add_argument("--index", type=int, default=0, help="which record of the file")
    parser.add_argument("--png", default=None, help="where to write the heatmap (default: <dialogue file stem>.gate.png)")
    parser.set_defaults(func=run_inspect)


def inspect_dialogue(model, tokenizer, record: dict) -> list[list[float]]:
    """The gate's weights for every turn of a scripted dialogue, in one forward pass.

    Args:
        model: a gated model.
        tokenizer: its tokenizer.
        record: a dialogue record (its ``turns`` are read; replies are teacher-forced).

    Returns:
        ``[turns][experts]`` weights.
    """
    from moe_empathy.turns import encode_chat

    messages = [{"role": t["role"], "content": t["content"]} for t in record["turns"]]
    enc = encode_chat(tokenizer, messages, add_generation_prompt=messages[-1]["role"] == "user")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], turn_ids=enc["turn_ids"], gate_mask=enc["gate_mask"])
    users = sum(t["role"] == "user" for t in messages)
    return out.gate_weights[0, :users].tolist()  # [turns, E]


def run_inspect(args: argparse.Namespace) -> list[list[float]]:
    """Runs ``moe-empathy inspect``.

    Args:
        args: the parsed command line.

    Returns:
        ``[turns][experts]`` gate weights.
    """
    from moe_empathy.loading import load_model_and_tokenizer

    console = Console(highlight=False)
    model_dir = check_model_dir(args.model)
    records = read_dialogue_file(args.dialogue, labelled=False)
    if not 0 <= args.index < len(records):
        raise ValueError(f"--index {args.index} is out of range: {args.dialogue} holds {len(records)} record(s)")
    record = records[args.index]
    model, tokenizer, description = load_model_and_tokenizer(model_dir)
    weights = inspect_dialogue(model, tokenizer, record)
    names = model.expert_names
    name = str(record.get("dialogue_id", Path(args.dialogue).stem))
    table = Table(title=f"gate of {description} on {name}" + (f" ({record['task']})" if record.get("task") else ""))
    table.add_column("turn", justify="right")
    table.add_column("user message")
    table.add_column("expected")
    for expert in names:
        table.add_column(expert, justify="right")
    table.add_column("chosen")
    replies = record["turns"][1::2]
    for k, (row, user) in enumerate(zip(weights, record["turns"][0::2])):
        expected = replies[k].get("level") if k < len(replies) else None
        chosen = names[max(range(len(names)), key=row.__getitem__)]
        text = user["content"] if len(user["content"]) <= 60 else user["content"][:57] + "..."
        style = "" if expected is None else ("green" if chosen == expected else "red")
        cells = [f"{w:.2f} {'█' * round(w * 8)}" for w in row]
        table.add_row(str(k + 1), text, expected or "", *cells, f"[{style}]{chosen}[/{style}]" if style else chosen)
    console.print(table)
    png = Path(args.png) if args.png else Path(f"{Path(args.dialogue).stem}.gate.png")
    levels = [t.get("level") for t in replies]
    shown = DialogueRollout("inspect", name, record.get("task", ""), record.get("task_level", ""), users=[], levels=levels, gate=weights)
    with atomic_path(png) as staging:
        plot_gate_heatmaps([shown], names, staging, count=1)
    console.print(f"wrote {png}")
    return weights
