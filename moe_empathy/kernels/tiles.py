"""Triton helpers shared by the kernels: the rows of a token block and a slot's expert."""

import triton
import triton.language as tl


@triton.jit
def token_block(
    block,
    perm_ptr,
    block_start_ptr,
    block_end_ptr,
    num_tokens,
    BLOCK_M: tl.constexpr,
    SEGMENTED: tl.constexpr,
):
    """Rows of token block ``block``.

    Returns:
        ``rows [BLOCK_M]`` int64 token indices, ``mask [BLOCK_M]`` the valid ones, and ``lead``,
        the block's first token (whose expert ids the whole block shares).
    """
    offs = tl.arange(0, BLOCK_M)
    if SEGMENTED:
        start = tl.load(block_start_ptr + block)
        end = tl.load(block_end_ptr + block)
        mask = start + offs < end
        rows = tl.load(perm_ptr + start + offs, mask=mask, other=0).to(tl.int64)
        lead = tl.load(perm_ptr + start)
    else:
        rows = (block * BLOCK_M + offs).to(tl.int64)
        mask = rows < num_tokens
        lead = block * BLOCK_M
    return rows, mask, lead


@triton.jit
def slot_expert(lead, slot, ids_ptr, num_slots, SEGMENTED: tl.constexpr):
    """Expert of ``slot`` for the block led by token ``lead`` (dense: the slot itself)."""
    if SEGMENTED:
        expert = tl.load(ids_ptr + lead * num_slots + slot)
    else:
        expert = slot
    return expert
