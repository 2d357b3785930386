"""Shrink kernel: one rank-``r`` projection per (token block, slot), gate fused in.

Forward: ``U[t, s] = A_e x[t]`` and ``S[t, s] = scaling * gate[t, s] * U[t, s]`` for the
expert ``e`` of slot ``s``. Backward (``dY`` in place of ``x``, ``B_e^T`` in place of
``A_e``): ``dH[t, s] = B_e^T dY[t]``, and the epilogue turns it straight into
``dU = scaling * gate * dH`` and ``dgate[t, s] = scaling * <U[t, s], dH[t, s]>``. A
program owns one slot's whole rank, so both epilogues need no cross-program reduction;
they are linear in the accumulator, so for few tokens (decode) the reduction over ``in``
is split among ``SPLIT_K`` programs that add their partial results atomically into zeroed
buffers. The ``[T, slots * r]`` intermediates are fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import block_r, num_splits, shrink_configs, token_bucket
from .routing import Routing
from .tiles import slot_expert, token_block


@triton.autotune(
    configs=shrink_configs(),
    key=["m_bucket", "K", "rank", "num_slots", "BACKWARD", "SPLIT_K"],
    reset_to_zero=["u_out_ptr", "s_ptr", "dgate_ptr"],
)
@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, K]
    w_ptr,  # [E, r, K] read through (stride_we, stride_wr, stride_wk)
    gate_ptr,  # [T, slots]
    ids_ptr,  # [T, slots] int32, top-k only
    perm_ptr,  # [T] int32, top-k only
    block_start_ptr,  # [blocks] int32, top-k only
    block_end_ptr,  # [blocks] int32, top-k only
    u_in_ptr,  # [T, slots * r] fp32: U, read (backward)
    u_out_ptr,  # [T, slots * r] fp32: U, written (forward with SAVE_U)
    s_ptr,  # [T, slots * r] fp32: S (forward) or dU (backward)
    dgate_ptr,  # [T, slots] fp32, backward only
    num_tokens,
    K,
    rank,
    num_slots,
    scaling,
    stride_xm,
    stride_we,
    stride_wr,
    stride_wk,
    m_bucket,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SEGMENTED: tl.constexpr,
    BACKWARD: tl.constexpr,
    SAVE_U: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    slot = tl.program_id(1)
    k_chunk = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = tl.program_id(2) * k_chunk
    k_end = tl.minimum(k_start + k_chunk, K)
    rows, row_mask, lead = token_block(
        block, perm_ptr, block_start_ptr, block_end_ptr, num_tokens, BLOCK_M, SEGMENTED
    )
    expert = slot_expert(lead, slot, ids_ptr, num_slots, SEGMENTED)

    offs_r = tl.arange(0, BLOCK_R)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    r_mask = offs_r < rank
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + expert * stride_we + offs_r[None, :] * stride_wr + offs_k[:, None] * stride_wk  # [BK, BR]
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, k_end - k_start, BLOCK_K):
        k_mask = offs_k + k0 < k_end
        x_tile = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(x_tile, w_tile, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk

    inter = rows[:, None] * (num_slots * rank) + slot * rank + offs_r[None, :]  # [BM, BR]
    inter_mask = row_mask[:, None] & r_mask[None, :]
    weight = tl.load(gate_ptr + rows * num_slots + slot, mask=row_mask, other=0.0).to(tl.float32) * scaling
    if BACKWARD:
        unscaled = tl.load(u_in_ptr + inter, mask=inter_mask, other=0.0)
        _put(dgate_ptr + rows * num_slots + slot, tl.sum(unscaled * acc, axis=1) * scaling, row_mask, SPLIT_K)
    elif SAVE_U:
        _put(u_out_ptr + inter, acc, inter_mask, SPLIT_K)
    _put(s_ptr + inter, acc * weight[:, None], inter_mask, SPLIT_K)


@triton.jit
def _put(ptrs, values, mask, SPLIT_K: tl.constexpr):
    """Stores a result, or adds a partial one when the reduction is split."""
    if SPLIT_K > 1:
        tl.atomic_add(ptrs, values, mask=mask)
    else:
        tl.store(ptrs, values, mask=mask)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: tf32 for fp32 inputs only where torch allows it for matmuls."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _launch(
    inp: torch.Tensor,
    weight: torch.Tensor,
    weight_strides: tuple[int, int, int],
    rank: int,
    gate: torch.Tensor,
    routing: Routing,
    scaling: float,
    unscaled: torch.Tensor | None,
    result: torch.Tensor,
    dgate: torch.Tensor | None,
    backward: bool,
    split_k: int,
) -> None:
    grid = (routing.num_blocks, routing.num_slots, split_k)
    _shrink_kernel[grid](
        inp,
        weight,
        gate,
        *routing.kernel_tensors(gate),
        unscaled if backward else result,
        unscaled if unscaled is not None and not backward else result,
        result,
        dgate if dgate is not None else result,
        routing.num_tokens,
        inp.shape[1],
        rank,
        routing.num_slots,
        float(scaling),
        inp.stride(0),
        *weight_strides,
        token_bucket(routing.num_tokens),
        BLOCK_M=routing.block_m,
        BLOCK_R=block_r(rank),
        SEGMENTED=routing.segmented,
        BACKWARD=backward,
        SAVE_U=unscaled is not None,
        SPLIT_K=split_k,
        PRECISION=dot_precision(inp.dtype),
    )


def _split_k(routing: Routing, K: int, device: torch.device) -> int:
    return num_splits(routing.num_blocks * routing.num_slots, triton.cdiv(K, 128), device)


def _buffer(like: torch.Tensor, shape: tuple[int, ...], zeroed: bool) -> torch.Tensor:
    """An fp32 buffer; zeroed when split programs add into it."""
    if zeroed:
        return like.new_zeros(shape, dtype=torch.float32)
    return like.new_empty(shape, dtype=torch.float32)


def shrink(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    gate: torch.Tensor,
    routing: Routing,
    scaling: float,
    *,
    save_unscaled: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Forward shrink with the gate fused into its epilogue.

    Args:
        x: ``[T, in]`` with unit column stride.
        lora_A: ``[E, r, in]`` contiguous.
        gate: ``[T, slots]`` contiguous.
        routing: the call's token blocks.
        scaling: ``alpha / r``.
        save_unscaled: also return ``U`` (needed by the backward's ``dgate``).

    Returns:
        ``U`` or None, and ``S``; both ``[T, slots * r]`` fp32.
    """
    rank = lora_A.shape[1]
    split_k = _split_k(routing, x.shape[1], x.device)
    shape = (routing.num_tokens, routing.num_slots * rank)
    gated = _buffer(x, shape, split_k > 1)
    unscaled = _buffer(x, shape, split_k > 1) if save_unscaled else None
    strides = (lora_A.stride(0), lora_A.stride(1), lora_A.stride(2))
    _launch(x, lora_A, strides, rank, gate, routing, scaling, unscaled, gated, None, False, split_k)
    return unscaled, gated


