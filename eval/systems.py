"""The five systems an evaluation compares, built around one gated checkpoint.

* ``base``: the base model alone (the gated model with its experts disabled, which is
  exactly the base).
* ``system_prompt``: the base model told, in a system prompt, the empathy level of the
  dialogue's task.
* ``single_lora``: one peft LoRA trained on every assistant turn (no levels).
* ``external``: the per-level expert chosen outside the model from the dialogue's known task
  (the paper's method): per-level peft adapters when given, else the gated model's own
  experts forced by the task's level.
* ``gated``: the gated model choosing its experts per turn by itself.

Every system decodes with the same settings: greedy, plus the repeat guard of the gated
checkpoint's ``generation_config.json`` (:class:`moe_empathy.generation.RepeatGuardConfig`),
unless the guard is switched off for all of them (``--no-repeat-guard``).
"""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moe_empathy.base import DEFAULT_BASE_ID, load_base
from moe_empathy.configuration_moe_empathy import MoeEmpathyConfig
from moe_empathy.generation import RepeatGuardConfig
from moe_empathy.modeling_moe_empathy import MoeEmpathyForCausalLM

SYSTEMS = ("base", "system_prompt", "single_lora", "external", "gated")

LEVEL_INSTRUCTIONS = {
    "low": "Keep replies practical and to the point; do not comment on the user's feelings.",
    "medium": "Be helpful first; briefly acknowledge the user's feelings where they show.",
    "high": (
        "Respond with strong empathy: voice warmth, show that you understand how the user feels, "
        "and ask about their experience, while still helping."
    ),
}


def level_system_prompt(level: str) -> str:
    """The ``system_prompt`` baseline's instruction for an empathy level.

    Args:
        level: ``low``, ``medium`` or ``high``.
    """
    if level not in LEVEL_INSTRUCTIONS:
        raise ValueError(f"no system prompt for empathy level {level!r}; levels are {list(LEVEL_INSTRUCTIONS)}")
    return f"You are a helpful assistant. The expected empathy level here is {level}. {LEVEL_INSTRUCTIONS[level]}"


@dataclass
class EvalSystem:
    """One system under evaluation.

    Args:
        name: one of :data:`SYSTEMS`.
        model: the model that generates the replies.
        description: one line for the report (what the system is and where it came from).
        system_message: the system prompt for a dialogue record, or None for none.
        routing: a context manager for a batch's generation, given the batch's records.
        gated: True when the model's own gate chooses (its per-turn weights are recorded).
        forced_expert: the expert selected for a dialogue record, for systems that select one.
        sources: where the system's weights came from (for the report).
        repeat_guard: the settings of the guard against repeating earlier replies, or None to
            decode without it.
    """

    name: str
    model: PreTrainedModel
    description: str
    system_message: Callable[[dict], str | None] = lambda record: None
    routing: Callable[[list[dict]], ContextManager] = lambda records: nullcontext()
    gated: bool = False
    forced_expert: Callable[[dict], str] | None = None
    sources: dict = field(default_factory=dict)
    repeat_guard: RepeatGuardConfig | None = None


def check_system_names(names: list[str]) -> list[str]:
    """Validates system names.

    Args:
        names: the requested systems.

    Raises:
        ValueError: for an unknown or repeated name, listing the known ones.
    """
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from: {', '.join(SYSTEMS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--systems names a system twice: {names}")
    if not names:
        raise ValueError(f"--systems is empty; choose from: {', '.join(SYSTEMS)}")
    return names


def check_model_dir(path: str | Path) -> Path:
    """Raises a clear error unless ``path`` holds a ``moe_empathy`` checkpoint.

    Args:
        path: the model folder.
    """
    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"{path} is not a model folder (no config.json); pass a folder written by "
            "MoeEmpathyForCausalLM.save_pretrained or `moe-empathy train`"
        )
    model_type = json.loads(config.read_text()).get("model_type")
    if model_type != MoeEmpathyConfig.model_type:
        raise ValueError(
            f"{path} holds a {model_type!r} model, not a {MoeEmpathyConfig.model_type!r} checkpoint; pass a folder "
            "written by MoeEmpathyForCausalLM.save_pretrained or `moe-empathy train` (plain LoRA adapters go to "
            "--single-lora / --experts-dir)"
        )
    return path


def _adapter_base_ref(adapter: Path, fallback: str | None) -> str:
    """The base model an adapter was trained on: its ``base_model_name_or_path`` when that
    can be loaded here, else ``fallback`` (the gated model's base)."""
    config_file = adapter / "adapter_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    ref = json.loads(config_file.read_text()).get("base_model_name_or_path")
    for candidate in (ref, fallback):
        if candidate and (Path(candidate, "config.json").is_file() or candidate == DEFAULT_BASE_ID):
            return candidate
    if fallback:
        return fallback
    raise FileNotFoundError(
        f"cannot find the base model of adapter {adapter}: its base_model_name_or_path is {ref!r} and the gated "
        "model names none; save the adapter with a local base folder"
    )


def load_single_lora(adapter: str | Path, base_ref: str | None) -> PreTrainedModel:
    """A base model with one peft LoRA adapter, in eval mode.

    Args:
        adapter: the adapter folder (the ``last/`` or ``best/`` of a ``single_lora`` run).
        base_ref: the gated model's base, used when the adapter's own base cannot be found.
    """
    from peft import PeftModel

    adapter = Path(adapter)
    base, _ = load_base(_adapter_base_ref(adapter, base_ref))
    return PeftModel.from_pretrained(base, str(adapter)).eval()


def load_external_experts(experts_dir: str | Path, expert_names: list[str], base_ref: str | None) -> MoeEmpathyForCausalLM:
    """Per-level peft adapters (``experts_dir/<level>/``) as the experts of one model, to be
    selected by :meth:`MoeEmpathyForCausalLM.force_gate` (its gate is never used).

    Args:
        experts_dir: the folder of a ``per_level`` run, holding one adapter folder per level.
        expert_names: the levels, in expert order.
        base_ref: the gated model's base, used when the adapters' own base cannot be found.
    """
    experts_dir = Path(experts_dir)
    missing = [n for n in expert_names if not (experts_dir / n / "adapter_config.json").is_file()]
    if missing:
        raise FileNotFoundError(
            f"--experts-dir {experts_dir} lacks the adapter folder(s) {missing}; pass the output folder of a "
            "`method: per_level` training run (one adapter per level: " + ", ".join(expert_names) + ")"
        )
    base, tokenizer = load_base(_adapter_base_ref(experts_dir / expert_names[0], base_ref))
    adapters = {name: experts_dir / name for name in expert_names}
    return MoeEmpathyForCausalLM.from_peft_adapters(base, adapters, tokenizer=tokenizer).eval()


def find_baseline(model_dir: Path, flag: str | None, names: tuple[str, ...]) -> Path | None:
    """A baseline folder: the flag's, else the first of ``model_dir/baselines/<name>`` that exists.

    Args:
        model_dir: the gated checkpoint's folder.
        flag: the folder given on the command line, or None.
        names: folder names to look for under ``model_dir/baselines``.
    """
    if flag is not None:
        path = Path(flag)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} does not exist or is not a folder")
        return path
    for name in names:
        path = model_dir / "baselines" / name
        if path.is_dir():
            return path
    return None


