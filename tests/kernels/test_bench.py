"""The kernel microbenchmark runs its quick grid on CPU and writes its table, CSV and plots."""

from __future__ import annotations

import csv

import pytest
import torch

from moe_empathy.cli import build_parser
from moe_empathy.kernels import bench, bench_measure


def test_quick_run_on_cpu_writes_csv_and_plots(tmp_path, capsys):
    argv = ["--quick", "--tokens", "1,16", "--device", "cpu", "--warmup", "1", "--rep", "5"]
    rows = bench.main([*argv, "--output-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "Triton kernels need CUDA" in printed
    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    # 2 token counts x 1 hidden x 1 rank x 1 expert count x 2 modes x 2 passes, 4 torch methods each
    assert len(table) == len(rows) == 2 * 2 * 2 * 4
    assert {r["method"] for r in table} == {"reference", "loop", "lora", "base"}
    for r in table:
        assert float(r["median_ms"]) > 0
        assert float(r["gbps"]) > 0 and float(r["tflops"]) > 0
    assert all(float(r["overhead_vs_base"]) == 1.0 for r in table if r["method"] == "base")
    for mode in ("dense", "top1"):
        png = tmp_path / f"bench_{mode}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_line_registers_the_kernels_benchmark(tmp_path):
    args = build_parser().parse_args(["bench", "kernels", "--quick", "--hidden", "64,128", "--output-dir", str(tmp_path)])
    assert args.bench_command == "kernels" and args.quick and args.hidden == (64, 128)
    assert args.func is bench.run_from_args


def test_grid_skips_top_k_wider_than_the_experts():
    points = bench_measure.grid_points({**bench_measure.QUICK_GRID, "experts": (1, 3), "modes": ("top2",), "tokens": (1,)})
    assert {p.experts for p in points} == {3}


def test_cuda_graph_timing_refuses_what_it_cannot_capture():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        bench_measure.run_benchmark(bench_measure.QUICK_GRID, device="cpu", dtype=torch.float32, methods=("base",), cuda_graph=True)
    with pytest.raises(ValueError, match="dense routing only"):
        bench_measure.run_benchmark(bench_measure.QUICK_GRID, device="cuda", dtype=torch.float32, methods=("base",), cuda_graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_timing_runs_every_method(tmp_path):
    argv = ["--quick", "--tokens", "16", "--modes", "dense", "--cuda-graph", "--warmup", "1", "--rep", "5"]
    rows = bench.main([*argv, "--output-dir", str(tmp_path)])
    assert {r.method for r in rows} == set(bench_measure.METHODS)
    assert all(r.median_ms > 0 for r in rows)
