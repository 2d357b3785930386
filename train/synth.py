"""The ``moe-empathy synth`` command: synthetic multi-turn empathy dialogues.

The generator is five modules, one job each: :mod:`.synth_plan` plans the
dialogues (task, scenario, persona, the user's state and so the target level of
each reply), :mod:`.synth_template` realises plans from the phrase data
(:mod:`.phrases`), :mod:`.synth_llm` realises the same plans with a chat model,
:mod:`.synth_grounded` composes the template's empathy around the base model's own
helpful content, and :mod:`.synth_corpus` writes a corpus (DatasetDict + JSONL + card).
This module wires them into the command.
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
__all__ = ["BACKENDS", "MAX_TURNS", "SynthConfig", "add_arguments", "generate", "run_synth", "synthesize", "write_corpus"]

BACKENDS = ("template", "llm", "grounded")


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
    parser.add_argument("--off-level-rate", type=float, default=0.0,
                        help="chance that a reply is written (and labelled) at another level than the user's state "
                             "calls for: a corpus for experts that must hold any forced level, never for a gate")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--backend", choices=BACKENDS, default="template",
                        help="template: phrase data; llm: a chat model writes both sides; grounded: phrase data "
                             "around the base model's own helpful content")
    parser.add_argument("--model", default=None,
                   help="llm and grounded backends: folder of a local Hugging Face chat model (default: embedded SmolLM2)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="llm and grounded backends: dialogues generated together (default: 8 llm, 16 grounded)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="llm and grounded backends: tokens per message (default: 96 llm, 64 grounded)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier corpus written by this command in --out")
    parser.set_defaults(func=run_synth)


def synthesize(config: SynthConfig, backend: str, out: str | Path, model: str | None = None,
               batch_size: int | None = None, max_new_tokens: int | None = None, overwrite: bool = False) -> dict:
    """Realises the plans of ``config`` with a backend and writes the corpus to ``out``. The model
    backends keep finished dialogues in ``OUT.partial.jsonl`` (a rerun resumes from it), removed
    once the corpus is written.

    Args:
        config: what to generate.
        backend: one of :data:`BACKENDS`.
        out: the corpus folder.
        model: llm and grounded backends: folder of a chat model, None for the embedded SmolLM2.
        batch_size: llm and grounded backends: dialogues generated together (None: the backend's default).
        max_new_tokens: llm and grounded backends: tokens per message (None: the backend's default).
        overwrite: replace an earlier corpus in ``out`` (see :func:`write_corpus`).

    Returns:
        the corpus statistics (see :func:`write_corpus`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown synth backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "template":
        by_split, settings = generate(config), {"backend": "template"}
    else:
        from .synth_grounded import generate_grounded
        from .synth_llm import LLMSynthConfig, generate_llm

        progress = Path(f"{out}.partial.jsonl")
        if backend == "llm":
            llm = LLMSynthConfig(model=model, batch_size=batch_size or 8, max_new_tokens=max_new_tokens or 96)
            by_split, settings = generate_llm(config, llm, progress), {"backend": "llm"}
        else:  # greedy: the base's most likely answer
            llm = LLMSynthConfig(model=model, batch_size=batch_size or 16, max_new_tokens=max_new_tokens or 64,
                                 temperature=0.0, no_repeat_ngram_size=4, context_messages=6)
            by_split, settings = generate_grounded(config, llm, progress)
        settings["model"] = model or "embedded SmolLM2-135M-Instruct"
    settings.update(seed=config.seed, dialogues=config.dialogues,
                    turns=f"{config.min_turns}-{config.max_turns}", tasks=", ".join(config.tasks),
                    off_level_rate=config.off_level_rate)
    stats = write_corpus(by_split, out, settings, overwrite=overwrite)
    Path(f"{out}.partial.jsonl").unlink(missing_ok=True)
    return stats


def run_synth(args: argparse.Namespace) -> dict:
    """Run the ``synth`` subcommand.

    Args:
        args: the parsed arguments of :func:`add_arguments`.
    """
    config = SynthConfig(
        dialogues=args.dialogues, min_turns=args.min_turns, max_turns=args.max_turns,
        seed=args.seed, tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
        off_level_rate=args.off_level_rate,
    )
    check_output_dir(args.out, args.overwrite, OUTPUT_KIND)
    start = time.perf_counter()
    stats = synthesize(config, args.backend, args.out, args.model, args.batch_size, args.max_new_tokens, args.overwrite)
    print(f"wrote {sum(stats['dialogues'].values())} dialogues to {args.out} "
          f"in {time.perf_counter() - start:.1f} s; distinct sentence ratio "
          f"{stats['distinct_sentence_ratio']:.3f}; 4-gram overlap with train {stats['ngram4_overlap']}")
    return stats
