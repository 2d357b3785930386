"""Decode-step benchmark: what one decoded token of the gated model costs above the base's.

One decode step is a forward of one new token per row on a KV cache holding ``context``
tokens, exactly as ``generate`` runs it after the prefill (for the gated model: the turn is
already decided, ``continues_turn=True``). After each timed step the cache is cropped back,
so every step sees the same context. Systems, side by side in one run (taking turns step by
step; ratios and overheads are medians over adjacent base/gated pairs): the base, and the gated model with experts on the top 10, 20 and 30
decoder layers, each over its own copy of the same base. Mixtures:

* ``fold``: every row shares one mixture (batch 1, or one forced mixture), which the expert
  layers fold into their weights once per turn: a step is then the base's GEMMs;
* ``per_row``: each row has its own mixture (batch > 1): the experts' delta is added per row.

With ``--narrow`` the systems are built on a random model of the default base's depth (30
layers) but hidden size 64: its GEMMs cost next to nothing, so the overhead in ms is the
per-step cost of the package's own code (hooks, routing, the expert linears' dispatch) alone,
free of the GEMMs' timing noise.

It writes ``decode_bench.csv``, ``decode_bench.png`` (overhead in ms against context length)
and ``decode_profile.md`` (``torch.profiler``: where the time of one step goes, base beside
gated). Run: ``moe-empathy bench decode``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

EXPERT_LAYER_COUNTS = (10, 20, 30)


def build_systems(base, tokenizer, expert_layers: list[int], rank: int) -> dict[str, torch.nn.Module]:
    """The base and one gated model per number of expert layers, with non-zero experts.

    Args:
        base: the base causal LM (not modified; the ``base`` system is a copy of it, as every other system is).
        tokenizer: its tokenizer (for the turn markers).
        expert_layers: numbers of top decoder layers that get experts.
        rank: LoRA rank.
    """
    from .bench_model import _randomise_lora
    from .modeling_moe_empathy import MoeEmpathyForCausalLM

    layers = base.config.num_hidden_layers
    # copies like every other system: copies and the loaded original differ by ~2% in speed
    systems = {"base": copy.deepcopy(base).eval(), "base_copy": copy.deepcopy(base).eval()}
    for count in expert_layers:
        if not 1 <= count <= layers:
            raise ValueError(f"--expert-layers {count} is outside 1..{layers} (the base has {layers} decoder layers)")
        gated = MoeEmpathyForCausalLM.from_base(
            copy.deepcopy(base), tokenizer=tokenizer, lora_rank=rank, lora_alpha=2 * rank, gate_layer=layers - count
        ).eval()
        _randomise_lora(gated, count)
        with torch.no_grad():  # a gate that gives every row its own mixture
            for param in gated.gate.parameters():
                param.add_(torch.randn_like(param) * 0.5)
        systems[f"gated_{count}_layers"] = gated
    return systems


def narrow_base(base) -> torch.nn.Module:
    """A random model of ``base``'s architecture and depth with hidden size 64 (see ``--narrow``).

    Args:
        base: the default base (its configuration is copied, not its weights).
    """
    config = copy.deepcopy(base.config)
    config.hidden_size, config.intermediate_size = 64, 128
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32
    torch.manual_seed(0)
    return type(base)(config).eval()


class DecodeStep:
    """A KV cache filled with ``context`` tokens per row, and one timed decode step on it.

    Args:
        model: the system.
        batch: rows.
        context: cached tokens per row.
        vocab: vocabulary size (random prompt tokens).
        fold: gated models only: force one mixture shared by all rows.
    """

    def __init__(self, model, batch: int, context: int, vocab: int, fold: bool):
        generator = torch.Generator().manual_seed(context + batch)
        self.model = model
        self.gated = hasattr(model, "force_gate")
        shared = torch.arange(1.0, len(model.expert_names) + 1) if self.gated else None  # one mixture for all rows
        self.forced = (shared / shared.sum()).tolist() if self.gated and fold else None
        prompt = torch.randint(3, vocab, (batch, context), generator=generator)  # [batch, context]
        self.mask = torch.ones(batch, context + 1, dtype=torch.long)  # [batch, context + 1]
        self.token = torch.randint(3, vocab, (batch, 1), generator=generator)  # [batch, 1]
        with torch.no_grad(), self._forcing():
            self.cache = model(input_ids=prompt, use_cache=True).cache
        if self.gated and fold != _shares_one_mixture(model, self.cache):
            raise RuntimeError(f"the {'fold' if fold else 'per_row'} setting did not give the expected routing")

    def _forcing(self):
        from contextlib import nullcontext

        return self.model.force_gate(self.forced) if self.forced is not None else nullcontext()

    def __call__(self) -> float:
        """Seconds of one decode step (the cache is cropped back afterwards, untimed)."""
        extra = {"continues_turn": True} if self.gated else {}
        with torch.no_grad(), self._forcing():
            start = time.perf_counter()
            self.model(input_ids=self.token, attention_mask=self.mask, cache=self.cache, use_cache=True, **extra)
            elapsed = time.perf_counter() - start
        self.cache.crop(-1)
        return elapsed


def _shares_one_mixture(model, cache) -> bool:
    """Whether the decode plan of the turn held in ``cache`` folds (one mixture for all rows)."""
    from .cache import gate_state_of
    from .dispatch import continuing_call

    plan = continuing_call(model.gate, model.config, gate_state_of(cache), 1, None).plan
    return plan.fold_key is not None


def measure(systems: dict, batch_sizes: list[int], contexts: list[int], steps: int, repeats: int, vocab: int, progress=None) -> list[dict]:
    """Decode-step time of every system against the base's, for every batch size, mixture and context.

    The systems take turns step by step (base, gated..., base, gated...), so each gated step has
    a base step a few milliseconds away: a load change on the machine hits both. The ratio and
    the overhead are medians over these pairs, which a noisy machine disturbs far less than a
    comparison of separate medians.

    Args:
        systems: from :func:`build_systems`.
        batch_sizes: rows per step.
        contexts: cached tokens per row.
        steps: timed steps per round.
        repeats: rounds (one more warm-up round is discarded).
        vocab: vocabulary size.
        progress: a rich ``Progress`` to advance, or None.
    """
    settings = []
    for batch in batch_sizes:
        for mixture in ("fold", "per_row") if batch > 1 else ("fold",):
            for context in contexts:
                settings.append((batch, mixture, context))
    task = progress.add_task("decode steps", total=len(settings) * (repeats + 1)) if progress else None
    rows = []
    for batch, mixture, context in settings:
        stepper = {name: DecodeStep(model, batch, context, vocab, fold=mixture == "fold") for name, model in systems.items()}
        samples: dict[str, list[float]] = {name: [] for name in systems}
        for round_index in range(repeats + 1):  # round 0 warms up
            for _ in range(steps):
                for name, step in stepper.items():
                    elapsed = step()
                    if round_index:
                        samples[name].append(elapsed)
            if progress:
                progress.advance(task)
        base = samples["base"]
        for name, times in samples.items():
            ratios = [b / t for t, b in zip(times, base)]
            low, high = median_interval(ratios)
            rows.append({
                "system": name, "batch": batch, "mixture": mixture, "context": context,
                "step_ms": round(statistics.median(times) * 1e3, 3),
                "overhead_ms": round(statistics.median(t - b for t, b in zip(times, base)) * 1e3, 3),
                "tokens_per_s_vs_base": round(statistics.median(ratios), 4),
                "ratio_low": round(low, 4),
                "ratio_high": round(high, 4),
                "steps": len(times),
            })
    return rows


def median_interval(values: list[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap 95% interval of the median of ``values``.

    Args:
        values: paired ratios (one per adjacent base/system step pair).
        resamples: bootstrap resamples.
        seed: seed of the resampling.
    """
    data = torch.tensor(values, dtype=torch.float64)  # [pairs]
    picks = torch.randint(len(values), (resamples, len(values)), generator=torch.Generator().manual_seed(seed))
    medians = data[picks].median(dim=1).values.sort().values  # [resamples]
    return medians[int(0.025 * resamples)].item(), medians[int(0.975 * resamples) - 1].item()


