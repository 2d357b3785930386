"""The Triton multi-LoRA delta as ``torch.library`` custom ops, forward and backward.

Each op is one opaque call with a fake (meta) implementation, so ``torch.compile`` traces
the model through it without a graph break and CUDA graphs can capture it. Top-k routing
reads its block count back to the host in ``token_blocks`` (not capturable), and in a whole
model Dynamo may need ``torch._dynamo.config.capture_dynamic_output_shape_ops = True`` to
trace that op's data-dependent output size. The ops, all in the ``moe_empathy`` namespace:

* ``token_blocks``: the top-k routing tensors ``[expert_ids, perm, block_start, block_end]``
  (the block count depends on the data). Every other op takes this list as ``routing``,
  empty for a dense gate, so the routing is built once per call.
* ``multi_lora``: ``base + delta`` (or the delta) as a new tensor, differentiable through
  ``register_autograd``; it also returns the fp32 shrink outputs the backward reads.
* ``multi_lora_``: the same, added into ``out`` in place, for calls that need no gradient.
* ``multi_lora_shrink_backward``, ``multi_lora_expand_backward``, ``multi_lora_lora_A_grad``,
  ``multi_lora_lora_B_grad``: the backward's four kernels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .backward import grad_lora_A, grad_lora_B
from .configs import block_m
from .expand import expand, expand_grad_input
from .routing import make_routing, segment_blocks
from .shrink import shrink, shrink_grad

if TYPE_CHECKING:
    from .inputs import MultiLoraInputs


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride (the kernels take any row stride)."""
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op("moe_empathy::token_blocks", mutates_args=())
def token_blocks(expert_ids: torch.Tensor) -> list[torch.Tensor]:
    """Top-k routing tensors of one call.

    Args:
        expert_ids: ``[T, k]`` integer ids in ``[0, E)``.

    Returns:
        ``[expert_ids, perm, block_start, block_end]``, int32 (see :class:`~.routing.Routing`).
    """
    perm, block_start, block_end = segment_blocks(expert_ids, block_m(expert_ids.shape[0]))
    return [expert_ids.to(torch.int32, copy=True).contiguous(), perm, block_start, block_end]


@token_blocks.register_fake
def _(expert_ids):
    num_blocks = torch.library.get_ctx().new_dynamic_size()
    int32 = {"dtype": torch.int32}
    return [
        expert_ids.new_empty(expert_ids.shape, **int32),
        expert_ids.new_empty(expert_ids.shape[0], **int32),
        expert_ids.new_empty(num_blocks, **int32),
        expert_ids.new_empty(num_blocks, **int32),
    ]


