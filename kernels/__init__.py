"""Multi-LoRA kernels: one entry point, :func:`multi_lora`, for the experts' delta."""

from .dispatch import multi_lora
from .reference import densify_gate, multi_lora_loop, multi_lora_reference

__all__ = ["multi_lora", "multi_lora_reference", "multi_lora_loop", "densify_gate"]
