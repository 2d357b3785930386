"""Measuring for the kernel microbenchmark: the grid, each method's layer, timing and the work model.

Each point of the grid (tokens x hidden x rank x experts x routing x pass) times whole
layers, base GEMM included, so that "overhead" is the layer's time over the base linear
alone:

- ``triton``: base linear, then the Triton kernels adding the experts' delta into its output;
- ``reference``: base linear plus the torch reference (two GEMMs over the stacked experts);
- ``loop``: base linear plus a Python loop over the experts (how peft / X-LoRA mix them);
- ``lora``: base linear plus one ordinary LoRA of rank ``r`` (the lower bound);
- ``base``: the base linear alone.

Square layers (``in = out = hidden``). Sparse points use top-1 / top-2 routing constant
over turn-sized runs of tokens, as the model's per-turn gate produces. Inputs are checked once
per point, outside the timed call, as the model checks its routing once per forward
(``validate=False`` on each layer's call).

Two clocks on CUDA: eager (each call launched from Python, as an eager model runs: the
host's launch overhead counts wherever the GPU finishes first) and, with ``cuda_graph``, the
replay of the step captured as a CUDA graph (the GPU's own time; dense routing only, since
Triton's top-k routing reads its block count back to the host). Forward+backward
trains the experts, the gate and the input (the base weight is frozen). Achieved GB/s and
TFLOP/s count the minimal traffic and the useful FLOPs of the layer, and are given as a
share of the device's peaks measured at start-up (a large copy and a large matmul).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch

from .inputs import MultiLoraInputs
from .reference import multi_lora_loop

FULL_GRID = {
    "tokens": (1, 16, 128, 1024, 4096, 8192),
    "hidden": (576, 2048, 4096),
    "rank": (8, 16, 64),
    "experts": (1, 3, 8),
    "modes": ("dense", "top1", "top2"),
    "passes": ("fwd", "fwd+bwd"),
}
QUICK_GRID = {
    "tokens": (1, 16, 128),
    "hidden": (576,),
    "rank": (8,),
    "experts": (3,),
    "modes": ("dense", "top1"),
    "passes": ("fwd", "fwd+bwd"),
}
METHODS = ("triton", "reference", "loop", "lora", "base")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Point:
    """One configuration of the grid."""

    tokens: int
    hidden: int
    rank: int
    experts: int
    mode: str  # "dense", "top1", "top2"
    pass_: str  # "fwd", "fwd+bwd"

    @property
    def active(self) -> int:
        """Experts each token uses."""
        return self.experts if self.mode == "dense" else min(int(self.mode[3:]), self.experts)


@dataclass
class Row:
    """One measurement: a method at a point."""

    tokens: int
    hidden: int
    rank: int
    experts: int
    mode: str
    pass_: str
    method: str
    dtype: str
    device: str
    median_ms: float
    overhead_vs_base: float
    speedup_vs_reference: float
    gbps: float
    pct_peak_bw: float
    tflops: float
    pct_peak_flops: float
    read_once_ms: float
    peak_mem_mb: float


def _turn_ids(tokens: int, experts: int, k: int, turn_tokens: int, gen: torch.Generator) -> torch.Tensor:
    """``[tokens, k]`` distinct expert ids, constant over runs of ``turn_tokens`` tokens."""
    runs = [torch.randperm(experts, generator=gen)[:k] for _ in range(-(-tokens // turn_tokens))]
    return torch.stack(runs).repeat_interleave(turn_tokens, dim=0)[:tokens]


def _inputs(point: Point, dtype: torch.dtype, device: str, turn_tokens: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    h, r, e = point.hidden, point.rank, point.experts

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)

    inputs = {
        "x": rand(point.tokens, h),
        "weight": rand(h, h, scale=h**-0.5),
        "lora_A": rand(e, r, h, scale=h**-0.5),
        "lora_B": rand(e, h, r, scale=r**-0.5),
        "expert_ids": None,
    }
    if point.mode == "dense":
        inputs["gate"] = torch.softmax(torch.randn(point.tokens, e, generator=gen), -1).to(device, dtype)
    else:
        inputs["expert_ids"] = _turn_ids(point.tokens, e, point.active, turn_tokens, gen).to(device)
        inputs["gate"] = torch.rand(point.tokens, point.active, generator=gen).to(device, dtype)
    if point.pass_ == "fwd+bwd":
        for name in ("x", "lora_A", "lora_B", "gate"):
            inputs[name].requires_grad_()
    return inputs


def _layer(method: str, inputs: dict, scaling: float):
    """The forward of one method's layer, ``[tokens, hidden] -> [tokens, hidden]``."""
    from .dispatch import multi_lora

    x, weight, lora_A, lora_B = inputs["x"], inputs["weight"], inputs["lora_A"], inputs["lora_B"]
    gate, expert_ids = inputs["gate"], inputs["expert_ids"]
    linear = torch.nn.functional.linear

    MultiLoraInputs(x, lora_A, lora_B, gate, scaling, expert_ids).check()  # once, as the model does

    def forward():
        y = linear(x, weight)  # [tokens, hidden]
        if method in ("triton", "reference"):
            backend = "triton" if method == "triton" else "torch"
            return multi_lora(x, lora_A, lora_B, gate, scaling, expert_ids=expert_ids, out=y, backend=backend, validate=False)
        if method == "loop":
            dense = MultiLoraInputs(x, lora_A, lora_B, gate, scaling, expert_ids).dense_gate()
            return y + multi_lora_loop(x, lora_A, lora_B, dense, scaling)
        if method == "lora":
            return y + (x @ lora_A[0].t()) @ lora_B[0].t() * scaling
        return y

    return forward


