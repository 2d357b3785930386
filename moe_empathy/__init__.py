"""moe_empathy: empathy-level LoRA experts inside one Hugging Face causal LM, behind a per-turn gate.

The package imports lazily, so that the ``moe-empathy`` command answers at once: the names
below load their module on first use. Importing :mod:`moe_empathy.modeling_moe_empathy`
(which any of the model's names does) registers the model with ``AutoConfig`` and
``AutoModelForCausalLM``; call :func:`register` to do it explicitly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._compat import check_dependency_versions

check_dependency_versions()

_EXPORTS = {
    "DEFAULT_BASE_ID": ".base",
    "load_default_base": ".base",
    "GrowingCache": ".cache",
    "MoeEmpathyConfig": ".configuration_moe_empathy",
    "GateState": ".gate",
    "TurnGate": ".gate",
    "MultiLoraLinear": ".layers",
    "MoeEmpathyCausalLMOutputWithPast": ".modeling_moe_empathy",
    "MoeEmpathyForCausalLM": ".modeling_moe_empathy",
    "register": ".modeling_moe_empathy",
    "derive_turn_ids": ".turns",
    "encode_chat": ".turns",
    "find_turn_markers": ".turns",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .base import DEFAULT_BASE_ID, load_default_base
    from .cache import GrowingCache
    from .configuration_moe_empathy import MoeEmpathyConfig
    from .gate import GateState, TurnGate
    from .layers import MultiLoraLinear
    from .modeling_moe_empathy import MoeEmpathyCausalLMOutputWithPast, MoeEmpathyForCausalLM, register
    from .turns import derive_turn_ids, encode_chat, find_turn_markers


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe_empathy' has no attribute {name!r}")
    # The model's module registers the model with the Auto classes whenever any name is used.
    importlib.import_module(".modeling_moe_empathy", __name__)
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
