"""Launch configurations of the multi-LoRA kernels.

On a GPU each kernel is autotuned over a few configurations, keyed on the problem's
shape (tokens bucketed to a power of two, so a new batch size does not retune).
Triton's CPU interpreter (``TRITON_INTERPRET=1``) cannot autotune over more than one
configuration, so there each kernel gets one fixed configuration with big blocks: every
``tl.dot`` step costs milliseconds there.

The token block ``BLOCK_M`` is not autotuned: the sparse routing table is cut into
blocks of that size before any launch, and every kernel of a call shares it.
"""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Set to force a split count (the tests use it to run the atomic split paths under the interpreter).
FORCE_SPLIT: int | None = None


def block_m(num_tokens: int) -> int:
    """Token block for ``num_tokens`` rows: small for decode, 64 (32 interpreted) beyond."""
    cap = 32 if INTERPRET else 64
    return max(16, min(cap, triton.next_power_of_2(max(num_tokens, 1))))


def block_r(rank: int) -> int:
    """One expert's rank padded to a power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(rank))


def token_bucket(num_tokens: int) -> int:
    """Autotune key for the token count: the next power of two."""
    return triton.next_power_of_2(max(num_tokens, 1))


def num_splits(programs: int, max_split: int, device: torch.device) -> int:
    """Ways to split a reduction so that ``programs`` tiles fill about twice the GPU's SMs.

    Args:
        programs: programs the launch has without splitting.
        max_split: most splits the reduction allows.
        device: where it runs (1 off CUDA and under the interpreter, unless ``FORCE_SPLIT``).
    """
    if FORCE_SPLIT is not None:
        return FORCE_SPLIT
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(max_split, triton.cdiv(2 * sms, programs), 32))


def shrink_configs() -> list[triton.Config]:
    """Configurations of the shrink kernels (reduction over ``in`` in ``BLOCK_K`` steps)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_K": 128}, num_warps=4)]
    return [
        triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bk, w, s in [(32, 4, 3), (64, 4, 3), (128, 4, 3), (256, 4, 2), (128, 8, 3), (256, 8, 3)]
    ]


def expand_configs() -> list[triton.Config]:
    """Configurations of the expand kernel (``BLOCK_N`` output columns a program)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 128}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (256, 4, 2)]
    ]


def weight_grad_configs() -> list[triton.Config]:
    """Configurations of the weight-gradient kernel (``BLOCK_N`` columns a program)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 128}, num_warps=4)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn, w, s in [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 2)]
    ]
