"""``moe-empathy demo``: the model on scripted dialogues whose context shifts, each reply with its
gate weights; writes a transcript and a PNG of the gate's weights over turns."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .chat import reply
from .model import add_model_argument, console, load

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``demo``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    add_model_argument(parser)
    parser.add_argument("--out", default="demo-out", help="folder for demo.json and gate_over_turns.png")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="reply length cap")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    """Runs ``moe-empathy demo``.

    Args:
        args: the parsed command line.
    """
    from moe_empathy.utils import atomic_path, atomic_write_text

    out = console()
    model, tokenizer, description = load(args)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    out.print(f"[bold]moe-empathy demo[/bold] with {description}")
    results = {}
    for name, user_turns in DEMO_DIALOGUES.items():
        out.rule(name)
        messages, turns = [], []
        for user in user_turns:
            messages.append({"role": "user", "content": user})
            answer, weights = reply(model, tokenizer, messages, args.max_new_tokens)
            messages.append({"role": "assistant", "content": answer})
            turns.append({"user": user, "assistant": answer, "gate": dict(zip(model.expert_names, weights))})
            out.print(f"[cyan]user:[/cyan] {user}")
            out.print(f"[green]assistant:[/green] {answer}")
            out.print("  gate: " + "  ".join(f"{n}={w:.2f}" for n, w in zip(model.expert_names, weights)))
        results[name] = turns
    transcript = {"model": description, "expert_names": model.expert_names, "dialogues": results}
    atomic_write_text(out_dir / "demo.json", json.dumps(transcript, indent=1))
    with atomic_path(out_dir / "gate_over_turns.png") as staging:
        plot_gate_over_turns(results, model.expert_names, staging)
    out.print(f"wrote {out_dir / 'demo.json'} and {out_dir / 'gate_over_turns.png'}")


def plot_gate_over_turns(results: dict, names: list[str], path: Path) -> None:
    """One heatmap per dialogue: experts (rows) by turns (columns).

    Args:
        results: dialogue name -> its turns, each with a ``gate`` mapping of expert -> weight.
        names: the expert names, in row order.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4.5 * len(results), 3.2), squeeze=False, layout="constrained")
    for ax, (dialogue, turns) in zip(axes[0], results.items()):
        grid = [[turn["gate"][n] for turn in turns] for n in names]  # [experts, turns]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(len(turns)), [str(k) for k in range(len(turns))])
        ax.set_xlabel("turn")
        ax.set_title(dialogue, fontsize=9)
    fig.colorbar(image, ax=axes[0].tolist(), label="gate weight")
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