@torch.library.custom_op("moe_empathy::multi_lora", mutates_args=())
def multi_lora_op(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor,
    routing: list[torch.Tensor],
    base: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gated multi-LoRA delta, added to ``base`` when given, into a new tensor.

    Args:
        x: ``[T, in]``; lora_A: ``[E, r, in]``; lora_B: ``[E, out, r]``;
        gate: ``[T, slots]``; routing: from ``token_blocks``, or ``[]`` for dense;
        base: ``[T, out]`` or None; scaling: ``alpha / r``.

    Returns:
        ``[T, out]`` result, and the shrink outputs ``U`` and ``S`` ``[T, slots * r]`` (fp32)
        that the backward reads.
    """
    plan = make_routing(x.shape[0], gate.shape[1], routing)
    unscaled, gated = shrink(_rows(x), lora_A.contiguous(), gate.contiguous(), plan, scaling, save_unscaled=True)
    return expand(gated, lora_B.contiguous(), plan, None if base is None else _rows(base)), unscaled, gated


@multi_lora_op.register_fake
def _(x, lora_A, lora_B, gate, routing, base, scaling):
    inter = x.new_empty(x.shape[0], gate.shape[1] * lora_A.shape[1], dtype=torch.float32)  # [T, slots * r]
    return lora_B.new_empty(x.shape[0], lora_B.shape[1]), inter, torch.empty_like(inter)


def _setup_context(ctx, inputs, output):
    x, lora_A, lora_B, gate, routing, base, scaling = inputs
    _, unscaled, gated = output
    ctx.mark_non_differentiable(unscaled, gated)
    ctx.save_for_backward(x, lora_A, lora_B, gate, unscaled, gated, *routing)
    ctx.scaling = scaling


def _backward(ctx, grad_out, _grad_unscaled, _grad_gated):
    x, lora_A, lora_B, gate, unscaled, gated, *routing = ctx.saved_tensors
    need_x, need_a, need_b, need_gate, _, need_base, _ = ctx.needs_input_grad
    ops = torch.ops.moe_empathy
    grad_x = grad_a = grad_b = grad_gate = None
    grad_out = grad_out.contiguous()
    if need_x or need_a or need_gate:
        grad_unscaled, grad_g = ops.multi_lora_shrink_backward(grad_out, lora_B, gate, unscaled, routing, ctx.scaling)
        if need_gate:
            grad_gate = grad_g.to(gate.dtype)
        if need_x:
            grad_x = ops.multi_lora_expand_backward(grad_unscaled, lora_A, routing)
        if need_a:
            grad_a = ops.multi_lora_lora_A_grad(grad_unscaled, x, routing, lora_A.shape[0]).to(lora_A.dtype)
    if need_b:
        grad_b = ops.multi_lora_lora_B_grad(gated, grad_out, routing, lora_B.shape[0]).to(lora_B.dtype)
    return grad_x, grad_a, grad_b, grad_gate, [None] * len(routing), grad_out if need_base else None, None


multi_lora_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("moe_empathy::multi_lora_", mutates_args={"out"})
def multi_lora_inplace(
    out: torch.Tensor,
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor,
    routing: list[torch.Tensor],
    scaling: float,
) -> None:
    """Gated multi-LoRA delta added into ``out [T, out]`` in place (no autograd).

    Args:
        out: the base layer's output; the other arguments as in ``moe_empathy::multi_lora``.
    """
    plan = make_routing(x.shape[0], gate.shape[1], routing)
    _, gated = shrink(_rows(x), lora_A.contiguous(), gate.contiguous(), plan, scaling, save_unscaled=False)
    target = _rows(out)
    expand(gated, lora_B.contiguous(), plan, target, target)
    if target is not out:
        out.copy_(target)


@torch.library.custom_op("moe_empathy::multi_lora_shrink_backward", mutates_args=())
def shrink_backward(
    grad_out: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor,
    unscaled: torch.Tensor,
    routing: list[torch.Tensor],
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dU [T, slots * r]`` and ``dgate [T, slots]`` (fp32) from ``dY [T, out]`` (contiguous)."""
    plan = make_routing(grad_out.shape[0], gate.shape[1], routing)
    return shrink_grad(grad_out, lora_B.contiguous(), gate.contiguous(), unscaled, plan, scaling)


@shrink_backward.register_fake
def _(grad_out, lora_B, gate, unscaled, routing, scaling):
    return torch.empty_like(unscaled), unscaled.new_empty(gate.shape)


@torch.library.custom_op("moe_empathy::multi_lora_expand_backward", mutates_args=())
def expand_backward(grad_unscaled: torch.Tensor, lora_A: torch.Tensor, routing: list[torch.Tensor]) -> torch.Tensor:
    """``dx [T, in]`` in ``lora_A``'s dtype from ``dU [T, slots * r]``."""
    plan = make_routing(grad_unscaled.shape[0], grad_unscaled.shape[1] // lora_A.shape[1], routing)
    return expand_grad_input(grad_unscaled, lora_A.contiguous(), plan)


@expand_backward.register_fake
def _(grad_unscaled, lora_A, routing):
    return lora_A.new_empty(grad_unscaled.shape[0], lora_A.shape[2])


@torch.library.custom_op("moe_empathy::multi_lora_lora_A_grad", mutates_args=())
def lora_A_grad(
    grad_unscaled: torch.Tensor, x: torch.Tensor, routing: list[torch.Tensor], num_experts: int
) -> torch.Tensor:
    """``dA [E, r, in]`` (fp32) from ``dU [T, slots * r]`` and ``x [T, in]``."""
    plan = make_routing(x.shape[0], _num_slots(routing, num_experts), routing)
    return grad_lora_A(grad_unscaled, _rows(x), num_experts, grad_unscaled.shape[1] // plan.num_slots, plan)


@lora_A_grad.register_fake
def _(grad_unscaled, x, routing, num_experts):
    rank = grad_unscaled.shape[1] // _num_slots(routing, num_experts)
    return x.new_empty(num_experts, rank, x.shape[1], dtype=torch.float32)


@torch.library.custom_op("moe_empathy::multi_lora_lora_B_grad", mutates_args=())
def lora_B_grad(
    gated: torch.Tensor, grad_out: torch.Tensor, routing: list[torch.Tensor], num_experts: int
) -> torch.Tensor:
    """``dB [E, out, r]`` (fp32) from ``S [T, slots * r]`` and ``dY [T, out]`` (contiguous)."""
    plan = make_routing(grad_out.shape[0], _num_slots(routing, num_experts), routing)
    return grad_lora_B(gated, grad_out, num_experts, gated.shape[1] // plan.num_slots, plan)


@lora_B_grad.register_fake
def _(gated, grad_out, routing, num_experts):
    rank = gated.shape[1] // _num_slots(routing, num_experts)
    return grad_out.new_empty(num_experts, grad_out.shape[1], rank, dtype=torch.float32)


def _num_slots(routing: list[torch.Tensor], num_experts: int) -> int:
    """Slots of a call: ``k`` (top-k) or ``E`` (dense)."""
    return routing[0].shape[1] if routing else num_experts


def multi_lora_triton(inputs: MultiLoraInputs) -> torch.Tensor:
    """Triton path of :func:`~moe_empathy.kernels.multi_lora` (inputs already checked).

    With ``out`` and a gradient to compute, the differentiable op writes ``out + delta`` into
    a new tensor that is copied back into ``out``; without a gradient the delta is added in
    place.

    Returns:
        ``out`` with the delta added, or a new ``[T, out]`` tensor.
    """
    x, lora_A, lora_B, gate, out = inputs.x, inputs.lora_A, inputs.lora_B, inputs.gate, inputs.out
    scaling = float(inputs.scaling)
    if x.shape[0] == 0:
        return out if out is not None else x.new_zeros(0, lora_B.shape[1])
    ops = torch.ops.moe_empathy
    routing = [] if inputs.expert_ids is None else ops.token_blocks(inputs.expert_ids)
    if out is None:
        return ops.multi_lora(x, lora_A, lora_B, gate, routing, None, scaling)[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, lora_A, lora_B, gate, out)):
        return out.copy_(ops.multi_lora(x, lora_A, lora_B, gate, routing, out, scaling)[0])
    ops.multi_lora_(out, x, lora_A, lora_B, gate, routing, scaling)
    return out
