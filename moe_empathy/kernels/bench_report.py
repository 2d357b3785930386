"""Reporting for the kernel microbenchmark: the terminal table, ``results.csv`` and one PNG per routing mode."""

from __future__ import annotations

import csv
import math
from dataclasses import asdict
from pathlib import Path

from .bench_measure import METHODS, Row


def write_csv(rows: list[Row], path: Path) -> None:
    """All rows, one per (point, method)."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def print_table(rows: list[Row], console) -> None:
    """The rows as a rich table."""
    from rich.table import Table

    table = Table(title="multi-LoRA layer (base GEMM included)", show_lines=False)
    heads = ["pass", "mode", "T", "hidden", "r", "E", "method", "ms", "x base", "x ref", "GB/s", "TFLOP/s", "MiB"]
    for head in heads:
        table.add_column(head, justify="left" if head in ("pass", "mode", "method") else "right")
    for r in rows:
        table.add_row(
            *(r.pass_, r.mode, str(r.tokens), str(r.hidden), str(r.rank), str(r.experts), r.method),
            f"{r.median_ms:.4g}",
            f"{r.overhead_vs_base:.2f}",
            f"{r.speedup_vs_reference:.2f}",
            f"{r.gbps:.1f}",
            f"{r.tflops:.3g}",
            "-" if math.isnan(r.peak_mem_mb) else f"{r.peak_mem_mb:.1f}",
        )
    console.print(table)


def plot(rows: list[Row], out_dir: Path) -> list[Path]:
    """Time against tokens per method, one PNG per routing mode.

    Panels: passes (rows) x hidden sizes (columns), at one rank and expert count (16 and 3
    where measured, else the first).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r.rank for r in rows})
    experts = sorted({r.experts for r in rows})
    rank = 16 if 16 in ranks else ranks[0]
    paths = []
    for mode in sorted({r.mode for r in rows}):
        mode_experts = sorted({r.experts for r in rows if r.mode == mode})
        num_experts = 3 if 3 in mode_experts else mode_experts[0]
        sel = [r for r in rows if r.mode == mode and r.rank == rank and r.experts == num_experts]
        passes = sorted({r.pass_ for r in sel}, key=("fwd", "fwd+bwd").index)
        hiddens = sorted({r.hidden for r in sel})
        fig, axes = plt.subplots(
            len(passes), len(hiddens), figsize=(4 * len(hiddens), 3.2 * len(passes)), squeeze=False
        )
        for i, pass_ in enumerate(passes):
            for j, hidden in enumerate(hiddens):
                ax = axes[i][j]
                for method in METHODS:
                    pts = sorted(
                        (r.tokens, r.median_ms)
                        for r in sel
                        if r.pass_ == pass_ and r.hidden == hidden and r.method == method
                    )
                    if pts:
                        ax.plot(*zip(*pts), marker="o", label=method)
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_title(f"{pass_}, hidden {hidden}", fontsize=9)
                ax.set_xlabel("tokens")
                ax.set_ylabel("median ms")
                ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=8)
        device = sel[0].device if sel else ""
        # two lines, so that the title fits a figure of one column
        fig.suptitle(f"multi-LoRA layer, {mode}\nrank {rank}, {num_experts} experts ({device})", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"bench_{mode}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths

