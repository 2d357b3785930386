"""Training throughput on a cached prefix against the full forward, side by side.

``moe-empathy bench prefix --config train/configs/smollm2.yaml --out runs/bench-prefix``
(or ``python -m moe_empathy.train.bench_prefix ...``)

For each gate layer and dialogue length, the gated model of the config trains on the very
same batches of dialogues of about that many tokens in three ways, interleaved batch by batch
(so a machine shared with other work slows them alike):

* ``full``: today's path, the whole model's forward and the LM loss over all positions;
* ``cached, first epoch``: the prefix (the states entering ``gate_layer``) is computed for the
  batch and stored, then the layers from ``gate_layer`` up run on it;
* ``cached, later epochs``: the stored prefix is read, and only the layers from ``gate_layer`` up run.

Tokens/s counts non-padding tokens. Writes ``bench_prefix.csv``, ``bench_prefix.json`` (with
the effect of the storage dtype on one batch's loss and gradients) and ``bench_prefix.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from moe_empathy.losses import IGNORE_INDEX, lm_loss_sum, next_token_targets
from moe_empathy.turns import find_turn_markers
from moe_empathy.utils import atomic_path, atomic_write_csv, atomic_write_text

from .baselines import gated_model, load_base_model, load_tokenizer
from .collate import DialogueCollator, encode_dialogue
from .config import load_config, training_arguments
from .config_sections import PREFIX_CACHE_DTYPES
from .prefix_cache import PrefixCache, forward_from_prefix
from .synth import SynthConfig, generate

PATHS = ("full", "cached, first epoch", "cached, later epochs")


def dialogues_of_length(tokenizer, names: list[str], length: int, count: int, seed: int) -> list[dict]:
    """``count`` encoded template dialogues of 80-100% of ``length`` tokens (whole turns).

    Args:
        tokenizer: the run's tokenizer.
        names: expert names (the levels of the gate labels).
        length: the token budget of a dialogue.
        count: dialogues wanted.
        seed: seed of the generator.
    """
    markers = find_turn_markers(tokenizer)
    turns = max(2, length // 40)  # template exchanges are 50-120 tokens: enough turns to fill the budget
    corpus = generate(SynthConfig(dialogues=4 * count, min_turns=turns, max_turns=turns + 4, seed=seed))
    rows = [encode_dialogue(r, tokenizer, markers, names, length) for split in corpus.values() for r in split]
    rows = [r for r in rows if r is not None and r["length"] >= 0.8 * length]
    if len(rows) < count:
        raise ValueError(f"only {len(rows)} dialogues of {0.8 * length:.0f}-{length} tokens were generated, {count} needed")
    return rows[:count]


def _objective(model, batch: dict, cache: PrefixCache | None) -> torch.Tensor:
    """The trainer's objective on one batch (LM loss per assistant token plus the gate's losses),
    by the full forward (``cache`` None: logits at every position) or on the cached prefix."""
    inputs = {k: batch[k] for k in ("attention_mask", "turn_ids", "gate_mask", "gate_labels")}
    if cache is None:
        return model(input_ids=batch["input_ids"], labels=batch["labels"], **inputs).loss
    targets = next_token_targets(batch["labels"])  # [batch, seq]
    keep = targets != IGNORE_INDEX  # [batch, seq]
    prefix = cache.batch(model, batch["dialogue_index"], batch["input_ids"], batch["attention_mask"])
    outputs = forward_from_prefix(model, prefix, *inputs.values(), keep=keep)
    total, count = lm_loss_sum(outputs.logits, targets[keep])  # logits [n, vocab]
    return total / count.clamp(min=1) + outputs.aux_loss


def _step(model, optimizer, batch: dict, cache: PrefixCache | None) -> float:
    """One optimizer step of :func:`_objective`; returns its seconds."""
    start = time.perf_counter()
    _objective(model, batch, cache).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _loss_and_grads(model, batch: dict, cache: PrefixCache | None) -> tuple[float, torch.Tensor]:
    """One batch's loss and the flattened gradient of the trainable parameters (no step)."""
    model.zero_grad(set_to_none=True)
    loss = _objective(model, batch, cache)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])  # [trainable]
    model.zero_grad(set_to_none=True)
    return float(loss.detach()), grads


