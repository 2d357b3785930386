"""The gated model and its baselines, built and trained by the same code.

``method`` in the config selects:

* ``gated``: fresh experts and gate in the base, trained jointly (:class:`MoeEmpathyForCausalLM`).
* ``single_lora``: one peft LoRA on all assistant turns; no experts, no gate.
* ``per_level``: one peft LoRA per empathy level, each trained only on the assistant turns of
  its level (the paper's experts, to be selected externally); written to ``OUTPUT/<level>/``.
* ``gated_from_experts``: a gated model whose experts are imported from a ``per_level`` run
  (``model.init_from_experts``), then trained jointly with a fresh gate.

Every LoRA sits in the same modules and layers as the gated model's experts (layers at or
above ``gate_layer``), so the methods differ only in routing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

from moe_empathy.base import DEFAULT_BASE_ID, default_base_path, load_base
from moe_empathy.modeling_moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.turns import find_turn_markers, padding_id

from .collate import balance_label_turns, encode_dialogue, restrict_to_expert
from .config import TrainConfig, training_arguments
from .config_sections import TINY_BASE, DataSection, model_config_kwargs
from .gate_warmup import context_replies, warm_up_gate
from .hf_trainer import EncodedDialogues
from .run import copy_model_files, run_training, write_summary
from .synth_corpus import off_level_turns
from .synth_plan import SPLITS


# --------------------------------------------------------------------- models


def tiny_llama(config: TrainConfig, vocab_size: int) -> LlamaForCausalLM:
    """The random Llama of ``model.base: tiny`` (tied embeddings like SmolLM2).

    Args:
        config: the run's config (``model.tiny`` gives the shape and seed).
        vocab_size: the tokenizer's vocabulary size.
    """
    torch.manual_seed(config.model.tiny.seed)
    return LlamaForCausalLM(config.model.tiny.llama_config(vocab_size))


def load_tokenizer(config: TrainConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer: ``model.tokenizer``, else the base's (the default base's for ``tiny``)."""
    source = config.model.tokenizer
    if source is None:
        base = config.model.base
        source = str(default_base_path()) if base in (TINY_BASE, DEFAULT_BASE_ID) else base
    tokenizer = AutoTokenizer.from_pretrained(source)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer from {source} has no chat template; set model.tokenizer to one that has")
    return tokenizer


def load_base_model(config: TrainConfig, tokenizer: PreTrainedTokenizerBase, output_dir: Path, args: TrainingArguments) -> PreTrainedModel:
    """The frozen base model, fp32. A ``tiny`` base is saved once under ``output_dir/base`` so
    that compact checkpoints can point to it.

    Args:
        config: the run's config.
        tokenizer: the run's tokenizer.
        output_dir: the run folder.
        args: the run's training arguments (for the main process).
    """
    if config.model.base != TINY_BASE:
        base, _ = load_base(config.model.base, dtype=torch.float32)
        return base
    base = tiny_llama(config, len(tokenizer))
    folder = (output_dir / "base").resolve()
    with args.main_process_first(desc="save the tiny base"):
        if args.should_save and not (folder / "config.json").is_file():
            base.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
    base.config.name_or_path = str(folder)
    return base


def gate_layer(config: TrainConfig, base: PreTrainedModel) -> int:
    """The lowest layer with experts (the config's, else a third of the depth)."""
    layer = config.model.gate_layer
    return layer if layer is not None else base.config.num_hidden_layers // 3