def profile_steps(systems: dict, batch_sizes: list[int], context: int, vocab: int, steps: int = 8) -> str:
    """A markdown report of ``torch.profiler`` over decode steps: the top operators of the
    base and the gated model side by side, and the time inside this package's own code.

    Args:
        systems: from :func:`build_systems` (the base and the gated model with the fewest expert layers).
        batch_sizes: rows per step.
        context: cached tokens per row.
        vocab: vocabulary size.
        steps: profiled steps.
    """
    from torch.profiler import ProfilerActivity, profile

    gated_name = next(name for name in systems if name.startswith("gated"))
    lines = ["# One decode step, profiled", "", f"Context {context} cached tokens, {steps} steps each; times are per step (profiler overhead included).", ""]
    for batch in batch_sizes:
        for name in ("base", gated_name):
            step = DecodeStep(systems[name], batch, context, vocab, fold=batch == 1)
            for _ in range(2):
                step()
            with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
                for _ in range(steps):
                    step()
            events = prof.key_averages()
            total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
            lines += [f"## {name}, batch {batch}: {total:.2f} ms of CPU per step", "", "| operator | ms/step | calls/step |", "| --- | --- | --- |"]
            for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:12]:
                lines.append(f"| `{event.key[:70]}` | {event.self_cpu_time_total / steps / 1e3:.3f} | {event.count / steps:.0f} |")
            own = [e for e in prof.key_averages(group_by_stack_n=1) if _is_model_code(e.key)]
            if own:
                lines += ["", "This package's own functions (total time inside, per step):", "", "| function | ms/step | calls/step |", "| --- | --- | --- |"]
                seen = {}
                for event in own:
                    key = event.key.rsplit("/", 1)[-1][:80]
                    ms, calls = seen.get(key, (0.0, 0.0))
                    seen[key] = (max(ms, event.cpu_time_total / steps / 1e3), max(calls, event.count / steps))
                for key, (ms, calls) in sorted(seen.items(), key=lambda kv: -kv[1][0])[:10]:
                    lines.append(f"| `{key}` | {ms:.3f} | {calls:.0f} |")
            elif name != "base":
                lines += ["", f"(torch {torch.__version__}'s profiler recorded no Python frames here: operators only.)"]
            lines.append("")
    return "\n".join(lines)


