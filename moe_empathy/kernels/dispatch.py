"""The one call the model makes for the experts' delta: it checks its inputs and picks a backend."""

from __future__ import annotations

import torch

from .inputs import MultiLoraInputs
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
    validate: bool = True,
) -> torch.Tensor:
    """Gated multi-LoRA delta: ``out[t] += scaling * sum_e gate[t, e] * B_e A_e x[t]``.

    Differentiable in ``x``, ``lora_A``, ``lora_B``, ``gate`` (and ``out``) on every backend.

    Args:
        x, lora_A, lora_B, gate, scaling, expert_ids, out: the call's inputs; their shapes are
            documented once, with :class:`~.inputs.MultiLoraInputs`.
        backend: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.
        validate: check the inputs first (:meth:`~.inputs.MultiLoraInputs.check`, which reads
            expert ids back to the host); callers that built and checked their routing once per
            forward pass False.

    Returns:
        ``out`` with the delta added, or a new ``[tokens, out]`` tensor.

    Raises:
        ValueError: on an unknown backend or inconsistent inputs, before any kernel runs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    inputs = MultiLoraInputs(x, lora_A, lora_B, gate, scaling, expert_ids, out)
    if validate:
        inputs.check()
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        from .ops import multi_lora_triton  # imported late: Triton's mode is fixed when kernels are defined

        return multi_lora_triton(inputs)
    delta = multi_lora_reference(x, lora_A, lora_B, inputs.dense_gate(), scaling)
    return delta if out is None else out.add_(delta)
