"""The inputs of one multi-LoRA call: their shapes, their checks and their top-k form, in one place.

:func:`~moe_empathy.kernels.multi_lora` gathers its arguments into a :class:`MultiLoraInputs`,
checks it once, and hands it to a backend: the Triton launcher reads it as it is, the torch
reference reads its dense gate.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from .reference import densify_gate

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class MultiLoraInputs:
    """The arguments of one call of :func:`~moe_empathy.kernels.multi_lora`.

    Attributes:
        x: ``[tokens, in]`` inputs.
        lora_A: ``[E, r, in]`` stacked down-projections.
        lora_B: ``[E, out, r]`` stacked up-projections.
        gate: ``[tokens, E]`` (dense) or ``[tokens, k]`` with ``expert_ids`` (top-k).
        scaling: ``alpha / r``.
        expert_ids: ``[tokens, k]`` integer expert ids for top-k routing, or None for dense.
        out: ``[tokens, out]`` accumulated into when given (the base layer's output).
    """

    x: torch.Tensor
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    gate: torch.Tensor
    scaling: float
    expert_ids: torch.Tensor | None = None
    out: torch.Tensor | None = None

    def dense_gate(self) -> torch.Tensor:
        """``[tokens, E]`` weights over all experts: the gate itself, or top-k scattered (zeros elsewhere)."""
        if self.expert_ids is None:
            return self.gate
        return densify_gate(self.gate, self.expert_ids, self.lora_A.shape[0])

    def check(self) -> None:
        """Raises ``ValueError`` naming the first problem: types, one device, ranks of the
        tensors, dtypes, shapes agreeing, expert ids in ``[0, E)`` (one read-back to the host)."""
        x, lora_A, lora_B, gate, expert_ids, out = self.x, self.lora_A, self.lora_B, self.gate, self.expert_ids, self.out
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
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, numbers.Real):
            raise ValueError(f"scaling must be a real number, got {self.scaling!r}")

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
