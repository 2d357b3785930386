"""moe_empathy: empathy-level LoRA experts inside one Hugging Face causal LM, behind a per-turn gate.

Importing the package registers the model with ``AutoConfig`` and ``AutoModelForCausalLM``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .base import DEFAULT_BASE_ID, load_default_base
from .cache import GrowingCache
from .configuration_moe_empathy import MoeEmpathyConfig
from .gate import GateState, TurnGate
from .layers import MultiLoraLinear
from .modeling_moe_empathy import MoeEmpathyCausalLMOutputWithPast, MoeEmpathyForCausalLM
from .turns import derive_turn_ids, encode_chat, find_turn_markers

AutoConfig.register(MoeEmpathyConfig.model_type, MoeEmpathyConfig, exist_ok=True)
AutoModelForCausalLM.register(MoeEmpathyConfig, MoeEmpathyForCausalLM, exist_ok=True)

__all__ = [
    "DEFAULT_BASE_ID",
    "GateState",
    "GrowingCache",
    "MoeEmpathyCausalLMOutputWithPast",
    "MoeEmpathyConfig",
    "MoeEmpathyForCausalLM",
    "MultiLoraLinear",
    "TurnGate",
    "derive_turn_ids",
    "encode_chat",
    "find_turn_markers",
    "load_default_base",
]
