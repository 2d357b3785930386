"""Expand kernel: ``Y[t] (+)= sum_s S[t, s] W_e(s)^T`` over the slots of a token block.

Forward: ``S`` is the gated shrink output and ``W_e = B_e [out, r]``; the result is added
to the base layer's output in fp32 and stored once (in place, or into a new tensor), so no
``[T, out]`` delta is ever materialised. Backward: ``S`` is ``dU`` and ``W_e = A_e^T [in, r]``, giving ``dx``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import block_r, expand_configs, token_bucket
from .routing import Routing
from .shrink import dot_precision
from .tiles import slot_expert, token_block


@triton.autotune(
    configs=expand_configs(),
    key=["m_bucket", "N", "rank", "num_slots", "ACCUMULATE"],
    restore_value=["y_ptr"],
)
@triton.jit
def _expand_kernel(
    s_ptr,  # [T, slots * r] fp32
    w_ptr,  # [E, N, r] read through (stride_we, stride_wn, stride_wr)
    ids_ptr,  # [T, slots] int32, top-k only
    perm_ptr,  # [T] int32, top-k only
    block_start_ptr,  # [blocks] int32, top-k only
    block_end_ptr,  # [blocks] int32, top-k only
    base_ptr,  # [T, N] added in when ACCUMULATE (may be y_ptr itself)
    y_ptr,  # [T, N]
    num_tokens,
    N,
    rank,
    num_slots,
    stride_bm,
    stride_ym,
    stride_we,
    stride_wn,
    stride_wr,
    m_bucket,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SEGMENTED: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    block = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows, row_mask, lead = token_block(
        block, perm_ptr, block_start_ptr, block_end_ptr, num_tokens, BLOCK_M, SEGMENTED
    )
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = offs_r < rank
    n_mask = offs_n < N
    s_mask = row_mask[:, None] & r_mask[None, :]
    w_mask = r_mask[:, None] & n_mask[None, :]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for slot in range(0, num_slots):
        expert = slot_expert(lead, slot, ids_ptr, num_slots, SEGMENTED)
        s_ptrs = s_ptr + rows[:, None] * (num_slots * rank) + slot * rank + offs_r[None, :]  # [BM, BR]
        w_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_r[:, None] * stride_wr  # [BR, BN]
        w_tile = tl.load(w_ptrs, mask=w_mask, other=0.0)
        s_tile = tl.load(s_ptrs, mask=s_mask, other=0.0).to(w_tile.dtype)
        acc = tl.dot(s_tile, w_tile, acc, input_precision=PRECISION)

    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]  # [BM, BN]
    y_mask = row_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        base_ptrs = base_ptr + rows[:, None] * stride_bm + offs_n[None, :]  # [BM, BN]
        acc += tl.load(base_ptrs, mask=y_mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


def _launch(
    inter: torch.Tensor,
    weight: torch.Tensor,
    weight_strides: tuple[int, int, int],
    rank: int,
    routing: Routing,
    base: torch.Tensor | None,
    y: torch.Tensor,
) -> None:
    def grid(meta):
        return (routing.num_blocks, triton.cdiv(y.shape[1], meta["BLOCK_N"]))

    _expand_kernel[grid](
        inter,
        weight,
        *routing.kernel_tensors(inter),
        base if base is not None else y,
        y,
        routing.num_tokens,
        y.shape[1],
        rank,
        routing.num_slots,
        base.stride(0) if base is not None else 0,
        y.stride(0),
        *weight_strides,
        token_bucket(routing.num_tokens),
        BLOCK_M=routing.block_m,
        BLOCK_R=block_r(rank),
        SEGMENTED=routing.segmented,
        ACCUMULATE=base is not None,
        PRECISION=dot_precision(weight.dtype),
    )


def expand(
    gated: torch.Tensor,
    lora_B: torch.Tensor,
    routing: Routing,
    base: torch.Tensor | None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward expand: ``out = base + S B^T`` (or ``S B^T`` without ``base``).

    Args:
        gated: ``S [T, slots * r]`` fp32 from :func:`~.shrink.shrink`.
        lora_B: ``[E, out, r]`` contiguous.
        routing: the call's token blocks.
        base: ``[T, out]`` with unit column stride, or None.
        out: ``[T, out]`` with unit column stride to write (``base`` itself to add in place),
            or None for a new tensor in ``lora_B``'s dtype.

    Returns:
        ``out``.
    """
    if out is None:
        out = lora_B.new_empty(routing.num_tokens, lora_B.shape[1])
    strides = (lora_B.stride(0), lora_B.stride(1), lora_B.stride(2))
    _launch(gated, lora_B, strides, lora_B.shape[2], routing, base, out)
    return out


def expand_grad_input(grad_unscaled: torch.Tensor, lora_A: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Backward ``dx[t] = sum_s dU[t, s] A_e(s)``.

    Args:
        grad_unscaled: ``dU [T, slots * r]`` fp32.
        lora_A: ``[E, r, in]`` contiguous, read as ``[E, in, r]``.
        routing: the call's token blocks.

    Returns:
        ``dx [T, in]`` in ``lora_A``'s dtype.
    """
    grad_x = lora_A.new_empty(routing.num_tokens, lora_A.shape[2])
    strides = (lora_A.stride(0), lora_A.stride(2), lora_A.stride(1))
    _launch(grad_unscaled, lora_A, strides, lora_A.shape[1], routing, None, grad_x)
    return grad_x