def storage_dtype_effect(model, rows: list[dict], batch: dict, folder: Path) -> dict[str, dict[str, float]]:
    """How storing the prefix in each dtype changes one batch's loss and gradients against the full forward.

    Args:
        model: a gated model whose experts are not zero (so every gradient is).
        rows: the dialogues the batch indexes.
        batch: a collated batch with ``dialogue_index``.
        folder: a scratch folder for the caches.
    """
    full_loss, full_grads = _loss_and_grads(model, batch, None)
    effect = {}
    for name in PREFIX_CACHE_DTYPES:
        loss, grads = _loss_and_grads(model, batch, PrefixCache(model, rows, name, folder / name))
        effect[name] = {
            "loss": loss,
            "loss_difference": abs(loss - full_loss),
            "gradient_relative_error": float((grads - full_grads).norm() / full_grads.norm()),
        }
    return {"full_loss": full_loss, **effect}


def run_bench(
    config_path: str, gate_layers: list[int], lengths: list[int], goal_layer: int, steps: int, warmup: int, out: str
) -> dict:
    """Times ``steps`` training steps of each path after ``warmup`` untimed ones, for every
    gate layer at the first length and for ``goal_layer`` at every length.

    Args:
        config_path: a training config (its base, batch size and expert settings are used).
        gate_layers: the gate layers to measure (at the shortest length).
        lengths: dialogue lengths in tokens (measured at ``goal_layer``).
        goal_layer: the gate layer measured at every length.
        steps: timed batches per case.
        warmup: untimed batches per case first.
        out: output folder.

    Returns:
        ``{"rows": [...], "storage_dtype": {...}, ...}`` as written to ``bench_prefix.json``.
    """
    config = load_config(config_path, check_paths=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-prefix-") as folder:  # the tiny base and the prefix caches
        scratch = Path(folder)
        args = training_arguments(config, str(scratch), 1)
        tokenizer = load_tokenizer(config)
        batch_size = config.training.per_device_train_batch_size
        cases = [(layer, lengths[0]) for layer in gate_layers if layer != goal_layer]
        cases += [(goal_layer, length) for length in lengths]
        per_case = warmup + steps
        data = {
            length: dialogues_of_length(tokenizer, list(config.model.expert_names), length, batch_size * per_case, seed=length)
            for length in lengths
        }
        collate = DialogueCollator(tokenizer.pad_token_id)
        console = Console()
        results, dtype_effect = [], None
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
            console=console,
        )
        with progress:
            task = progress.add_task("bench prefix", total=len(cases) * per_case)
            for layer, length in cases:
                progress.update(task, description=f"gate layer {layer}, {length} tokens")
                model_config = dataclasses.replace(config, model=dataclasses.replace(config.model, gate_layer=layer))
                model = gated_model(model_config, load_base_model(model_config, tokenizer, scratch, args), tokenizer).to(device).train()
                optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                rows = data[length]
                cache = PrefixCache(model, rows, "float32", scratch / f"cache-{layer}-{length}")
                seconds, tokens = dict.fromkeys(PATHS, 0.0), 0
                for index in range(per_case):
                    chosen = list(range(index * batch_size, (index + 1) * batch_size))
                    batch = collate([{**rows[i], "dialogue_index": i} for i in chosen])
                    batch = {k: v.to(device) for k, v in batch.items()}
                    timed = {
                        "full": _step(model, optimizer, batch, None),
                        "cached, first epoch": _step(model, optimizer, batch, cache),  # computes and stores the prefix
                        "cached, later epochs": _step(model, optimizer, batch, cache),  # reads it
                    }
                    if index >= warmup:
                        tokens += int(batch["attention_mask"].sum())
                        for path, value in timed.items():
                            seconds[path] += value
                    progress.advance(task)
                rate = {path: tokens / seconds[path] for path in PATHS}
                results.append({
                    "gate_layer": layer,
                    "layers": model.config.text_config.num_hidden_layers,
                    "length": length,
                    "tokens_per_step": tokens / steps,
                    **{f"tokens_per_second[{path}]": round(value, 1) for path, value in rate.items()},
                    "speedup_later_epochs": round(rate["cached, later epochs"] / rate["full"], 3),
                    "speedup_first_epoch": round(rate["cached, first epoch"] / rate["full"], 3),
                })
                if dtype_effect is None and layer == goal_layer:
                    dtype_effect = storage_dtype_effect(model, rows, batch, scratch / "dtype")
                del model, optimizer, cache
    summary = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "config": config_path,
        "batch_size": batch_size,
        "steps": steps,
        "warmup": warmup,
        "rows": results,
        "storage_dtype": {"gate_layer": goal_layer, "length": lengths[0], **(dtype_effect or {})},
    }
    _write(Path(out), summary)
    _print(console, summary)
    return summary