def _step(method: str, inputs: dict, point: Point, scaling: float):
    """What one timed repetition runs: the forward, or forward and backward."""
    forward = _layer(method, inputs, scaling)
    if point.pass_ == "fwd":
        return forward
    grad_out = torch.randn_like(inputs["x"])
    wrt = [inputs["x"]] if method == "base" else [inputs["x"], inputs["lora_A"], inputs["lora_B"]]
    if method in ("triton", "reference", "loop"):
        wrt.append(inputs["gate"])

    def step():
        return torch.autograd.grad(forward(), wrt, grad_out)

    return step


def _time_ms(fn, device: str, warmup: int, rep: int) -> float:
    """Median milliseconds of ``fn``: Triton's ``do_bench`` (L2 flushed) on CUDA, a loop on CPU."""
    if device.startswith("cuda"):
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(2):
        fn()
    times, spent = [], 0.0
    while len(times) < 3 or (spent < rep / 1000 and len(times) < 100):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times) * 1000


def _graphed(step):
    """``step`` captured as a CUDA graph (after warm-up calls that autotune and fill the
    allocator's pool), returned as its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _peak_mem_mb(fn, device: str) -> float:
    """Peak memory above the inputs while ``fn`` runs once (CUDA only)."""
    if not device.startswith("cuda"):
        return math.nan
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def measure_peaks(device: str, dtype: torch.dtype, warmup: int, rep: int) -> tuple[float, float]:
    """The device's achievable copy bandwidth (GB/s) and matmul throughput (TFLOP/s)."""
    n_copy, n_mm = (2**28, 8192) if device.startswith("cuda") else (2**24, 1024)
    src = torch.empty(n_copy, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    gbps = 2 * n_copy / (_time_ms(lambda: dst.copy_(src), device, warmup, rep) * 1e6)
    a = torch.randn(n_mm, n_mm, device=device).to(dtype)
    b = torch.randn(n_mm, n_mm, device=device).to(dtype)
    tflops = 2 * n_mm**3 / (_time_ms(lambda: a @ b, device, warmup, rep) * 1e9)
    return gbps, tflops


def _work(point: Point, method: str, itemsize: int) -> tuple[float, float, float]:
    """Minimal bytes moved, useful FLOPs, and the bytes of x, A and B read once."""
    t, h, r = point.tokens, point.hidden, point.rank
    experts = {"base": 0, "lora": 1}.get(method, point.experts)
    active = {"base": 0, "lora": 1}.get(method, point.active)
    gate = 0 if method in ("base", "lora") else t * point.active
    adapters = experts * 2 * r * h  # A and B
    fwd_bytes = (2 * t * h + h * h + adapters + gate) * itemsize  # x, y, W, A, B, gate
    fwd_flops = 2 * t * h * h + 2 * t * active * r * 2 * h
    read_once = (t * h + adapters) * itemsize
    if point.pass_ == "fwd":
        return fwd_bytes, fwd_flops, read_once
    # backward: read dY, x, W, A, B, gate; write dx, dA, dB, dgate; dx of the base, 2x the adapters' FLOPs
    bwd_bytes = (3 * t * h + h * h + 2 * adapters + 2 * gate) * itemsize
    bwd_flops = 2 * t * h * h + 2 * (fwd_flops - 2 * t * h * h)
    return fwd_bytes + bwd_bytes, fwd_flops + bwd_flops, read_once


def grid_points(grid: dict) -> list[Point]:
    """Every point of ``grid`` (top-k modes skipped where k exceeds the experts)."""
    return [
        Point(t, h, r, e, m, p)
        for p in grid["passes"]
        for m in grid["modes"]
        for e in grid["experts"]
        for r in grid["rank"]
        for h in grid["hidden"]
        for t in grid["tokens"]
        if m == "dense" or int(m[3:]) <= e
    ]


def run_benchmark(
    grid: dict,
    *,
    device: str,
    dtype: torch.dtype,
    methods: tuple[str, ...],
    turn_tokens: int = 64,
    warmup: int = 25,
    rep: int = 100,
    cuda_graph: bool = False,
    console=None,
) -> list[Row]:
    """Times every method at every point of ``grid``.

    Args:
        grid: lists of tokens, hidden, rank, experts, modes and passes (see ``FULL_GRID``).
        device: ``"cuda"`` or ``"cpu"``.
        dtype: inputs' dtype.
        methods: subset of ``METHODS``; ``"triton"`` needs CUDA.
        turn_tokens: tokens a routing run (a turn) spans in top-k modes.
        warmup, rep: milliseconds of warm-up and of timed repetitions.
        cuda_graph: time the replay of each step captured as a CUDA graph (CUDA, dense routing
            only) instead of eager calls.
        console: a rich console for the progress bar (a new one when None).

    Returns:
        One :class:`Row` per (point, method).
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if cuda_graph and not device.startswith("cuda"):
        raise ValueError("cuda_graph timing needs a CUDA device; drop --cuda-graph or pass --device cuda")
    if cuda_graph and set(grid["modes"]) != {"dense"}:
        raise ValueError("cuda_graph timing takes dense routing only (top-k reads its block count back to the host); pass --modes dense")
    console = console or Console()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    peak_gbps, peak_tflops = measure_peaks(device, dtype, warmup, rep)
    console.print(f"[bold]{device}[/] {str(dtype)[6:]}: measured peaks {peak_gbps:.1f} GB/s, {peak_tflops:.2f} TFLOP/s")
    points = grid_points(grid)
    rows: list[Row] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(points) * len(methods))
        for point in points:
            inputs = _inputs(point, dtype, device, turn_tokens)
            times = {}
            for method in methods:
                label = f"{method:>9} {point.pass_} {point.mode} T={point.tokens} h={point.hidden}"
                progress.update(task, description=label)
                step = _step(method, inputs, point, scaling=2.0)
                times[method] = _time_ms(_graphed(step) if cuda_graph else step, device, warmup, rep)
                nbytes, flops, read_once = _work(point, method, itemsize)
                ms = times[method]
                rows.append(
                    Row(
                        *(point.tokens, point.hidden, point.rank, point.experts, point.mode, point.pass_),
                        method=method,
                        dtype=str(dtype)[6:],
                        device=device,
                        median_ms=ms,
                        overhead_vs_base=math.nan,
                        speedup_vs_reference=math.nan,
                        gbps=nbytes / (ms * 1e6),
                        pct_peak_bw=100 * nbytes / (ms * 1e6) / peak_gbps,
                        tflops=flops / (ms * 1e9),
                        pct_peak_flops=100 * flops / (ms * 1e9) / peak_tflops,
                        read_once_ms=read_once / (peak_gbps * 1e6),
                        peak_mem_mb=_peak_mem_mb(step, device),
                    )
                )
                progress.advance(task)
            for row in rows[-len(methods) :]:
                if "base" in times:
                    row.overhead_vs_base = row.median_ms / times["base"]
                if "reference" in times:
                    row.speedup_vs_reference = times["reference"] / row.median_ms
    return rows

