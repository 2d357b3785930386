"""The routing plan: the gate's decision spread over the tokens of one forward, built once.

The model builds one :class:`RoutingPlan` per forward, right after the gate (or, while
decoding the reply of an already decided turn, reuses the plan stored on the gate's state),
and every expert linear reads it from the model's :class:`RoutingSlot`. Nothing is
re-derived, re-validated or compared per layer, and a decode step reads nothing back from
the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RoutingPlan:
    """Per-token expert weights for one forward, in every form the expert layers consume.

    Args:
        weights: ``[batch, seq, E]`` dense weights (zero outside the chosen experts and on padding).
        expert_ids: ``[batch, seq, k]`` chosen experts of a top-k gate, else None.
        topk_weights: ``[batch, seq, k]`` their weights, else None.
        fold: ``[E]`` the one mixture shared by every non-padding token (batch of one turn, or a
            forced gate) that inference may fold into the base weights, else None.
        fold_key: a hashable copy of ``fold`` that identifies a folded weight, else None.
    """

    weights: torch.Tensor
    expert_ids: torch.Tensor | None = None
    topk_weights: torch.Tensor | None = None
    fold: torch.Tensor | None = None
    fold_key: tuple | None = None
    _row_scales: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.weights.dim() != 3:
            raise ValueError(f"routing weights must be [batch, seq, experts], got shape {tuple(self.weights.shape)}")
        if (self.expert_ids is None) != (self.topk_weights is None):
            raise ValueError("a top-k routing plan needs both expert_ids and topk_weights")

    @classmethod
    def build(cls, weights: torch.Tensor, valid: torch.Tensor, top_k: int | None, may_fold: bool) -> "RoutingPlan":
        """Plans a forward from its per-token weights.

        Args:
            weights: ``[batch, seq, E]`` per-token mixture (zero on padding).
            valid: ``[batch, seq]`` True on real (non-padding) tokens.
            top_k: keep ``k`` experts per token for the kernels' sparse path, or None for dense.
            may_fold: look for one mixture shared by all tokens (inference only: one host read-back).
        """
        expert_ids = topk_weights = None
        if top_k is not None:
            topk_weights, expert_ids = weights.topk(top_k, dim=-1)  # [batch, seq, k]
        fold = fold_key = None
        if may_fold:
            rows = weights[valid]  # [tokens, E]
            if rows.shape[0] and bool((rows == rows[0]).all()):
                fold, fold_key = rows[0], tuple(rows[0].tolist())
        return cls(weights, expert_ids, topk_weights, fold, fold_key)

    def row_scale(self, rank: int, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        """``[tokens, E*r]`` factors of the experts' shrink outputs, computed once for all layers.

        Args:
            rank, scaling: the expert layers' LoRA rank and ``alpha / r``.
            dtype: the activations' dtype.
        """
        key = (rank, scaling, dtype)
        if key not in self._row_scales:
            from .kernels.reference import row_scale

            self._row_scales[key] = row_scale(self.weights.reshape(-1, self.weights.shape[-1]).to(dtype), rank, scaling)
        return self._row_scales[key]

    def repeat_tokens(self, seq: int) -> "RoutingPlan":
        """This one-token-per-row plan for ``seq`` tokens per row (several tokens of one turn).

        Args:
            seq: tokens per row.
        """
        if seq == self.weights.shape[1]:
            return self

        def widen(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, -1:].expand(-1, seq, -1)

        return RoutingPlan(widen(self.weights), widen(self.expert_ids), widen(self.topk_weights), self.fold, self.fold_key)


class RoutingSlot:
    """Where a model's expert linears find the plan of the decoder layer running now.

    The plan is set by the gate layer's pre-hook from that layer's keyword arguments and,
    under activation checkpointing, again by each expert layer's, so that the recomputation of
    a layer in backward sees the very same plan (:class:`~moe_empathy.dispatch.RoutingHooks`).
    """

    __slots__ = ("plan",)

    def __init__(self) -> None:
        self.plan: RoutingPlan | None = None