def shrink_grad(
    grad_out: torch.Tensor,
    lora_B: torch.Tensor,
    gate: torch.Tensor,
    unscaled: torch.Tensor,
    routing: Routing,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward shrink ``dH = dY B_e`` with ``dU`` and ``dgate`` in its epilogue.

    Args:
        grad_out: ``[T, out]`` with unit column stride.
        lora_B: ``[E, out, r]`` contiguous, read as ``[E, r, out]``.
        gate: ``[T, slots]`` contiguous.
        unscaled: ``U`` ``[T, slots * r]`` fp32 from the forward.
        routing: the call's token blocks.
        scaling: ``alpha / r``.

    Returns:
        ``dU [T, slots * r]`` and ``dgate [T, slots]``, both fp32.
    """
    rank = lora_B.shape[2]
    split_k = _split_k(routing, grad_out.shape[1], grad_out.device)
    grad_unscaled = _buffer(unscaled, tuple(unscaled.shape), split_k > 1)
    grad_gate = _buffer(unscaled, (routing.num_tokens, routing.num_slots), split_k > 1)
    strides = (lora_B.stride(0), lora_B.stride(2), lora_B.stride(1))
    _launch(grad_out, lora_B, strides, rank, gate, routing, scaling, unscaled, grad_unscaled, grad_gate, True, split_k)
    return grad_unscaled, grad_gate