def _write(out: Path, summary: dict) -> None:
    """``bench_prefix.csv``, ``bench_prefix.json`` and ``bench_prefix.png`` in ``out`` (each atomically)."""
    rows = summary["rows"]
    atomic_write_csv(out / "bench_prefix.csv", rows)
    atomic_write_text(out / "bench_prefix.json", json.dumps(summary, indent=1) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    goal = summary["storage_dtype"]["gate_layer"]
    by_length = [r for r in rows if r["gate_layer"] == goal]
    first = min(r["length"] for r in rows)
    by_layer = sorted((r for r in rows if r["length"] == first), key=lambda r: r["gate_layer"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for path, marker in zip(PATHS, "osD"):
        left.plot([r["length"] for r in by_length], [r[f"tokens_per_second[{path}]"] for r in by_length], marker=marker, label=path)
    left.set_xscale("log", base=2)
    left.set_xticks([r["length"] for r in by_length], [str(r["length"]) for r in by_length])
    left.set_xlabel("dialogue length (tokens)")
    left.set_ylabel("training tokens/s")
    left.set_title(f"gate layer {goal} of {by_length[0]['layers']}")
    left.legend(fontsize=8)
    width = 0.38
    positions = range(len(by_layer))
    right.bar([p - width / 2 for p in positions], [r["speedup_later_epochs"] for r in by_layer], width, label="later epochs")
    right.bar([p + width / 2 for p in positions], [r["speedup_first_epoch"] for r in by_layer], width, label="first epoch")
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set_xticks(list(positions), [str(r["gate_layer"]) for r in by_layer])
    right.set_xlabel("gate layer")
    right.set_ylabel("speed-up over the full forward")
    right.set_title(f"{first}-token dialogues")
    right.legend(fontsize=8)
    with atomic_path(out / "bench_prefix.png") as staging:
        fig.savefig(staging, dpi=120, format="png")
    plt.close(fig)


def _print(console: Console, summary: dict) -> None:
    table = Table(title=f"training on a cached prefix, {summary['device']}, {summary['batch_size']} dialogues a batch")
    for column in ("gate layer", "tokens", "full tok/s", "first epoch tok/s", "later epochs tok/s", "later / full", "first / full"):
        table.add_column(column, justify="right")
    for r in summary["rows"]:
        table.add_row(
            f"{r['gate_layer']} of {r['layers']}", str(r["length"]),
            *(f"{r[f'tokens_per_second[{path}]']:.0f}" for path in PATHS),
            f"{r['speedup_later_epochs']:.2f}x", f"{r['speedup_first_epoch']:.2f}x",
        )
    console.print(table)
    effect = summary["storage_dtype"]
    for name in PREFIX_CACHE_DTYPES:
        if name in effect:
            e = effect[name]
            console.print(
                f"storage {name}: loss differs from the full forward's by {e['loss_difference']:.2e}, "
                f"gradient relative error {e['gradient_relative_error']:.2e}"
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``bench prefix``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--config", default="train/configs/smollm2.yaml", help="training config to take the model from")
    parser.add_argument("--gate-layers", default="10,20,25", help="gate layers measured at the shortest length")
    parser.add_argument("--goal-layer", type=int, default=20, help="the gate layer measured at every length")
    parser.add_argument("--lengths", default="256,512,1024", help="dialogue lengths in tokens")
    parser.add_argument("--steps", type=int, default=2, help="timed batches per case")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches per case first")
    parser.add_argument("--out", default="runs/bench-prefix", help="folder for the CSV, JSON and PNG")
    parser.set_defaults(func=run_bench_command)


def run_bench_command(args: argparse.Namespace) -> dict:
    """Runs ``moe-empathy bench prefix`` from its parsed arguments."""
    numbers = {}
    for flag in ("gate_layers", "lengths"):
        try:
            numbers[flag] = [int(x) for x in getattr(args, flag).split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--{flag.replace('_', '-')} takes comma-separated integers, got {getattr(args, flag)!r}") from None
        if not numbers[flag] or min(numbers[flag]) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} needs positive integers, got {getattr(args, flag)!r}")
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return run_bench(args.config, numbers["gate_layers"], sorted(numbers["lengths"]), args.goal_layer, args.steps, args.warmup, args.out)


def main(argv: list[str] | None = None) -> None:
    """``python -m moe_empathy.train.bench_prefix``: the same as ``moe-empathy bench prefix``."""
    parser = argparse.ArgumentParser(prog="moe_empathy.train.bench_prefix", description=__doc__.split("\n")[0])
    add_arguments(parser)
    run_bench_command(parser.parse_args(argv))


if __name__ == "__main__":
    main()
