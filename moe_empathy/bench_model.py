"""Model benchmark: generation and training speed of the gated model against peft.

Systems, all on the same base and measured side by side in one run (interleaved
repeats, median): the plain base; one peft LoRA; peft's X-LoRA over three such LoRAs;
our gated model with three experts on the same modules of every layer
(``gate_layer=0``) and with the default ``gate_layer``. Generation is greedy with a
fixed number of new tokens from chat prompts (prefill included, as a user sees it); a
training step is forward + backward. Beside tokens/s it reports each generating system's
milliseconds per new token above the base's. How that overhead grows with the number of
expert layers and with the cached context is ``moe-empathy bench decode``'s subject.

Run: ``moe-empathy bench model``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from .utils import atomic_path, atomic_write_csv

PROMPTS = [
    "My laptop froze during an update and now it shows a black screen. What should I try first?",
    "Can you suggest a light comedy for tonight? I liked The Grand Budapest Hotel a lot.",
    "I have a job interview for a data analyst role on Monday and I feel unprepared.",
    "My grandmother passed away last week and I cannot focus on anything at work.",
    "We want to spend four days in Lisbon in spring. How should we split the days?",
    "I keep arguing with my partner about chores and it is wearing me down.",
    "My doctor wants more blood tests and I do not know what the numbers mean.",
    "I have felt empty for weeks and I do not really know who to talk to.",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _randomise_lora(model: torch.nn.Module, seed: int) -> None:
    """Non-zero B matrices, so no system can skip its adapter work."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)


def build_systems(base, tokenizer, rank: int, workdir: Path) -> dict[str, torch.nn.Module]:
    """The systems to compare, each on its own copy of ``base``.

    Args:
        base: the base causal LM (not modified).
        tokenizer: its tokenizer.
        rank: LoRA rank of every adapter and expert.
        workdir: where the three peft adapters for X-LoRA are written.
    """
    from peft import LoraConfig, XLoraConfig, get_peft_model

    from .modeling_moe_empathy import MoeEmpathyForCausalLM

    systems = {"base": copy.deepcopy(base)}  # a copy like every other system: copies and the loaded original differ by ~2% in speed
    lora_config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, task_type="CAUSAL_LM")
    peft_lora = get_peft_model(copy.deepcopy(base), lora_config)
    _randomise_lora(peft_lora, 0)
    systems["peft_lora"] = peft_lora
    for gate_layer, name in ((0, "moe_empathy_all_layers"), (None, "moe_empathy_default")):
        ours = MoeEmpathyForCausalLM.from_base(copy.deepcopy(base), tokenizer=tokenizer, lora_rank=rank, lora_alpha=2 * rank, gate_layer=gate_layer)
        _randomise_lora(ours, 1)
        systems[name] = ours
    adapters = {}
    for index in range(3):  # X-LoRA only accepts adapters named "0", "1", "2"
        adapter = get_peft_model(copy.deepcopy(base), lora_config)
        _randomise_lora(adapter, 10 + index)
        adapter.save_pretrained(workdir / str(index))
        adapters[str(index)] = str(workdir / str(index))
    xlora_base = copy.deepcopy(base)
    xlora_base.config.use_cache = False  # X-LoRA refuses the KV cache
    xlora_config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, adapters=adapters, xlora_depth=1)
    systems["peft_xlora"] = get_peft_model(xlora_base, xlora_config)
    for model in systems.values():
        model.eval()
    return systems


def time_generation(model, inputs: dict, new_tokens: int, use_cache: bool) -> float:
    """Seconds to greedily generate exactly ``new_tokens`` for the batch."""
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache, pad_token_id=2
        )
    elapsed = time.perf_counter() - start
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    return elapsed


def time_training_step(model, batch: dict) -> float:
    """Seconds for one forward + backward on ``batch``."""
    model.train()
    model.zero_grad(set_to_none=True)
    start = time.perf_counter()
    loss = model(**batch).loss
    loss.backward()
    elapsed = time.perf_counter() - start
    model.eval()
    return elapsed


