"""Training throughput of the gated model against a single LoRA and peft's X-LoRA, side by side.

``moe-empathy bench train --config train/configs/smollm2.yaml --steps 3``
(or ``python -m moe_empathy.train.bench_train ...``)

All three train on the very same batches of the config's corpus (fp32 on CPU, bf16 autocast on
GPU): the gated model (3 experts, per-turn gate, one forward), one peft LoRA on the same modules
and layers, and peft X-LoRA over three LoRA experts of that placement (trainable, as ours are;
X-LoRA runs a scaling pass and a real pass). The steps of the three models are interleaved, so
a machine shared with other work slows them alike. Also prints the padding fraction of one
epoch of length buckets against plain padding to the longest.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from moe_empathy.utils import atomic_write_text

from .baselines import encode_splits, ensure_corpus, gated_model, load_base_model, load_tokenizer, lora_model
from .collate import DialogueCollator, LengthBucketSampler, padding_report
from .config import load_config, training_arguments


def xlora_model(config, base, folder: Path, hidden_size: int):
    """peft X-LoRA over three LoRA experts of the gated model's placement (named "0", "1", "2")."""
    from peft import XLoraConfig, get_peft_model

    adapters = {}
    for index in range(len(config.model.expert_names)):
        expert = lora_model(config, type(base)(base.config))
        torch.manual_seed(1000 + index)  # distinct, non-zero experts
        with torch.no_grad():
            for name, param in expert.named_parameters():
                if "lora_" in name:
                    param.normal_(std=0.02)
        expert.save_pretrained(folder / str(index), save_embedding_layers=False)
        adapters[str(index)] = str(folder / str(index))
    base.config.use_cache = False
    return get_peft_model(base, XLoraConfig(task_type="CAUSAL_LM", hidden_size=hidden_size, adapters=adapters, use_trainable_adapters=True))


def _step(model, optimizer, batch: dict, with_gate: bool) -> None:
    """One optimizer step on the loss the model computes from the batch's labels (the gated
    model adds its gate's losses)."""
    inputs = {k: v for k, v in batch.items() if with_gate or k in ("input_ids", "attention_mask", "labels")}
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
        outputs = model(**inputs)
    outputs.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def run_bench(config_path: str, steps: int, warmup: int, output: str | None) -> dict:
    """Times ``steps`` training steps of each model after ``warmup`` untimed ones.

    Args:
        config_path: a training config (its base, data, batch size and LoRA settings are used).
        steps: timed steps per model.
        warmup: untimed steps per model first.
        output: a JSON file for the results, or None.

    Returns:
        ``{"tokens_per_second": {model: value}, "padding_fraction": {...}, ...}``.
    """
    config = load_config(config_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:  # the tiny base and the X-LoRA adapters
        folder = Path(scratch)
        args = training_arguments(config, str(folder), 1)
        tokenizer = load_tokenizer(config)
        rows = encode_splits(config, tokenizer, ensure_corpus(config.data, args, config.model.base))["train"]
        batch_size = config.training.per_device_train_batch_size
        sampler = LengthBucketSampler([r["length"] for r in rows], batch_size, config.data.bucket_size, config.training.seed)
        collate = DialogueCollator(tokenizer.pad_token_id)
        batches = [collate([rows[i] for i in b]) for b in sampler.batches()[: warmup + steps]]
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]

        def build(name: str):
            base = load_base_model(config, tokenizer, folder, args)
            if name == "gated (3 experts)":
                return gated_model(config, base, tokenizer)
            if name == "single LoRA":
                return lora_model(config, base)
            return xlora_model(config, base, folder / "xlora", base.config.hidden_size)

        names = ["gated (3 experts)", "single LoRA", "peft X-LoRA (3 experts)"]
        models = {name: build(name).to(device).train() for name in names}
        optimizers = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for n, m in models.items()}
        seconds = dict.fromkeys(names, 0.0)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches[warmup:])
        for index, batch in enumerate(batches):
            for name in names:
                start = time.perf_counter()
                _step(models[name], optimizers[name], batch, with_gate=name.startswith("gated"))
                if device == "cuda":
                    torch.cuda.synchronize()
                if index >= warmup:
                    seconds[name] += time.perf_counter() - start
    lengths = [r["length"] for r in rows]
    result = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu, {torch.get_num_threads()} threads",
        "batch": f"{batch_size} dialogues, {tokens / steps:.0f} tokens a step on average",
        "steps": steps,
        "tokens_per_second": {name: tokens / seconds[name] for name in names},
        "trainable_parameters": {n: sum(p.numel() for p in m.parameters() if p.requires_grad) for n, m in models.items()},
        "padding_fraction": padding_report(lengths, batch_size, 1, config.data.bucket_size, config.training.seed),
    }
    table = Table(title=f"training throughput, {result['device']}, {result['batch']}")
    table.add_column("model")
    table.add_column("tokens/s", justify="right")
    table.add_column("vs single LoRA", justify="right")
    table.add_column("trainable params", justify="right")
    single = result["tokens_per_second"]["single LoRA"]
    for name in names:
        rate = result["tokens_per_second"][name]
        table.add_row(name, f"{rate:.0f}", f"{rate / single:.2f}x", f"{result['trainable_parameters'][name]:,}")
    console = Console()
    console.print(table)
    padding = result["padding_fraction"]
    console.print(f"padding fraction over one epoch: length buckets {padding['bucket']:.3f}, pad to longest {padding['pad']:.3f}")
    if output:
        atomic_write_text(output, json.dumps(result, indent=1) + "\n")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``bench train``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--config", default="train/configs/smollm2.yaml", help="training config to take the model and data from")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> dict:
    """Runs ``moe-empathy bench train`` from its parsed arguments."""
    if args.steps < 1 or args.warmup < 0:
        raise ValueError(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
    return run_bench(args.config, args.steps, args.warmup, args.output)


def main(argv: list[str] | None = None) -> None:
    """``python -m moe_empathy.train.bench_train``: the same as ``moe-empathy bench train``."""
    parser = argparse.ArgumentParser(prog="moe_empathy.train.bench_train", description=__doc__.split("\n")[0])
    add_arguments(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