def _is_model_code(frame: str) -> bool:
    """Whether a profiler frame is the model's or the kernels' code (not this benchmark's or the CLI's)."""
    return "moe_empathy" in frame and not any(skip in frame for skip in ("bench_decode.py", "cli.py"))


def plot(path: Path, rows: list[dict]) -> None:
    """Per-token overhead against context length, one line per system, one panel per batch/mixture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .utils import atomic_path

    panels = sorted({(r["batch"], r["mixture"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (batch, mixture) in zip(axes[0], panels):
        for system in sorted({r["system"] for r in rows if r["system"] != "base"}):
            subset = sorted((r for r in rows if r["system"] == system and r["batch"] == batch and r["mixture"] == mixture), key=lambda r: r["context"])
            ax.plot([r["context"] for r in subset], [r["overhead_ms"] for r in subset], marker="o", label=system)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("cached tokens")
        ax.set_ylabel("ms per step above the base")
        ax.set_title(f"batch {batch}, {mixture}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as staging:
        fig.savefig(staging, dpi=120, format="png")
    plt.close(fig)


def run(args: argparse.Namespace) -> list[dict]:
    """Runs the benchmark; writes the CSV, the PNG and the profile to ``args.output_dir``."""
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    from .base import load_default_base
    from .utils import atomic_write_csv, atomic_write_text

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    console = Console()
    base, tokenizer = load_default_base()
    if args.narrow:
        base = narrow_base(base)
    systems = build_systems(base, tokenizer, args.expert_layers, args.rank)
    vocab = base.config.vocab_size
    with Progress(console=console) as progress:
        rows = measure(systems, args.batch_sizes, args.contexts, args.steps, args.repeats, vocab, progress)
    table = Table(title="decode step: median ms; overhead and ratio: medians over adjacent base/system step pairs "
                        "(95% bootstrap interval); base_copy repeats the base's work: its spread is the machine's noise")
    for column in ("system", "batch", "mixture", "context", "step ms", "overhead ms", "tokens/s vs base"):
        table.add_column(column)
    for r in rows:
        ratio = f"{r['tokens_per_s_vs_base']:.3f}x [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
        table.add_row(r["system"], str(r["batch"]), r["mixture"], str(r["context"]), f"{r['step_ms']:.2f}", f"{r['overhead_ms']:+.2f}", ratio)
    console.print(table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(out / "decode_bench.csv", rows)
    plot(out / "decode_bench.png", rows)
    if not args.skip_profile:
        smallest = {name: m for name, m in systems.items() if name in ("base", f"gated_{min(args.expert_layers)}_layers")}
        atomic_write_text(out / "decode_profile.md", profile_steps(smallest, args.batch_sizes, min(args.contexts), vocab))
    console.print(f"wrote {out / 'decode_bench.csv'}, {out / 'decode_bench.png'}" + ("" if args.skip_profile else f", {out / 'decode_profile.md'}"))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``bench decode``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="rows per decode step")
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048], help="cached tokens per row")
    parser.add_argument("--expert-layers", type=int, nargs="+", default=list(EXPERT_LAYER_COUNTS), help="top decoder layers with experts, one gated system each")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the experts")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per round")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--narrow", action="store_true",
                        help="the default base's depth at hidden size 64: GEMMs cost next to nothing, so the overhead is the package's own per-step cost")
    parser.add_argument("--skip-profile", action="store_true", help="no torch.profiler report")
    parser.add_argument("--output-dir", default="bench-decode", help="where the CSV, PNG and profile go")
    parser.set_defaults(func=run)