def build_systems(
    names: list[str],
    model: MoeEmpathyForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    model_dir: Path | None = None,
    single_lora: str | Path | None = None,
    experts_dir: str | Path | None = None,
    repeat_guard: bool = True,
) -> list[EvalSystem]:
    """Builds the requested systems around a gated model.

    Args:
        names: systems from :data:`SYSTEMS`.
        model: the gated model (eval mode).
        tokenizer: its tokenizer.
        model_dir: the gated checkpoint's folder (baselines are looked for under ``baselines/``).
        single_lora: a peft adapter folder for ``single_lora``.
        experts_dir: a ``per_level`` run folder for ``external``.
        repeat_guard: decode every system with the repeat guard stored in the gated model's
            generation config (the same settings for all), or every system without it.
    """
    check_system_names(names)
    levels = model.expert_names
    base_ref = model.config.base_model_name_or_path
    systems = []
    for name in names:
        if name == "base":
            systems.append(EvalSystem(name, model, "base model (experts disabled)", routing=lambda records: model.disable_experts()))
        elif name == "system_prompt":
            systems.append(
                EvalSystem(
                    name,
                    model,
                    "base model told the task's empathy level in a system prompt",
                    system_message=lambda record: level_system_prompt(record["task_level"]),
                    routing=lambda records: model.disable_experts(),
                )
            )
        elif name == "single_lora":
            folder = find_baseline(model_dir, single_lora, ("single_lora",)) if model_dir or single_lora else None
            if folder is None:
                raise FileNotFoundError(
                    "single_lora needs a peft LoRA adapter: pass --single-lora DIR (the last/ or best/ folder of a "
                    "`method: single_lora` training run), put it under MODEL/baselines/single_lora, or drop "
                    "single_lora from --systems"
                )
            systems.append(
                EvalSystem(name, load_single_lora(folder, base_ref), f"one peft LoRA on all turns ({folder})", sources={"adapter": str(folder)})
            )
        elif name == "external":
            folder = find_baseline(model_dir, experts_dir, ("per_level", "experts")) if model_dir or experts_dir else None
            if folder is not None:
                chooser = load_external_experts(folder, levels, base_ref)
                description = f"per-level peft LoRA experts ({folder}) selected by the task's level"
            else:
                chooser = model
                description = "the gated model's own experts, selected by the task's level (no per-level adapters given)"
            systems.append(
                EvalSystem(
                    name,
                    chooser,
                    description,
                    routing=lambda records, chooser=chooser: chooser.force_gate([r["task_level"] for r in records]),
                    forced_expert=lambda record: record["task_level"],
                    sources={"experts": str(folder) if folder else "gated model's experts"},
                )
            )
        else:
            systems.append(EvalSystem(name, model, "the gated model, choosing its experts per turn", gated=True))
    guard = RepeatGuardConfig.from_generation_config(model.generation_config) if repeat_guard else None
    decoding = f"greedy, {guard.describe()}" if guard else "greedy, no repeat guard"
    for system in systems:
        system.repeat_guard = guard
        system.description = f"{system.description}; {decoding}"
    return systems
