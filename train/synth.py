"""The ``moe-empathy synth`` command: synthetic multi-turn empathy dialogues.

The generator is four modules, one job each: :mod:`.synth_plan` plans the
dialogues (task, scenario, persona, the user's state and so the target level of
each reply), :mod:`.synth_template` realises plans from the phrase data
(:mod:`.phrases`), :mod:`.synth_llm` realises the same plans with a chat model,
and :mod:`.synth_corpus` writes a corpus (DatasetDict + JSONL + card). This module
wires them into the command.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from moe_empathy.utils import check_output_dir

from .synth_corpus import OUTPUT_KIND, write_corpus
from .synth_plan import MAX_TURNS, SynthConfig
from .synth_template import generate
from .taxonomy import TASKS

# the command, and the names that callers (training, evaluation, benchmarks) use to make a corpus
__all__ = ["MAX_TURNS", "SynthConfig", "add_arguments", "generate", "run_synth", "write_corpus"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``synth``'s arguments and sets the function that runs it (``args.func``).

    Args:
        parser: the command's parser, made by :mod:`moe_empathy.cli`.
    """
    parser.add_argument("--out", required=True, help="output folder (DatasetDict + jsonl/ + README.md)")
    parser.add_argument("--dialogues", type=int, default=1000, help="number of dialogues (all splits)")
    parser.add_argument("--min-turns", type=int, default=2, help="fewest exchanges per dialogue")
    parser.add_argument("--max-turns", type=int, default=12, help=f"most exchanges per dialogue (<= {MAX_TURNS})")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--backend", choices=("template", "llm"), default="template")
    parser.add_argument("--model", default=None,
                   help="llm backend: folder of a local Hugging Face chat model (default: embedded SmolLM2)")
    parser.add_argument("--batch-size", type=int, default=8, help="llm backend: dialogues generated together")
    parser.add_argument("--max-new-tokens", type=int, default=96, help="llm backend: tokens per message")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier corpus written by this command in --out")
    parser.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> dict:
    """Run the ``synth`` subcommand.

    Args:
        args: the parsed arguments of :func:`add_arguments`.
    """
    config = SynthConfig(
        dialogues=args.dialogues, min_turns=args.min_turns, max_turns=args.max_turns,
        seed=args.seed, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
    )
    check_output_dir(args.out, args.overwrite, OUTPUT_KIND)
    start = time.perf_counter()
    if args.backend == "template":
        by_split = generate(config)
        settings = {"backend": "template"}
    else:
        from .synth_llm import LLMSynthConfig, generate_llm

        llm = LLMSynthConfig(model=args.model, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens)
        by_split = generate_llm(config, llm, progress_file=Path(f"{args.out}.partial.jsonl"))
        settings = {"backend": "llm", "model": args.model or "embedded SmolLM2-135M-Instruct"}
    settings.update(seed=config.seed, dialogues=config.dialogues,
                    turns=f"{config.min_turns}-{config.max_turns}", tasks=", ".join(config.tasks))
    stats = write_corpus(by_split, args.out, settings, overwrite=args.overwrite)
    if args.backend == "llm":
        Path(f"{args.out}.partial.jsonl").unlink(missing_ok=True)
    print(f"wrote {sum(stats['dialogues'].values())} dialogues to {args.out} "
          f"in {time.perf_counter() - start:.1f} s; distinct sentence ratio "
          f"{stats['distinct_sentence_ratio']:.3f}; 4-gram overlap with train {stats['ngram4_overlap']}")
    return stats
