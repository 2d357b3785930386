"""The one call the model makes for the experts' delta, and its input checks."""

from __future__ import annotations

import numbers

import torch

from .reference import multi_lora_reference

BACKENDS = ("auto", "triton", "torch")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_inputs(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor,
    scaling: float,
    expert_ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> None:
    """Raises ``ValueError`` naming the first problem with the inputs of :func:`multi_lora`.

    Args:
        x, lora_A, lora_B, gate, scaling, expert_ids, out: as in :func:`multi_lora`.
    """
    tensors = {"x": x, "lora_A": lora_A, "lora_B": lora_B, "gate": gate, "expert_ids": expert_ids, "out": out}
    for name, tensor in tensors.items():
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    for name, tensor, ndim in (("x", x, 2), ("lora_A", lora_A, 3), ("lora_B", lora_B, 3), ("gate", gate, 2)):
        if tensor.dim() != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    for name in ("x", "lora_A", "lora_B"):
        if tensors[name].dtype not in DTYPES:
            raise ValueError(f"{name} must be float32, float16 or bfloat16, got {tensors[name].dtype}")
    if not (x.dtype == lora_A.dtype == lora_B.dtype):
        raise ValueError(f"x, lora_A and lora_B must share a dtype, got {x.dtype}, {lora_A.dtype}, {lora_B.dtype}")
    if not gate.is_floating_point():
        raise ValueError(f"gate must be floating point, got {gate.dtype}")
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise ValueError(f"scaling must be a real number, got {scaling!r}")

    num_tokens, in_features = x.shape
    num_experts, rank, a_in = lora_A.shape
    b_experts, out_features, b_rank = lora_B.shape
    if num_experts == 0 or rank == 0:
        raise ValueError(f"lora_A must hold at least one expert of rank >= 1, got shape {tuple(lora_A.shape)}")
    if b_experts != num_experts:
        raise ValueError(f"lora_A has {num_experts} experts but lora_B has {b_experts}")
    if b_rank != rank:
        raise ValueError(f"lora_A has rank {rank} but lora_B has rank {b_rank}")
    if a_in != in_features:
        raise ValueError(f"lora_A takes {a_in} input features but x has {in_features}")
    if gate.shape[0] != num_tokens:
        raise ValueError(f"gate has {gate.shape[0]} rows but x has {num_tokens} tokens")
    if expert_ids is None:
        if gate.shape[1] != num_experts:
            raise ValueError(f"dense gate rows must hold one weight per expert ({num_experts}), got {gate.shape[1]}")
    else:
        if expert_ids.dtype.is_floating_point or expert_ids.dtype.is_complex or expert_ids.dtype == torch.bool:
            raise ValueError(f"expert_ids must be integers, got {expert_ids.dtype}")
        if expert_ids.shape != gate.shape:
            raise ValueError(
                f"expert_ids {tuple(expert_ids.shape)} and top-k gate {tuple(gate.shape)} must have one shape"
            )
        if gate.shape[1] == 0:
            raise ValueError("top-k routing needs k >= 1")
        if expert_ids.numel():
            low, high = torch.stack(torch.aminmax(expert_ids)).tolist()  # one read-back
            if low < 0 or high >= num_experts:
                raise ValueError(f"expert_ids must lie in [0, {num_experts}), got [{low}, {high}]")
    if out is not None:
        if out.shape != (num_tokens, out_features):
            raise ValueError(f"out must have shape {(num_tokens, out_features)}, got {tuple(out.shape)}")
        if out.dtype != x.dtype:
            raise ValueError(f"out must have x's dtype {x.dtype}, got {out.dtype}")


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
        x: ``[tokens, in]`` inputs.
        lora_A: ``[E, r, in]`` stacked down-projections.
        lora_B: ``[E, out, r]`` stacked up-projections.
        gate: ``[tokens, E]`` (dense) or ``[tokens, k]`` with ``expert_ids`` (top-k).
        scaling: ``alpha / r``.
        expert_ids: ``[tokens, k]`` expert ids for top-k routing, or None for dense.
        out: ``[tokens, out]`` accumulated into when given (the base layer's output).
        backend: ``"auto"`` (Triton on CUDA tensors, torch otherwise), ``"triton"`` or ``"torch"``.
        validate: check the inputs first (:func:`check_inputs`, which reads expert ids back to the
            host); callers that built and checked their routing once per forward pass False.

    Returns:
        ``out`` with the delta added, or a new ``[tokens, out]`` tensor.

    Raises:
        ValueError: on an unknown backend or inconsistent inputs, before any kernel runs.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")
    if validate:
        check_inputs(x, lora_A, lora_B, gate, scaling, expert_ids, out)
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        from .ops import multi_lora_triton  # imported late: Triton's mode is fixed when kernels are defined

        return multi_lora_triton(x, lora_A, lora_B, gate, float(scaling), expert_ids, out)
    delta = multi_lora_reference(x, lora_A, lora_B, gate, scaling, expert_ids=expert_ids)
    if out is None:
        return delta
    return out.add_(delta)
