"""Microbenchmark of the gated multi-LoRA layer: ``python -m moe_empathy.kernels.bench``.

The command line of ``moe-empathy bench kernels``: it picks the grid, runs it
(:mod:`.bench_measure`: what each method's layer is and how it is timed) and reports it
(:mod:`.bench_report`: a table on the terminal, ``results.csv`` and one PNG per routing mode).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .bench_measure import DTYPES, FULL_GRID, METHODS, QUICK_GRID, Row, run_benchmark
from .bench_report import plot, print_table, write_csv


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``bench kernels``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--quick", action="store_true", help="a small grid that runs in seconds")
    parser.add_argument("--tokens", type=_ints, help="comma-separated token counts (default: the full grid)")
    parser.add_argument("--hidden", type=_ints, help="comma-separated hidden sizes")
    parser.add_argument("--rank", type=_ints, help="comma-separated ranks")
    parser.add_argument("--experts", type=_ints, help="comma-separated expert counts")
    parser.add_argument("--modes", type=lambda s: tuple(s.split(",")), help="dense,top1,top2")
    parser.add_argument("--passes", type=lambda s: tuple(s.split(",")), help="fwd,fwd+bwd")
    parser.add_argument("--methods", type=lambda s: tuple(s.split(",")), default=METHODS, help=",".join(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--turn-tokens", type=int, default=64, help="tokens a top-k routing run spans")
    parser.add_argument("--warmup", type=int, default=25, help="warm-up milliseconds")
    parser.add_argument("--rep", type=int, default=100, help="timed milliseconds a measurement")
    parser.add_argument(
        "--cuda-graph", action="store_true", help="time each step's CUDA-graph replay (the GPU's own time; dense routing only)"
    )
    parser.add_argument("--output-dir", type=Path, default=Path("bench-kernels"), help="where the CSV and PNGs go")
    parser.set_defaults(func=run_from_args)


def run_from_args(args: argparse.Namespace) -> list[Row]:
    """Runs the benchmark that ``args`` describes; prints the table, writes CSV and PNGs."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    grid = dict(QUICK_GRID if args.quick else FULL_GRID)
    for name in grid:
        if getattr(args, name) is not None:
            grid[name] = getattr(args, name)
    unknown = set(args.methods) - set(METHODS) or set(grid["modes"]) - set(FULL_GRID["modes"]) or set(
        grid["passes"]
    ) - set(FULL_GRID["passes"])
    if unknown:
        raise ValueError(f"unknown choices {sorted(unknown)}; --methods takes {','.join(METHODS)}, --modes dense,top1,top2, --passes fwd,fwd+bwd")
    methods = tuple(args.methods)
    if not args.device.startswith("cuda") and "triton" in methods:
        console.print("[yellow]The Triton kernels need CUDA: timing the torch paths only.[/]")
        methods = tuple(m for m in methods if m != "triton")
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    rows = run_benchmark(
        grid,
        device=args.device,
        dtype=dtype,
        methods=methods,
        turn_tokens=args.turn_tokens,
        warmup=args.warmup,
        rep=args.rep,
        cuda_graph=args.cuda_graph,
        console=console,
    )
    print_table(rows, console)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    csv_path = args.output_dir / "results.csv"
    write_csv(rows, csv_path)
    for path in [csv_path, *plot(rows, args.output_dir)]:
        console.print(f"wrote {path}")
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    """Entry point of ``python -m moe_empathy.kernels.bench``."""
    parser = argparse.ArgumentParser(prog="python -m moe_empathy.kernels.bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    main()
