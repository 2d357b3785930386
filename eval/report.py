"""Writes an evaluation's outputs: ``report.md``, ``metrics.json``, ``rollouts.jsonl`` and PNG plots.

Everything is written into a staging folder beside the output folder and moved into place
at the end, so an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from moe_empathy.train.taxonomy import LEVEL_TARGET, LEVELS
from moe_empathy.utils import check_output_dir as check_output
from moe_empathy.utils import replace_output_dir

from .metrics import BUCKETS, EvalTable
from .rollout import DialogueRollout
from .stats import gate_choices

OUTPUT_KIND = "eval run"  # recorded in the output folder's marker (see moe_empathy.utils.replace_output_dir)
PLOTS = {
    "empathy": "empathy_by_turn.png",
    "heatmaps": "gate_heatmaps.png",
    "confusion": "gate_confusion.png",
}


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuses an output folder that :func:`write_outputs` may not fill (before any work is done).

    Args:
        out: the output folder.
        overwrite: replace an earlier report of ``eval run`` there.
    """
    return check_output(out, overwrite, OUTPUT_KIND)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_empathy_by_turn(systems: dict, path: Path, tolerance: float) -> None:
    """Mean score by turn of each system, one panel per task level, with the target band.

    Args:
        systems: :func:`~.metrics.compute_metrics` output.
        path: the PNG to write.
        tolerance: half-width of the band drawn around the mean target.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    groups = [g for g in LEVELS if any(g in s["by_turn"] for s in systems.values())]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.6), squeeze=False, sharey=True)
    for ax, group in zip(axes[0], groups):
        target = None
        for name, entry in systems.items():
            curve = entry["by_turn"].get(group)
            if curve is None:
                continue
            turns = np.arange(1, len(curve["score"]) + 1)
            ax.plot(turns, [np.nan if v is None else v for v in curve["score"]], marker=".", label=name)
            target = np.array([np.nan if v is None else v for v in curve["target"]])
        if target is not None:
            turns = np.arange(1, len(target) + 1)
            ax.fill_between(turns, target - tolerance, target + tolerance, color="grey", alpha=0.2, label=f"target ± {tolerance:g}")
            ax.plot(turns, target, color="black", linestyle="--", linewidth=1, label="target")
        ax.set_title(f"{group}-empathy tasks")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("turn")
        ax.set_ylim(0.8, 5.2)
    axes[0][0].set_ylabel("empathy score (1-5)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gate_heatmaps(rollouts: list[DialogueRollout], names: list[str], path: Path, count: int = 4) -> None:
    """The gate's weights over turns (experts by turns) for sample dialogues, expected levels
    marked with a cross where labelled.

    Args:
        rollouts: the gated system's rollouts.
        names: the experts.
        path: the PNG to write.
        count: dialogues to show (those with the most level shifts first).
    """
    plt = _pyplot()
    shifts = lambda r: sum(a != b for a, b in zip(r.levels, r.levels[1:]))  # noqa: E731
    chosen = sorted(rollouts, key=lambda r: -shifts(r))[:count]
    width = max(len(r.gate) for r in chosen)
    fig, axes = plt.subplots(len(chosen), 1, figsize=(max(6, 0.32 * width + 2), 1.6 * len(chosen) + 0.8), squeeze=False, layout="constrained")
    for ax, r in zip(axes[:, 0], chosen):
        grid = np.array(r.gate).T  # [E, turns]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        marked = [(k, names.index(level)) for k, level in enumerate(r.levels) if level in names]
        if marked:
            ax.scatter(*zip(*marked), marker="x", color="red", s=18)
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(r.gate)), [str(k + 1) for k in range(len(r.gate))], fontsize=6)
        ax.set_title(f"{r.dialogue_id} · {r.task}", fontsize=8)
    axes[-1, 0].set_xlabel("turn (x = expected level)")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="gate weight")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confusion(gates: dict[str, dict], path: Path) -> None:
    """Confusion matrices (expected level by chosen expert, row-normalised) of the systems that choose.

    Args:
        gates: ``{system: gate metrics}`` (each with ``confusion``).
        path: the PNG to write.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(gates), figsize=(3.8 * len(gates), 3.4), squeeze=False)
    for ax, (name, gate) in zip(axes[0], gates.items()):
        labels = gate["confusion"]["labels"]
        counts = np.array(gate["confusion"]["rows_expected_columns_chosen"], dtype=float)
        share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
        ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", color="white" if share[i, j] > 0.5 else "black", fontsize=8)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("chosen expert")
        ax.set_ylabel("expected level")
        ax.set_title(name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------- markdown


def _ci(entry: dict | None, percent: bool = False, digits: int = 2) -> str:
    if not entry or entry.get("value") is None:
        return "n/a"
    scale, suffix = (100, "%") if percent else (1, "")
    value = f"{entry['value'] * scale:.{digits if not percent else 1}f}{suffix}"
    if entry.get("ci_low") is None:
        return value
    return f"{value} [{entry['ci_low'] * scale:.{digits if not percent else 1}f}, {entry['ci_high'] * scale:.{digits if not percent else 1}f}]"


def _throughput_table(throughput: dict) -> str:
    """Turns and tokens per second of each system, and their ratio to the base's in the same run
    (the base decodes the same scripts; replies of different lengths make turns/s differ alone)."""
    base = throughput.get("base")

    def ratio(entry: dict, key: str) -> str:
        if base is None or key not in entry or key not in base or not base[key]:
            return "-"
        return f"{entry[key] / base[key]:.2f}x"

    rows = [
        [n, t["mode"], str(t["turns"]), f"{t['seconds']:.1f}", f"{t['turns_per_second']:.2f}", ratio(t, "turns_per_second"),
         f"{t['tokens_per_second']:.1f}" if "tokens_per_second" in t else "-", ratio(t, "tokens_per_second")]
        for n, t in throughput.items()
    ]
    return _table(["system", "mode", "turns", "seconds", "turns/s", "turns/s vs base", "tokens/s", "tokens/s vs base"], rows)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _references(metrics: dict, systems: dict) -> list[str]:
    """The references section: the constant reply, the task-selection ceiling, the label
    ceilings of simple readers, and a plain sentence per system that does not beat the
    constant reply."""
    refs = metrics.get("references")
    if not refs:
        return []
    constant, by_task = refs["constant_reply"], refs["task_selection"]
    parts = [
        "## References without a model",
        "",
        "Gaps on the same scripts' targets, as a perfectly calibrated scorer would measure them: the same reply at every "
        "turn (the best single fixed score) and the best fixed score per task (the ceiling of any choice made from the "
        "task alone, e.g. `external` with perfect experts). A gap reduction against the base means little unless the gap "
        "is also below these.",
        "",
        _table(["reference", "gap", "fixed score(s)"], [
            ["constant reply", _ci(constant), f"{constant['score']:.2f}"],
            ["task selection", _ci(by_task), ", ".join(f"{t} {v:.2f}" for t, v in by_task["scores"].items())],
        ]),
        "",
    ]
    for name, entry in systems.items():
        gap = entry["overall"]["gap"]["value"]
        if gap is None or constant["value"] is None:
            continue
        if gap >= constant["value"]:
            parts.append(f"- `{name}` does **not** beat the constant-reply reference: its gap {gap:.2f} is not below "
                         f"{constant['value']:.2f}, what the same reply at every turn would reach.")
        else:
            parts.append(f"- `{name}` beats the constant-reply reference: gap {gap:.2f} < {constant['value']:.2f}"
                         + ("" if by_task["value"] is None or gap < by_task["value"] else
                            f", but not the task-selection ceiling ({by_task['value']:.2f})") + ".")
    readers = refs.get("readers")
    if readers:
        parts += [
            "Label ceilings of simple readers: lookups fitted on the generator's training split (most frequent level "
            "per key) and applied to these scripts; a key not seen in training falls back to the task's level, and "
            "\"seen\" is the share of turns whose key was seen. The state-change reader reads the user's state from "
            "each message's text with naive Bayes classifiers fitted on the same split. Accuracy: share of turns whose "
            "level is recovered; gap: "
            "the gap if every reply hit the recovered level's target.",
            "",
            _table(["reader", "accuracy", "gap", "seen"], [
                [r["reader"], _ci(r["accuracy"], percent=True), _ci(r["gap"]), f"{100 * r['seen']:.0f}%"] for r in readers
            ]),
            "",
        ]
    return parts


def render_report(metrics: dict) -> str:
    """The Markdown report of a :func:`write_outputs` metrics tree.

    Args:
        metrics: the content of ``metrics.json``.
    """
    s = metrics["settings"]
    primary = s["scorers"][0]
    systems = metrics["scorers"][primary]
    parts = [
        "# Empathy evaluation",
        "",
        f"Model `{s['model']}`; {s['dialogues']} `{s['split']}` dialogues ({s['data']}), up to {s['turns']} turns each, "
        f"replies of at most {s['max_new_tokens']} new tokens, greedy; rollouts {s['mode']} in batches of {s['batch_size']}. "
        f"Scorer(s): {', '.join(s['scorers'])} (tables use `{primary}`). 95% intervals from {s['bootstrap_samples']} "
        "dialogue-level bootstrap resamples. Definitions: `eval/README.md`.",
        "",
        "## Systems",
        "",
        _table(["system", "what it is"], [[n, d] for n, d in s["systems"].items()]),
        "",
        "## Targets",
        "",
        _table(
            ["target", "measured", "met"],
            [[t["target"], t["measured"], {True: "yes", False: "**no**", None: "not measurable in this run"}[t["met"]]] for t in metrics["targets"]],
        ),
        "",
        "## Empathy gap and score",
        "",
        f"Gap = mean |target - score| per reply (target: low {LEVEL_TARGET['low']:.2f}, medium {LEVEL_TARGET['medium']:.2f}, "
        f"high {LEVEL_TARGET['high']:.2f}). In band: |target - score| <= {s['tolerance']:g}.",
        "",
        _table(
            ["system", "gap", "reduction vs base", "score", "score x base (high tasks)", "over-empathy (low tasks)", "over-empathy rate (low tasks)", "in band"],
            [
                [
                    name,
                    _ci(e["overall"]["gap"]),
                    _ci(e["overall"].get("gap_reduction_vs_base"), percent=True),
                    _ci(e["overall"]["score"]),
                    _ci(e["overall"].get("score_factor_high_tasks_vs_base")),
                    _ci(e["overall"]["over_empathy_low_tasks"]),
                    _ci(e["overall"]["over_empathy_rate_low_tasks"], percent=True),
                    _ci(e["overall"]["in_band"], percent=True),
                ]
                for name, e in systems.items()
            ],
        ),
        "",
    ]
    parts += _references(metrics, systems)
    parts += [
        "## Replies that stop helping",
        "",
        "Copy rate: share of replies at least half of whose sentences appear verbatim in an earlier reply of the same "
        "dialogue. Distinct-2: unique word bigrams / word bigrams over the system's replies. Words: mean reply length "
        "(a constant or empty reply scores well on neither copy rate nor length). Helpfulness: the helpfulness scorer's "
        "calibrated mean (1-5, `eval/helpfulness.py`), a coarse signal: on held-out rated replies it agrees with the "
        "raters far less than they agree with each other (Spearman about 0.3-0.4 against their 0.85), so it shows a "
        "system whose replies stop helping, not an order between close systems.",
        "",
        _table(
            ["system", "copy rate", "distinct-2", "words per reply", "helpfulness"],
            [
                [name, _ci(r["copy_rate"], percent=True), _ci(r["distinct_2"], digits=3), _ci(r["reply_words"], digits=1),
                 _ci(r.get("helpfulness"))]
                for name, r in ((name, e["repetition"]) for name, e in systems.items() if "repetition" in e)
            ],
        ),
        "",
        "## Consistency across turns",
        "",
        _table(
            ["system", "score std per dialogue", "score slope per turn", "gap slope per turn", "drift onset (median turn)"],
            [
                [name, _ci(e["overall"]["score_std"]), _ci(e["overall"]["score_slope"], digits=3), _ci(e["overall"]["gap_slope"], digits=3), _ci(e["overall"]["drift_onset_median"], digits=1)]
                for name, e in systems.items()
            ],
        ),
        "",
        "Gap by turn bucket (turns counted from 1; the buckets are inclusive as named, so turn 30 is in both 16-30 and 30+):",
        "",
    ]
    buckets = [b for b in BUCKETS if any(b in e["overall"]["by_bucket"] for e in systems.values())]
    parts += [
        _table(["system"] + buckets, [[name] + [_ci(e["overall"]["by_bucket"].get(b, {}).get("gap")) for b in buckets] for name, e in systems.items()]),
        "",
        "## Gap per task",
        "",
    ]
    tasks = sorted({t for e in systems.values() for t in e["by_task"]})
    parts += [
        _table(["system"] + tasks, [[name] + [_ci(e["by_task"][t]["gap"]) for t in tasks] for name, e in systems.items()]),
        "",
        f"![empathy by turn]({PLOTS['empathy']})",
        "",
    ]
    gates = {name: e["gate"] for name, e in systems.items() if "gate" in e}
    if gates:
        parts += [
            "## The gate",
            "",
            "`gated` chooses per turn; `external` is the expert picked from the task (it cannot follow a shift inside a task). "
            "Choice = expert of largest weight. Entropy normalised by log(experts).",
            "",
            _table(
                ["system", "accuracy", "accuracy at shifts", "entropy", "switch rate", "shifts followed", "latency (turns)", "shifts"],
                [
                    [name, _ci(g["accuracy"], True), _ci(g["accuracy_at_shifts"], True), _ci(g["entropy"]), _ci(g["switch_rate"], True), _ci(g["shift_follow_rate"], True), _ci(g["shift_latency"]), str(g["shifts"])]
                    for name, g in gates.items()
                ],
            ),
            "",
            f"![confusion]({PLOTS['confusion']})",
            "",
        ]
        if "gated" in gates:
            parts += [f"![gate heatmaps]({PLOTS['heatmaps']})", ""]
    for scorer in s["scorers"][1:]:
        other = metrics["scorers"][scorer]
        parts += [
            f"## Scorer `{scorer}`",
            "",
            _table(["system", "gap", "reduction vs base", "score"], [[n, _ci(e["overall"]["gap"]), _ci(e["overall"].get("gap_reduction_vs_base"), True), _ci(e["overall"]["score"])] for n, e in other.items()]),
            "",
        ]
    throughput = metrics.get("throughput")
    if throughput:
        parts += ["## Throughput", "", _throughput_table(throughput), ""]
    if metrics.get("notes"):
        parts += ["## Notes", ""] + [f"- {note}" for note in metrics["notes"]] + [""]
    return "\n".join(parts)


def write_outputs(
    out: str | Path,
    metrics: dict,
    rollouts: dict[str, list[DialogueRollout]],
    table: EvalTable,
    overwrite: bool = False,
) -> Path:
    """Writes ``report.md``, ``metrics.json``, ``rollouts.jsonl`` and the PNGs, atomically.

    Args:
        out: the output folder.
        metrics: the metrics tree (``settings``, ``scorers``, ``targets``...).
        rollouts: ``{system: rollouts}``.
        table: the aligned arrays (scores per reply go into ``rollouts.jsonl``).
        overwrite: replace an earlier report of ``eval run`` (no other folder is replaced).
    """
    out = Path(out)
    with replace_output_dir(out, overwrite, OUTPUT_KIND) as staging:
        primary = metrics["settings"]["scorers"][0]
        systems = metrics["scorers"][primary]
        plot_empathy_by_turn(systems, staging / PLOTS["empathy"], metrics["settings"]["tolerance"])
        gates = {name: e["gate"] for name, e in systems.items() if "gate" in e}
        if gates:
            plot_confusion(gates, staging / PLOTS["confusion"])
        if "gated" in rollouts and rollouts["gated"][0].gate is not None:
            plot_gate_heatmaps(rollouts["gated"], table.expert_names, staging / PLOTS["heatmaps"])
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        (staging / "report.md").write_text(render_report(metrics))
        with open(staging / "rollouts.jsonl", "w") as handle:
            for name, played in rollouts.items():
                for d, r in enumerate(played):
                    row = asdict(r) | {"scores": [None if np.isnan(v) else float(v) for v in table.scores[name][d, : len(r.replies)]]}
                    if r.gate is not None:
                        row["chosen"] = [table.expert_names[i] for i in gate_choices(np.array(r.gate)[None])[0]]
                    handle.write(json.dumps(row) + "\n")
    return out
