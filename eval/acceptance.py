"""Acceptance targets of an evaluation run: thresholds the gated model's metrics are checked
against, each row marked met, missed, or not measurable in the run.

The thresholds are arguments (:class:`AcceptanceTargets`); their defaults, the issue's
targets, are the options of ``moe-empathy eval run`` (:mod:`.cli`). The metrics themselves do
not depend on them.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunSize:
    """The size of an evaluation run.

    Attributes:
        dialogues: dialogues played.
        turns: turns per dialogue (the longest).
        systems: systems compared.
        max_new_tokens: reply length cap.
    """

    dialogues: int
    turns: int
    systems: int
    max_new_tokens: int

    def covers(self, other: RunSize) -> bool:
        """Whether this run is at least as large as ``other`` in every dimension."""
        return (
            self.dialogues >= other.dialogues
            and self.turns >= other.turns
            and self.systems >= other.systems
            and self.max_new_tokens >= other.max_new_tokens
        )


@dataclass(frozen=True)
class AcceptanceTargets:
    """Thresholds of an evaluation run's acceptance check.

    Attributes:
        gap_reduction: least gap reduction of ``gated`` against ``base`` (a fraction).
        gap_factor: most gap of ``gated`` as a multiple of ``external``'s.
        minutes: time budget of a full-size run.
        full_run: the size the time budget is about; a smaller run is not held to it.
    """

    gap_reduction: float
    gap_factor: float
    minutes: float
    full_run: RunSize


def check_targets(systems: dict, targets: AcceptanceTargets, timing: dict | None = None) -> list[dict]:
    """The gated model's targets, each with what was measured and whether it is met (None when
    the run lacks a system or setting needed to tell).

    Args:
        systems: :func:`.metrics.compute_metrics` output for the primary scorer.
        targets: the thresholds.
        timing: ``{"seconds", "dialogues", "turns", "systems", "max_new_tokens"}`` of the run, or None.

    Returns:
        ``[{"target", "measured", "met"}]`` rows, ``met`` True, False or None.
    """
    value = lambda system, *path: _dig(systems, system, *path)  # noqa: E731
    rows = []

    def add(target: str, measured: str, met: bool | None) -> None:
        rows.append({"target": target, "measured": measured, "met": met})

    reduction, prompt_reduction = value("gated", "overall", "gap_reduction_vs_base"), value("system_prompt", "overall", "gap_reduction_vs_base")
    add(
        f"gated gap reduction vs base >= {_fmt_pct(targets.gap_reduction, '.2f')}",
        _fmt_pct(reduction),
        None if reduction is None else reduction >= targets.gap_reduction,
    )
    add(
        "gated gap reduction >= system_prompt's",
        f"{_fmt_pct(reduction)} vs {_fmt_pct(prompt_reduction)}",
        None if reduction is None or prompt_reduction is None else reduction >= prompt_reduction,
    )
    accuracy, external_accuracy = value("gated", "gate", "accuracy"), value("external", "gate", "accuracy")
    add(
        "gated gate accuracy >= external's selection by task",
        f"{_fmt_pct(accuracy)} vs {_fmt_pct(external_accuracy)}",
        None if accuracy is None or external_accuracy is None else accuracy >= external_accuracy,
    )
    gap, external_gap = value("gated", "overall", "gap"), value("external", "overall", "gap")
    add(
        f"gated gap <= {targets.gap_factor:g} x external's",
        f"{_fmt(gap)} vs {_fmt(external_gap)} (x{_fmt(gap / external_gap if gap and external_gap else None)})",
        None if gap is None or external_gap is None else gap <= targets.gap_factor * external_gap,
    )
    early, late = value("gated", "overall", "by_bucket", "1-5", "gap"), value("gated", "overall", "by_bucket", "30+", "gap")
    add("gated gap at turns 30+ <= at turns 1-5 (no drift)", f"{_fmt(late)} vs {_fmt(early)}", None if early is None or late is None else late <= early)
    early, late = value("system_prompt", "overall", "by_bucket", "1-5", "gap"), value("system_prompt", "overall", "by_bucket", "30+", "gap")
    add("system_prompt gap grows from turns 1-5 to 30+", f"{_fmt(late)} vs {_fmt(early)}", None if early is None or late is None else late > early)
    if timing is not None:
        full, run = targets.full_run, RunSize(timing["dialogues"], timing["turns"], timing["systems"], timing["max_new_tokens"])
        add(
            f"{full.dialogues} dialogues x {full.turns} turns x {full.systems} systems ({full.max_new_tokens} new tokens) "
            f"within {targets.minutes:g} minutes",
            f"{timing['seconds'] / 60:.1f} min for {run.dialogues} x {run.turns} x {run.systems} ({run.max_new_tokens} tokens)",
            (timing["seconds"] <= 60 * targets.minutes) if run.covers(full) else None,
        )
    return rows


def _dig(tree: dict, *path):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree.get("value") if isinstance(tree, dict) and "value" in tree else tree


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _fmt_pct(x, spec: str = ".1f") -> str:
    return "n/a" if x is None else f"{100 * x:{spec}}%"
