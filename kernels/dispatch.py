"""The one call the model makes for the experts' delta, and its input checks."""

from __future__ import annotations

import torch

from .reference import multi_lora_reference

BACKENDS = ("auto", "triton", "torch")


def multi_lora(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor,
    scaling: float,
    *,
    expert_ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Gated multi-LoRA delta: ``out[t] += scaling * sum_e gate[t, e] * B_e A_e x[t]``.

    Args:
        x: ``[tokens, in]`` inputs.
        lora_A: ``[E, r, in]`` stacked down-projections.
        lora_B: ``[E, out, r]`` stacked up-projections.
        gate: ``[tokens, E]`` (dense) or ``[tokens, k]`` with ``expert_ids`` (top-k).
        scaling: ``alpha / r``.
        expert_ids: ``[tokens, k]`` expert ids for top-k routing, or None for dense.
        out: ``[tokens, out]`` accumulated into when given (the base layer's output).
        backend: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.

    Returns:
        ``out`` with the delta added, or a new ``[tokens, out]`` tensor.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        raise NotImplementedError("the Triton multi-LoRA kernel is not built yet; use backend='torch'")
    delta = multi_lora_reference(x, lora_A, lora_B, gate, scaling, expert_ids=expert_ids)
    if out is None:
        return delta
    return out.add_(delta)
