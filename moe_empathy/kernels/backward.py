"""Weight-gradient kernel: ``dW_e = sum over (t, s) routed to e of L[t, s]^T R[t]``.

``dA_e [r, in]`` takes ``L = dU`` and ``R = x``; ``dB_e`` takes ``L = S`` and ``R = dY``
and is stored transposed (``[r, out]`` tiles into ``[out, r]``). A program owns one
expert and ``BLOCK_N`` columns and walks the token blocks, skipping the (block, slot)
pairs routed elsewhere; with ``SPLIT > 1`` the blocks are shared out among ``SPLIT``
programs that add their partial sums atomically (fp32), to fill the GPU when the
weights are small.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .configs import block_r, num_splits, token_bucket, weight_grad_configs
from .routing import Routing
from .shrink import dot_precision
from .tiles import slot_expert, token_block


@triton.autotune(configs=weight_grad_configs(), key=["m_bucket", "N", "rank", "num_slots"], reset_to_zero=["dw_ptr"])
@triton.jit
def _weight_grad_kernel(
    lhs_ptr,  # [T, slots * r] fp32
    rhs_ptr,  # [T, N]
    ids_ptr,  # [T, slots] int32, top-k only
    perm_ptr,  # [T] int32, top-k only
    block_start_ptr,  # [blocks] int32, top-k only
    block_end_ptr,  # [blocks] int32, top-k only
    dw_ptr,  # [E, r, N] fp32, zeroed, written through (stride_de, stride_dr, stride_dn)
    num_tokens,
    num_blocks,
    N,
    rank,
    num_slots,
    stride_rm,
    stride_de,
    stride_dr,
    stride_dn,
    m_bucket,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    SPLIT: tl.constexpr,
    SEGMENTED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    expert = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r_mask = offs_r < rank
    n_mask = offs_n < N

    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for block in range(split, num_blocks, SPLIT):
        rows, row_mask, lead = token_block(
            block, perm_ptr, block_start_ptr, block_end_ptr, num_tokens, BLOCK_M, SEGMENTED
        )
        rhs_ptrs = rhs_ptr + rows[:, None] * stride_rm + offs_n[None, :]  # [BM, BN]
        lhs_rows = lhs_ptr + rows[:, None] * (num_slots * rank) + offs_r[None, :]  # [BM, BR] at slot 0
        lhs_mask = row_mask[:, None] & r_mask[None, :]
        if SEGMENTED:
            for slot in range(0, num_slots):
                if slot_expert(lead, slot, ids_ptr, num_slots, SEGMENTED) == expert:
                    rhs = tl.load(rhs_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
                    lhs = tl.load(lhs_rows + slot * rank, mask=lhs_mask, other=0.0).to(rhs.dtype)
                    acc = tl.dot(tl.trans(lhs), rhs, acc, input_precision=PRECISION)
        else:
            rhs = tl.load(rhs_ptrs, mask=row_mask[:, None] & n_mask[None, :], other=0.0)
            lhs = tl.load(lhs_rows + expert * rank, mask=lhs_mask, other=0.0).to(rhs.dtype)
            acc = tl.dot(tl.trans(lhs), rhs, acc, input_precision=PRECISION)

    dw_ptrs = dw_ptr + expert * stride_de + offs_r[:, None] * stride_dr + offs_n[None, :] * stride_dn  # [BR, BN]
    dw_mask = r_mask[:, None] & n_mask[None, :]
    if SPLIT > 1:
        tl.atomic_add(dw_ptrs, acc, mask=dw_mask)
    else:
        tl.store(dw_ptrs, acc, mask=dw_mask)


def _launch(
    lhs: torch.Tensor,
    rhs: torch.Tensor,
    num_experts: int,
    rank: int,
    routing: Routing,
    grad_w: torch.Tensor,
    dw_strides: tuple[int, int, int],
) -> None:
    n = rhs.shape[1]
    split = num_splits(num_experts * triton.cdiv(n, 128), max(1, routing.num_blocks // 2), rhs.device)

    def grid(meta):
        return (num_experts, triton.cdiv(n, meta["BLOCK_N"]), split)

    _weight_grad_kernel[grid](
        lhs,
        rhs,
        *routing.kernel_tensors(lhs),
        grad_w,
        routing.num_tokens,
        routing.num_blocks,
        n,
        rank,
        routing.num_slots,
        rhs.stride(0),
        *dw_strides,
        token_bucket(routing.num_tokens),
        BLOCK_M=routing.block_m,
        BLOCK_R=block_r(rank),
        SPLIT=split,
        SEGMENTED=routing.segmented,
        PRECISION=dot_precision(rhs.dtype),
    )


def grad_lora_A(
    grad_unscaled: torch.Tensor, x: torch.Tensor, num_experts: int, rank: int, routing: Routing
) -> torch.Tensor:
    """``dA [E, r, in]`` (fp32) from ``dU [T, slots * r]`` and ``x [T, in]``."""
    grad_a = torch.zeros(num_experts, rank, x.shape[1], device=x.device, dtype=torch.float32)
    strides = (grad_a.stride(0), grad_a.stride(1), grad_a.stride(2))
    _launch(grad_unscaled, x, num_experts, rank, routing, grad_a, strides)
    return grad_a


def grad_lora_B(
    gated: torch.Tensor, grad_out: torch.Tensor, num_experts: int, rank: int, routing: Routing
) -> torch.Tensor:
    """``dB [E, out, r]`` (fp32) from ``S [T, slots * r]`` and ``dY [T, out]``."""
    grad_b = torch.zeros(num_experts, grad_out.shape[1], rank, device=grad_out.device, dtype=torch.float32)
    strides = (grad_b.stride(0), grad_b.stride(2), grad_b.stride(1))  # [out, r] written as [r, out]
    _launch(gated, grad_out, num_experts, rank, routing, grad_b, strides)
    return grad_b
