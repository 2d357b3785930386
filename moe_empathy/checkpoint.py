"""The compact checkpoint: experts and gate only, plus a reference to the base model.

A compact folder holds ``config.json`` (whose ``base_model_name_or_path`` names the base),
``generation_config.json`` and ``experts.safetensors`` (every ``lora_A``/``lora_B`` and the
gate; its metadata names the format and the experts). It is a few MB instead of the base's
hundreds. ``MoeEmpathyForCausalLM.save_pretrained(compact=True)`` writes one and
``from_pretrained`` reads it back onto a freshly loaded base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from .base import load_base
from .configuration_moe_empathy import MoeEmpathyConfig

if TYPE_CHECKING:
    from .modeling_moe_empathy import MoeEmpathyForCausalLM

COMPACT_WEIGHTS = "experts.safetensors"
COMPACT_FORMAT = "moe_empathy-compact-v1"

# from_pretrained's download options; a compact checkpoint is a local folder, so they change nothing.
_HUB_KWARGS = (
    "cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code", "proxies",
    "code_revision", "_commit_hash", "adapter_kwargs", "_from_auto",
)


def is_expert_key(key: str) -> bool:
    """Whether a state-dict key belongs to the trainable part (an expert or the gate)."""
    return ".lora_A" in key or ".lora_B" in key or key.startswith("gate.")


def write_compact(model: "MoeEmpathyForCausalLM", folder: Path, state_dict: Mapping[str, torch.Tensor] | None) -> None:
    """Writes a compact checkpoint of ``model`` into an existing (staging) folder.

    Args:
        model: the gated model.
        folder: where to write the three files.
        state_dict: a full state dict of the model (one gathered from FSDP shards), or None.
    """
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    metadata = {"format": COMPACT_FORMAT, "expert_names": json.dumps(model.expert_names)}
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.expert_state_dict(state_dict).items()}
    save_file(tensors, folder / COMPACT_WEIGHTS, metadata=metadata)


def single_device(device_map) -> torch.device | None:
    """The one device of a ``device_map`` (``"cpu"``, ``"cuda:0"``, ``{"": 0}``...), or None without one.

    Args:
        device_map: what ``from_pretrained`` was given.
    """
    if device_map is None:
        return None
    if isinstance(device_map, Mapping):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"a compact checkpoint loads onto one device, got device_map={device_map!r}; give one device "
                "(e.g. device_map='cuda:0'), or save the model in full to shard it"
            )
        device_map = devices.pop()
    if device_map in ("auto", "balanced", "sequential"):
        device_map = "cuda:0" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)


def _read_weights(path: Path, config: MoeEmpathyConfig) -> dict[str, torch.Tensor]:
    """The tensors of ``path / COMPACT_WEIGHTS``, checked against the folder's config."""
    weights = path / COMPACT_WEIGHTS
    try:
        with safe_open(str(weights), framework="pt") as handle:
            metadata = handle.metadata() or {}
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise ValueError(
            f"{weights} cannot be read ({type(error).__name__}: {error}); the file is damaged or incomplete: "
            "save the checkpoint again, or download it again"
        ) from error
    stored_names = json.loads(metadata.get("expert_names", "null"))
    if metadata.get("format") != COMPACT_FORMAT or stored_names != config.expert_names:
        raise ValueError(
            f"{weights} holds experts {stored_names} but its config.json names "
            f"{config.expert_names}; the two files come from different checkpoints."
        )
    return state


def read_compact(
    cls: type["MoeEmpathyForCausalLM"],
    path: Path,
    config: MoeEmpathyConfig,
    base_model: PreTrainedModel | None,
    model_args: tuple,
    kwargs: dict,
) -> "MoeEmpathyForCausalLM":
    """Builds the model of a compact checkpoint: its base, then its experts and gate, in eval mode.

    Args:
        cls: the model class.
        path: the checkpoint folder.
        config: its configuration.
        base_model: the base to use, or None to load ``config.base_model_name_or_path``.
        model_args, kwargs: what ``from_pretrained`` was given; ``dtype`` (or ``torch_dtype``) and a
            one-device ``device_map`` are honoured, anything else that would change the model is refused.
    """
    kwargs = dict(kwargs)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    device = single_device(kwargs.pop("device_map", None))
    for harmless in ("config", "expert_names", *_HUB_KWARGS):
        kwargs.pop(harmless, None)
    if model_args or kwargs:
        raise ValueError(
            f"{path} is a compact checkpoint (experts and gate only), which does not take "
            f"{sorted(kwargs) or 'positional arguments'}; load it with `dtype` and a one-device `device_map` only, "
            "or save it in full (save_pretrained(..., compact=False)) to use every from_pretrained option"
        )
    dtype = None if dtype == "auto" else getattr(torch, dtype) if isinstance(dtype, str) else dtype
    state = _read_weights(path, config)
    if base_model is None:
        base_model, _ = load_base(config.base_model_name_or_path, dtype=dtype or torch.float32)
    overrides = {k: v for k, v in config.to_diff_dict().items() if k in MoeEmpathyConfig.__dataclass_fields__ and k != "text_config"}
    overrides.pop("tie_word_embeddings", None)
    model = cls.from_base(base_model, **overrides)
    _, unexpected = model.load_state_dict(state, strict=False)
    expected = set(model.expert_state_dict())
    if unexpected or expected - set(state):
        raise ValueError(
            f"{path / COMPACT_WEIGHTS} does not match the model: missing {sorted(expected - set(state))[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    if (path / "generation_config.json").is_file():
        model.generation_config = model.generation_config.from_pretrained(path)
    model.to(device=device, dtype=dtype)  # no-op for None
    return model.eval()  # as transformers loads full checkpoints: dropout off until .train()
