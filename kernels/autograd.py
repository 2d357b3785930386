"""The Triton multi-LoRA delta, forward and backward, as a ``torch.autograd.Function``."""

from __future__ import annotations

import torch

from .backward import grad_lora_A, grad_lora_B
from .configs import block_m
from .expand import expand, expand_grad_input
from .routing import Routing, dense_routing, sparse_routing
from .shrink import shrink, shrink_grad


def _routing(num_tokens: int, num_experts: int, expert_ids: torch.Tensor | None) -> Routing:
    bm = block_m(num_tokens)
    if expert_ids is None:
        return dense_routing(num_tokens, num_experts, bm)
    return sparse_routing(expert_ids, bm)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride (the kernels take any row stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


class MultiLoRAFunction(torch.autograd.Function):
    """Gated multi-LoRA delta with Triton kernels both ways; ``out``, if given, is updated in place.

    Gradients flow to ``out`` (identity), ``x``, ``lora_A``, ``lora_B`` and ``gate``. ``out``
    comes first: autograd hands an in-place update of a view (the model passes a reshaped
    base output) the gradient of its first input.
    """

    @staticmethod
    def forward(ctx, out, x, lora_A, lora_B, gate, expert_ids, scaling):
        num_experts, rank, _ = lora_A.shape
        routing = _routing(x.shape[0], num_experts, expert_ids)
        x, lora_A, lora_B, gate = _rows(x), lora_A.contiguous(), lora_B.contiguous(), gate.contiguous()
        needs_grad = any(ctx.needs_input_grad[1:5])
        unscaled, gated = shrink(x, lora_A, gate, routing, scaling, save_unscaled=needs_grad)
        result = expand(gated, lora_B, routing, out)
        if out is not None:
            ctx.mark_dirty(out)
        if needs_grad:
            ctx.save_for_backward(x, lora_A, lora_B, gate, unscaled, gated)
        ctx.routing = routing
        ctx.scaling = scaling
        return result

    @staticmethod
    def backward(ctx, grad_out):
        grad_out_needed, need_x, need_a, need_b, need_gate = ctx.needs_input_grad[:5]
        grad_x = grad_a = grad_b = grad_gate = None
        if any((need_x, need_a, need_b, need_gate)):
            x, lora_A, lora_B, gate, unscaled, gated = ctx.saved_tensors
            routing = ctx.routing
            num_experts, rank, _ = lora_A.shape
            dy = _rows(grad_out)
            if need_x or need_a or need_gate:
                grad_unscaled, grad_g = shrink_grad(dy, lora_B, gate, unscaled, routing, ctx.scaling)
                if need_gate:
                    grad_gate = grad_g.to(gate.dtype)
                if need_x:
                    grad_x = expand_grad_input(grad_unscaled, lora_A, routing)
                if need_a:
                    grad_a = grad_lora_A(grad_unscaled, x, num_experts, rank, routing).to(lora_A.dtype)
            if need_b:
                grad_b = grad_lora_B(gated, dy, num_experts, rank, routing).to(lora_B.dtype)
        return grad_out if grad_out_needed else None, grad_x, grad_a, grad_b, grad_gate, None, None


def multi_lora_triton(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor,
    scaling: float,
    expert_ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton path of :func:`~moe_empathy.kernels.multi_lora` (inputs already checked).

    Args:
        x: ``[T, in]``; lora_A: ``[E, r, in]``; lora_B: ``[E, out, r]``;
        gate: ``[T, E]`` or ``[T, k]``; scaling: ``alpha / r``;
        expert_ids: ``[T, k]`` or None; out: ``[T, out]`` accumulated into, or None.

    Returns:
        ``out`` with the delta added, or a new ``[T, out]`` tensor.
    """
    if out is not None and out.stride(-1) != 1:
        return out.add_(multi_lora_triton(x, lora_A, lora_B, gate, scaling, expert_ids))
    if x.shape[0] == 0:
        return out if out is not None else x.new_zeros(0, lora_B.shape[1])
    return MultiLoRAFunction.apply(out, x, lora_A, lora_B, gate, expert_ids, scaling)
