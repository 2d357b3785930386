"""``moe-empathy chat``: a terminal chat that shows the gate's weights for each reply."""

from __future__ import annotations

import argparse

from .model import add_model_argument, console, load


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``chat``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    add_model_argument(parser)
    parser.add_argument("--max-new-tokens", type=int, default=128, help="reply length cap")
    parser.add_argument("--system", default=None, help="optional system prompt")
    parser.set_defaults(func=run)


def reply(model, tokenizer, messages: list[dict], max_new_tokens: int) -> tuple[str, list[float]]:
    """Greedy reply to ``messages`` and the gate weights of the turn it answers.

    Args:
        model: a gated model.
        tokenizer: its tokenizer.
        messages: the chat so far, ending with the user's message.
        max_new_tokens: reply length cap.
    """
    from moe_empathy.turns import encode_chat

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


def gate_table(names: list[str], weights: list[float], title: str):
    """A rich table of one turn's gate weights, with bars."""
    from rich.table import Table

    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("expert")
    table.add_column("weight", justify="right")
    table.add_column("")
    for name, weight in zip(names, weights):
        table.add_row(name, f"{weight:.3f}", "█" * round(weight * 30))
    return table


def run(args: argparse.Namespace) -> None:
    """Runs ``moe-empathy chat``: reads messages until an empty line or Ctrl-D.

    Args:
        args: the parsed command line.
    """
    out = console()
    model, tokenizer, description = load(args)
    out.print(f"[bold]moe-empathy chat[/bold] with {description}; experts {model.expert_names}. Empty line or Ctrl-D ends.")
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    while True:
        try:
            text = out.input("[bold cyan]you>[/bold cyan] ").strip()
        except (EOFError, KeyboardInterrupt):
            out.print()
            break
        if not text:
            break
        try:
            answer, weights = reply(model, tokenizer, messages + [{"role": "user", "content": text}], args.max_new_tokens)
        except KeyboardInterrupt:
            out.print("\n[yellow]reply abandoned (Ctrl-C); your last message was dropped, the conversation "
                      "so far is kept. Type a message to go on, or an empty line to end.[/yellow]")
            continue
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        out.print(f"[bold green]assistant>[/bold green] {answer}")
        turn = len([m for m in messages if m["role"] == "user"]) - 1
        out.print(gate_table(model.expert_names, weights, f"gate, turn {turn}"))
