"""Plain-torch reference of the gated multi-LoRA delta.

It is the CPU path, the ground truth of the kernel tests, and the speed baseline the
Triton kernels must beat. A dense soft mix over ``E`` experts of rank ``r`` is one
rank-``E*r`` LoRA whose shrink output is scaled, per token, by the gate weight of each
``r``-block; so it runs as two GEMMs and never builds a ``[tokens, E, out]`` tensor.
"""

from __future__ import annotations

import torch


def densify_gate(gate: torch.Tensor, expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Turns top-k routing into dense per-token weights over all experts.

    Args:
        gate: ``[tokens, k]`` weights of the chosen experts.
        expert_ids: ``[tokens, k]`` integer ids of the chosen experts.
        num_experts: ``E``.

    Returns:
        ``[tokens, E]`` weights, zero for experts a token did not choose.
    """
    dense = gate.new_zeros(gate.shape[0], num_experts)
    return dense.scatter_add(1, expert_ids.long(), gate)


def multi_lora_reference(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, gate: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``delta[t] = scaling * sum_e gate[t, e] * B_e @ A_e @ x[t]``, differentiable.

    Args:
        x: ``[tokens, in]``; lora_A: ``[E, r, in]``; lora_B: ``[E, out, r]``;
        gate: ``[tokens, E]`` dense weights (top-k routing: :func:`densify_gate` first);
        scaling: LoRA ``alpha / r``.

    Returns:
        ``[tokens, out]`` delta in ``x``'s dtype.
    """
    a_cat, b_cat_t = concatenate_experts(lora_A, lora_B)
    return (x @ a_cat.t()) * row_scale(gate.to(x.dtype), lora_A.shape[1], scaling) @ b_cat_t  # [tokens, out]


def concatenate_experts(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``E`` experts as one rank-``E*r`` LoRA.

    Args:
        lora_A: ``[E, r, in]`` stacked down-projections.
        lora_B: ``[E, out, r]`` stacked up-projections.

    Returns:
        ``a_cat [E*r, in]`` (a view) and ``b_cat_t [E*r, out]`` (a copy).
    """
    num_experts, rank, in_features = lora_A.shape
    a_cat = lora_A.reshape(num_experts * rank, in_features)  # [E*r, in]
    b_cat_t = lora_B.permute(0, 2, 1).reshape(num_experts * rank, lora_B.shape[1])  # [E*r, out]
    return a_cat, b_cat_t


def row_scale(gate: torch.Tensor, rank: int, scaling: float) -> torch.Tensor:
    """``[tokens, E*r]`` the factor of each shrink output: the token's weight of the block's expert
    times ``scaling``.

    Args:
        gate: ``[tokens, E]`` dense weights.
        rank: LoRA rank ``r``.
        scaling: LoRA ``alpha / r``.
    """
    return (gate * scaling).repeat_interleave(rank, dim=1)


def multi_lora_loop(
    x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, gate: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The per-expert Python loop of peft / X-LoRA, kept as a benchmark baseline; arguments as
    :func:`multi_lora_reference`'s."""
    delta = x.new_zeros(x.shape[0], lora_B.shape[1])
    for e in range(lora_A.shape[0]):
        delta = delta + (x @ lora_A[e].t() @ lora_B[e].t()) * (gate[:, e : e + 1] * scaling)
    return delta
