"""Multi-LoRA kernels: one entry point, :func:`multi_lora`, for the experts' delta.

The Triton kernels (``shrink``, ``expand``, ``backward``) and their custom ops (``ops``,
namespace ``torch.ops.moe_empathy``) are imported only when the Triton backend is first
used, so that ``TRITON_INTERPRET`` can still be set before they are defined.
"""

from .dispatch import multi_lora
from .inputs import MultiLoraInputs
from .reference import densify_gate, multi_lora_loop, multi_lora_reference

__all__ = ["multi_lora", "MultiLoraInputs", "multi_lora_reference", "multi_lora_loop", "densify_gate"]