def chat_batch(tokenizer, batch_size: int) -> dict:
    """Left-padded chat prompts (about 60 tokens each with the template's system prompt)."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], tokenize=False, add_generation_prompt=True)
        for i in range(batch_size)
    ]
    tokenizer.padding_side = "left"
    return dict(tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False))


def training_batch(batch_size: int, seq_len: int, vocab: int, with_turns: bool) -> dict:
    """Random tokens; for the gated model, four turns a row with replies hidden from the gate."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=generator)
    batch = {"input_ids": ids, "labels": ids.clone()}
    if with_turns:
        turn = torch.arange(seq_len) * 4 // seq_len  # [seq]
        batch["turn_ids"] = turn.expand(batch_size, -1).clone()
        batch["gate_mask"] = ((torch.arange(seq_len) * 8 // seq_len) % 2 == 0).long().expand(batch_size, -1).clone()
    return batch


def run(args: argparse.Namespace) -> list[dict]:
    """Runs the benchmark and writes ``model_bench.csv`` and ``model_bench.png`` to ``args.output_dir``."""
    from .base import load_default_base

    console = Console()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    base, tokenizer = load_default_base()
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as workdir:
        systems = build_systems(base, tokenizer, args.rank, Path(workdir))
        samples: dict[tuple, list[float]] = {}
        jobs = []
        for batch_size in args.batch_sizes:
            inputs = chat_batch(tokenizer, batch_size)
            for name, model in systems.items():
                use_cache = name != "peft_xlora"
                jobs.append((("generate", name, batch_size), lambda m=model, i=inputs, c=use_cache: time_generation(m, i, args.new_tokens, c)))
        if not args.skip_training:
            for name, model in systems.items():
                if name == "base":
                    continue
                batch = training_batch(args.train_batch, args.train_seq, base.config.vocab_size, name.startswith("moe"))
                jobs.append((("train_step", name, args.train_batch), lambda m=model, b=batch: time_training_step(m, b)))
        # X-LoRA runs two full forwards per token without a cache: it gets fewer rounds and no warm-up.
        rounds = [[(key, job) for key, job in jobs if key[1] != "peft_xlora" or 1 <= r <= args.xlora_repeats] for r in range(args.repeats + 1)]
        with Progress(console=console) as progress:
            task = progress.add_task("benchmark", total=sum(len(r) for r in rounds))
            for repeat, round_jobs in enumerate(rounds):  # round 0 warms up and is discarded
                for key, job in round_jobs:
                    seconds = job()
                    if repeat:
                        samples.setdefault(key, []).append(seconds)
                    progress.advance(task)
    rows = summarise(samples, args.new_tokens, args.train_batch * args.train_seq)
    show(console, rows)
    atomic_write_csv(out_dir / "model_bench.csv", rows)
    plot(out_dir / "model_bench.png", rows)
    console.print(f"wrote {out_dir / 'model_bench.csv'} and {out_dir / 'model_bench.png'}")
    return rows


def summarise(samples: dict[tuple, list[float]], new_tokens: int, train_tokens: int) -> list[dict]:
    """Median seconds, tokens/s and the ratio to the reference system of each measurement."""
    rows = []
    for (kind, name, batch), times in samples.items():
        median = statistics.median(times)
        tokens = batch * new_tokens if kind == "generate" else train_tokens
        rows.append({"kind": kind, "system": name, "batch": batch, "median_s": median, "tokens_per_s": tokens / median, "runs": len(times)})
    for row in rows:
        reference = "base" if row["kind"] == "generate" else "peft_lora"
        ref = next(r for r in rows if r["kind"] == row["kind"] and r["batch"] == row["batch"] and r["system"] == reference)
        row["vs_reference"] = row["tokens_per_s"] / ref["tokens_per_s"] if row["kind"] == "generate" else row["median_s"] / ref["median_s"]
        row["reference"] = reference
        # Per new token of a row-batch step, above the base's (generation only).
        row["overhead_ms_per_token"] = (row["median_s"] - ref["median_s"]) * 1e3 / new_tokens if row["kind"] == "generate" else None
    return rows


def show(console: Console, rows: list[dict]) -> None:
    table = Table(title="moe_empathy model benchmark (median of interleaved runs)")
    for column in ("kind", "system", "batch", "median s", "tokens/s", "ratio", "ratio is", "ms/token above base"):
        table.add_column(column)
    for row in rows:
        meaning = "tokens/s vs base" if row["kind"] == "generate" else "step time vs peft_lora"
        overhead = "" if row["overhead_ms_per_token"] is None else f"{row['overhead_ms_per_token']:+.2f}"
        table.add_row(
            row["kind"], row["system"], str(row["batch"]), f"{row['median_s']:.3f}", f"{row['tokens_per_s']:.1f}",
            f"{row['vs_reference']:.2f}x", meaning, overhead,
        )
    console.print(table)


def plot(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({row["kind"] for row in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        subset = [r for r in rows if r["kind"] == kind]
        labels = [f"{r['system']}\nbatch {r['batch']}" for r in subset]
        ax.barh(labels, [r["vs_reference"] for r in subset], color="tab:blue")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xlabel("tokens/s relative to base" if kind == "generate" else "step time relative to peft LoRA")
        ax.set_title(kind)
        ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    with atomic_path(path) as staging:
        fig.savefig(staging, dpi=120, format="png")
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``bench model``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="generation batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy new tokens per generation")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter and expert")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after one warm-up round")
    parser.add_argument("--xlora-repeats", type=int, default=1, help="timed rounds of X-LoRA (it is slow)")
    parser.add_argument("--train-batch", type=int, default=4, help="training-step batch size")
    parser.add_argument("--train-seq", type=int, default=256, help="training-step sequence length")
    parser.add_argument("--skip-training", action="store_true", help="time generation only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--output-dir", default="bench-model", help="where the CSV and PNG go")
    parser.set_defaults(func=run)