def gated_model(config: TrainConfig, base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> MoeEmpathyForCausalLM:
    """A gated model around ``base``: fresh experts, or the experts of a ``per_level`` run.

    Args:
        config: the run's config.
        base: the base model (wrapped in place).
        tokenizer: its tokenizer (for the turn markers).
    """
    kwargs = model_config_kwargs(config.model)
    kwargs["base_model_name_or_path"] = base.config.name_or_path
    torch.manual_seed(config.training.seed)
    if config.method == "gated_from_experts":
        folder = Path(config.model.init_from_experts)
        adapters = {name: folder / name for name in config.model.expert_names}
        # The expert names, target modules and lowest layer follow the adapters.
        for key in ("expert_names", "target_modules", "gate_layer"):
            kwargs.pop(key)
        return MoeEmpathyForCausalLM.from_peft_adapters(base, adapters, tokenizer=tokenizer, **kwargs)
    return MoeEmpathyForCausalLM.from_base(base, tokenizer=tokenizer, **kwargs)


def lora_model(config: TrainConfig, base: PreTrainedModel):
    """A peft LoRA on the gated model's expert placement (same modules, layers >= gate_layer).

    Args:
        config: the run's config.
        base: the base model.
    """
    m = config.model
    torch.manual_seed(config.training.seed)
    lora = LoraConfig(
        r=m.lora_rank,
        lora_alpha=m.lora_alpha,
        lora_dropout=m.lora_dropout,
        target_modules=list(m.target_modules),
        layers_to_transform=list(range(gate_layer(config, base), base.config.num_hidden_layers)),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora)


# --------------------------------------------------------------------- data


def ensure_corpus(data: DataSection, args: TrainingArguments, base: str) -> Path:
    """``data.path``, generated first (main process) when missing and ``data.synthesize`` is set.

    Args:
        data: the config's ``data`` section (or the gate warm-up's).
        args: the run's training arguments.
        base: the run's ``model.base``: the grounded backend's base model.
    """
    path = Path(data.path)
    with args.main_process_first(desc="synthesise the corpus"):
        if not path.exists():
            from .synth import SynthConfig, synthesize

            s = data.synthesize
            if args.should_save:
                model = None if base == DEFAULT_BASE_ID else base
                synthesize(SynthConfig(dialogues=s.dialogues, min_turns=s.min_turns, max_turns=s.max_turns, seed=s.seed,
                                       off_level_rate=s.off_level_rate),
                           s.backend, path, model)
    return path


def encode_splits(
    config: TrainConfig,
    tokenizer: PreTrainedTokenizerBase,
    path: Path,
    data: DataSection | None = None,
    transform: Callable[[list[dict], str], list[dict]] | None = None,
    gate_learns: bool = False,
) -> dict[str, list[dict]]:
    """Encodes the corpus's three splits; validation and test are sorted by length (less padding).

    Args:
        config: the run's config.
        tokenizer: the run's tokenizer.
        path: the corpus folder.
        data: the section with the limits (``max_length``, dialogue counts); default ``config.data``.
        transform: applied to each split's records (and the split's name) before encoding, or None.
        gate_learns: a gate is trained on the labels: refuse a corpus with off-level replies
            (their labels follow the reply, not the dialogue).
    """
    data = data or config.data
    from datasets import load_from_disk

    corpus = load_from_disk(str(path))
    missing = [s for s in SPLITS if s not in corpus]
    if missing:
        raise ValueError(f"{path} lacks the split(s) {missing}; regenerate it with `moe-empathy synth`")
    markers = find_turn_markers(tokenizer)
    limits = {"train": data.max_train_dialogues, "validation": data.max_eval_dialogues, "test": None}
    splits = {}
    for split in SPLITS:
        records = corpus[split]
        if limits[split] is not None:
            records = records.select(range(min(limits[split], len(records))))
        if gate_learns and split == "train":
            off_level = sum(off_level_turns(r) for r in records)
            if off_level:
                raise ValueError(
                    f"{path} has {off_level} off-level replies (labelled with a level the user's state does not call for), "
                    "and a gate would learn from those labels; train the gate on a corpus of off_level_rate 0 "
                    "(gate_warmup) and set training.freeze_gate: true"
                )
        if transform is not None:
            records = transform(list(records), split)
        encoded = [(encode_dialogue(r, tokenizer, markers, config.model.expert_names, data.max_length), r) for r in records]
        encoded = [(row, record) for row, record in encoded if row is not None]
        rows = [row for row, _ in encoded]
        if split == "train" and data.balance_levels:
            tasks = [record.get("task") for _, record in encoded]
            if None in tasks:
                raise ValueError(f"data.balance_levels needs every dialogue's `task`, and {path} has dialogues without; drop the setting")
            rows = balance_label_turns(rows, tasks, config.training.seed)
        if not rows:
            raise ValueError(f"no {split} dialogue fits max_length={data.max_length}; raise it")
        splits[split] = rows if split == "train" else sorted(rows, key=lambda r: r["length"])
    return splits


# --------------------------------------------------------------------- methods


def run_method(config: TrainConfig, output_dir: Path, max_steps: int, resume: str | os.PathLike | None) -> dict:
    """Trains what ``config.method`` names into ``output_dir``.

    Args:
        config: the run's config.
        output_dir: the run folder.
        max_steps: optimizer steps (per expert for ``per_level``).
        resume: a checkpoint or run folder to resume from (the run folder for ``per_level``).

    Returns:
        The run's summary.
    """
    args = training_arguments(config, str(output_dir), max_steps)
    tokenizer = load_tokenizer(config)
    splits = encode_splits(config, tokenizer, ensure_corpus(config.data, args, config.model.base), gate_learns=config.trains_gate)
    pad = padding_id(tokenizer)
    if config.method in ("gated", "gated_from_experts"):
        model = gated_model(config, load_base_model(config, tokenizer, output_dir, args), tokenizer)
        if config.gate_warmup is not None and resume is None:  # a resumed run's checkpoint holds the warmed-up gate
            warmup = config.gate_warmup
            warmup_splits = encode_splits(
                config, tokenizer, ensure_corpus(warmup.data, args, config.model.base), warmup.data,
                context_replies(warmup, config.training.seed), gate_learns=True,
            )
            warm_up_gate(model, warmup_splits, pad, warmup, config.training.seed, output_dir, device=args.device)
        data = {split: EncodedDialogues(rows) for split, rows in splits.items()}
        return run_training(config, model, pad, data, output_dir, max_steps, resume, description=config.method)
    if config.method == "single_lora":
        model = lora_model(config, load_base_model(config, tokenizer, output_dir, args))
        data = {split: EncodedDialogues(rows) for split, rows in splits.items()}
        return run_training(config, model, pad, data, output_dir, max_steps, resume, "single_lora", with_gate=False)
    summaries = {}
    for index, name in enumerate(config.model.expert_names):
        data = {}
        for split, rows in splits.items():
            kept = [r for r in (restrict_to_expert(row, index) for row in rows) if r is not None]
            if not kept:
                raise ValueError(f"no {split} dialogue has a {name!r} turn; generate more dialogues")
            data[split] = EncodedDialogues(kept)
        run_dir = output_dir / "runs" / name
        level_resume = resume and (Path(resume) / "runs" / name)
        if level_resume is not None and not any(level_resume.glob("checkpoint-*")):
            level_resume = None
        model = lora_model(config, load_base_model(config, tokenizer, output_dir, args))
        summaries[name] = run_training(config, model, pad, data, run_dir, max_steps, level_resume, f"expert {name}", with_gate=False)
        if args.should_save:
            copy_model_files(run_dir / "last", output_dir / name)
    seconds = round(sum(summary["train_seconds"] for summary in summaries.values()), 1)
    test = {f"test_{name}_lm_loss": summary["test"].get("test_lm_loss") for name, summary in summaries.items()}
    summary = {"method": "per_level", "steps": max_steps, "train_seconds": seconds, "test": test, "experts": summaries}
    if args.should_save:
        write_summary(output_dir, summary)
    return summary
