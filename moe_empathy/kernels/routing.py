"""Token blocks of the multi-LoRA kernels: which rows a program reads, and its experts.

Every kernel works on *slots*: slot ``s`` of token ``t`` is one expert with one gate
weight. A dense mix over ``E`` experts has ``E`` slots and slot ``s`` is expert ``s``
for every token, so plain row blocks serve. Top-k routing has ``k`` slots whose experts
vary per token; the tokens are ordered (stably) by their tuple of expert ids, so that
equal tuples form contiguous segments (in our model: the tokens of the turns routed
alike), and each segment is cut into blocks of at most ``BLOCK_M`` tokens. All tokens of
a block then share their experts, and a program does plain GEMM tiles on rows gathered
through the permutation (SGMV's segments, with the gather in the kernel).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import configs


@dataclass
class Routing:
    """Row blocks shared by every kernel of one multi-LoRA call.

    Attributes:
        num_tokens: ``T``.
        num_slots: ``E`` (dense) or ``k`` (top-k).
        block_m: tokens a block holds at most.
        num_blocks: blocks in the grid's token axis.
        segmented: False for dense (block ``b`` is rows ``b*block_m ..``), True for top-k.
        expert_ids: ``[T, k]`` int32 ids (top-k only).
        perm: ``[T]`` int32 token order that makes equal id tuples contiguous (top-k only).
        block_start: ``[num_blocks]`` int32 first position in ``perm`` (top-k only).
        block_end: ``[num_blocks]`` int32 end position in ``perm``, exclusive (top-k only).
    """

    num_tokens: int
    num_slots: int
    block_m: int
    num_blocks: int
    segmented: bool
    expert_ids: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    block_start: torch.Tensor | None = None
    block_end: torch.Tensor | None = None

    def kernel_tensors(self, placeholder: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``expert_ids, perm, block_start, block_end`` as a kernel's pointer arguments; dense
        routing has none, so ``placeholder`` (a tensor on the kernel's device, never read) stands in."""
        if self.segmented:
            return self.expert_ids, self.perm, self.block_start, self.block_end
        return (placeholder,) * 4


def segment_blocks(expert_ids: torch.Tensor, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segments of tokens sharing their top-k expert ids, cut into blocks.

    Args:
        expert_ids: ``[T, k]`` integer ids (already checked to lie in ``[0, E)``).
        block_m: tokens a block holds at most.

    Returns:
        ``perm [T]``, ``block_start [blocks]`` and ``block_end [blocks]``, all int32 (see
        :class:`Routing`); the block count is read back to the host once.
    """
    num_tokens = expert_ids.shape[0]
    device = expert_ids.device
    ids = expert_ids.to(torch.int64)
    perm = torch.arange(num_tokens, device=device)
    for slot in reversed(range(ids.shape[1])):  # lexicographic order by successive stable sorts
        perm = perm[torch.argsort(ids[perm, slot], stable=True)]
    ordered = ids[perm]  # [T, k]
    new_segment = torch.ones(num_tokens, dtype=torch.bool, device=device)
    new_segment[1:] = (ordered[1:] != ordered[:-1]).any(dim=1)
    seg_start = new_segment.nonzero().squeeze(1)  # [segments]
    seg_end = torch.cat([seg_start[1:], seg_start.new_tensor([num_tokens])])
    blocks_per_seg = (seg_end - seg_start + block_m - 1) // block_m  # [segments]
    num_blocks = int(blocks_per_seg.sum())
    seg_of_block = torch.repeat_interleave(
        torch.arange(seg_start.numel(), device=device), blocks_per_seg, output_size=num_blocks
    )  # [blocks]
    first_block = torch.cumsum(blocks_per_seg, 0) - blocks_per_seg  # [segments]
    local = torch.arange(num_blocks, device=device) - first_block[seg_of_block]
    block_start = seg_start[seg_of_block] + local * block_m
    block_end = torch.minimum(block_start + block_m, seg_end[seg_of_block])
    return perm.to(torch.int32), block_start.to(torch.int32), block_end.to(torch.int32)


def make_routing(num_tokens: int, num_slots: int, tensors: list[torch.Tensor]) -> Routing:
    """The routing of one call from the tensors the custom ops pass around.

    Args:
        num_tokens: ``T``.
        num_slots: ``E`` (dense) or ``k`` (top-k).
        tensors: ``[]`` for dense, or ``[expert_ids, perm, block_start, block_end]`` (int32) for
            top-k, as returned by ``torch.ops.moe_empathy.token_blocks``.
    """
    bm = configs.block_m(num_tokens)
    if not tensors:
        return Routing(num_tokens, num_slots, bm, -(-num_tokens // bm), segmented=False)
    expert_ids, perm, block_start, block_end = tensors
    return Routing(num_tokens, num_slots, bm, block_start.numel(), True, expert_ids, perm, block_start, block_end)
