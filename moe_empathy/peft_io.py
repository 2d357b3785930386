"""Experts to and from ordinary peft LoRA adapters.

An expert ``e`` of a :class:`MultiLoraLinear` is the LoRA pair ``(A_e, B_e)`` with scaling
``alpha / r``, exactly what peft stores for one adapter. Export writes one adapter folder
that ``PeftModel.from_pretrained(base, folder)`` loads; import reads one adapter folder
per expert name (the paper's separately trained experts) into a gated model. An adapter of
a smaller rank fills the first rows of ``A`` and columns of ``B``; its scaling is folded
into ``B`` so that the delta is unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from .utils import make_temp_dir

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."


def read_adapter(folder: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Reads a peft LoRA adapter folder.

    Args:
        folder: a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The ``LoraConfig`` and the weights keyed by module path (``model.layers.0.self_attn.q_proj``)
        and ``lora_A``/``lora_B``: ``{path: {"lora_A": [r, in], "lora_B": [out, r]}}``.
    """
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG).is_file() or not (folder / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(
            f"{folder} is not a peft LoRA adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
            "(save adapters with safe_serialization=True)"
        )
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder} holds a {config.get('peft_type')} adapter; only LoRA adapters can become experts")
    lora_config = LoraConfig.from_pretrained(str(folder))
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(folder / ADAPTER_WEIGHTS)).items():
        if not key.startswith(_PREFIX) or not key.endswith(".weight") or ".lora_" not in key:
            raise ValueError(f"{folder}: cannot map weight {key!r}; only plain LoRA A/B weights can be imported")
        path, kind = key[len(_PREFIX) : -len(".weight")].rsplit(".", 1)
        modules.setdefault(path, {})[kind] = tensor
    return lora_config, modules


def adapter_scaling(config: LoraConfig) -> float:
    """The scaling peft applies to an adapter's ``B A`` product."""
    return config.lora_alpha / (config.r**0.5 if config.use_rslora else config.r)


def import_expert(model, name: str, folder: str | os.PathLike) -> None:
    """Loads one peft LoRA adapter into the expert ``name`` of a gated model.

    Args:
        model: a :class:`MoeEmpathyForCausalLM`.
        name: the expert to fill.
        folder: the adapter folder.
    """
    if name not in model.expert_names:
        raise ValueError(f"unknown expert {name!r}; the experts are {model.expert_names}")
    index = model.expert_names.index(name)
    config, modules = read_adapter(folder)
    if config.r > model.config.lora_rank:
        raise ValueError(
            f"adapter {folder} has rank {config.r} but the experts have rank {model.config.lora_rank}; "
            f"build the model with lora_rank >= {config.r}"
        )
    unknown = sorted(set(modules) - set(model.experts))
    if unknown:
        raise ValueError(
            f"adapter {folder} adapts {unknown[:3]}{'...' if len(unknown) > 3 else ''}, which have no experts "
            f"(experts sit on {model.config.target_modules} in layers >= gate_layer={model.config.gate_layer}); "
            "widen target_modules or lower gate_layer"
        )
    with torch.no_grad():
        for path, linear in model.experts.items():
            linear.lora_B[index].zero_()
            if path not in modules:
                continue
            a, b = modules[path]["lora_A"], modules[path]["lora_B"]  # [r, in], [out, r]
            ratio = adapter_scaling(config) / linear.scaling
            linear.lora_A[index, : config.r].copy_(a)
            linear.lora_B[index, :, : config.r].copy_(b * ratio)
            linear.drop_merged_weight()


def export_expert(model, name: str, folder: str | os.PathLike) -> None:
    """Writes the expert ``name`` as a peft LoRA adapter folder (atomically).

    Args:
        model: a :class:`MoeEmpathyForCausalLM`.
        name: the expert to export.
        folder: where to write; ``PeftModel.from_pretrained(base, folder)`` loads it.
    """
    if name not in model.expert_names:
        raise ValueError(f"unknown expert {name!r}; the experts are {model.expert_names}")
    index = model.expert_names.index(name)
    cfg = model.config
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=sorted(cfg.target_modules),
        layers_to_transform=list(range(cfg.gate_layer, cfg.text_config.num_hidden_layers)),
        layers_pattern="layers",
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=cfg.base_model_name_or_path,
    )
    tensors = {}
    for path, linear in model.experts.items():
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = linear.lora_A[index].detach().cpu().contiguous()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = linear.lora_B[index].detach().cpu().contiguous()
    target = Path(folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(target.parent, f".{target.name}.")
    try:
        config.save_pretrained(str(staging))
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        target.mkdir(exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def adapters_span(folders: dict[str, str | os.PathLike]) -> tuple[list[str], int, int]:
    """What a set of adapters needs: target module names, the largest rank, the lowest layer.

    Args:
        folders: adapter folder of each expert name.
    """
    targets: set[str] = set()
    rank, lowest = 1, None
    for folder in folders.values():
        config, modules = read_adapter(folder)
        rank = max(rank, config.r)
        for path in modules:
            targets.add(path.rsplit(".", 1)[-1])
            layer = next((int(p) for p in path.split(".") if p.isdigit()), None)
            if layer is not None:
                lowest = layer if lowest is None else min(lowest, layer)
    return sorted(targets), rank, lowest or 0
