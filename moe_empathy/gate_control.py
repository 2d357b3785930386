"""Steering and watching the gate from outside: forced mixtures, experts off, merged
mixtures and the routing log, as methods of the gated model (:class:`GateControlMixin`, in
the manner of transformers' ``PeftAdapterMixin``).

:func:`forced_mixture` turns what a user gives ``force_gate`` (an expert name, weights, one
choice per row) into checked weights; :class:`RoutingLog` records every decided turn's
mixture for study (``enable_routing_log``).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterator, Mapping, Sequence

import torch
from transformers import PreTrainedModel

from .gate import GateOutput
from .utils import atomic_write_text

if TYPE_CHECKING:
    from .modeling_moe_empathy import MoeEmpathyForCausalLM

ForcedSpec = str | Sequence[str] | Sequence[float] | Mapping[str, float] | torch.Tensor


def forced_mixture(spec: ForcedSpec, names: Sequence[str]) -> torch.Tensor:
    """``[E]`` weights for every row, or ``[batch, E]`` one mixture per row.

    Args:
        spec: an expert name; a list of names (one per row); weights over the experts (a list,
            a tensor, or ``{name: weight}``, >= 0 and summing to 1); or a ``[batch, E]`` tensor.
        names: the model's expert names, in order.
    """
    names = list(names)
    one_name = isinstance(spec, str)
    if one_name or (isinstance(spec, Sequence) and len(spec) and all(isinstance(n, str) for n in spec)):
        chosen = [spec] if one_name else list(spec)
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            raise ValueError(f"unknown expert(s) {unknown}; the experts are {names}")
        weights = torch.eye(len(names))[[names.index(n) for n in chosen]]  # [rows, E]
        return weights[0] if one_name else weights
    if isinstance(spec, Sequence) and any(isinstance(n, str) for n in spec):
        raise ValueError(
            f"force_gate got a list mixing expert names and numbers ({list(spec)!r}); give either expert "
            f"names (one per row) or numbers (one weight per expert {names})"
        )
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(names)
        if unknown:
            raise ValueError(f"unknown experts {sorted(unknown)}; the experts are {names}")
        spec = [float(spec.get(name, 0.0)) for name in names]
    weights = torch.as_tensor(spec, dtype=torch.float32)
    if weights.dim() > 2 or weights.shape[-1:] != (len(names),):
        raise ValueError(
            f"force_gate needs {len(names)} weights, one per expert {names}, or a [batch, {len(names)}] tensor "
            f"of one mixture per row; got shape {tuple(weights.shape)}"
        )
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"force_gate weights must be finite and >= 0, got {weights.tolist()}")
    if (weights.sum(-1) - 1.0).abs().max() > 1e-4:
        raise ValueError(f"force_gate weights must sum to 1 (per row), got {weights.tolist()}")
    return weights


@dataclass
class RoutingRecord:
    """One turn's gate decision, as kept by the routing log."""

    call: int
    dialogue: int
    turn: int
    weights: dict[str, float]
    expert: str
    forced: bool = False


class RoutingLog:
    """The decisions of every turn the gate decided since the log was started.

    Args:
        names: the model's expert names, in order.
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.records: list[RoutingRecord] = []
        self.calls = 0  # forwards seen, deciding or not

    def add(self, gate: GateOutput | None, forced: bool) -> None:
        """Records the turns decided in one forward (none when it continued a decided turn).

        Args:
            gate: the forward's gate output, or None.
            forced: whether the mixture was forced.
        """
        if gate is not None:
            weights = gate.weights.detach().float().cpu()  # [batch, turns, E]
            for dialogue, turn in gate.fresh.nonzero().tolist():
                row = weights[dialogue, turn]
                self.records.append(
                    RoutingRecord(
                        call=self.calls,
                        dialogue=dialogue,
                        turn=turn,
                        weights={name: float(w) for name, w in zip(self.names, row)},
                        expert=self.names[int(row.argmax())],
                        forced=forced,
                    )
                )
        self.calls += 1

    def save(self, path: str | os.PathLike) -> None:
        """Writes the log as JSON (atomically).

        Args:
            path: the JSON file to write.
        """
        records = [asdict(record) for record in self.records]
        atomic_write_text(path, json.dumps({"expert_names": self.names, "records": records}, indent=1))


class GateControlMixin:
    """The gated model's controls. The model provides ``config``, ``model`` (the base),
    ``experts`` (``{path in model: MultiLoraLinear}``), ``_routing_hooks`` (:class:`~moe_empathy.dispatch.RoutingHooks`) and the state these
    methods switch: ``_forced``, ``_label_share``, ``_experts_disabled``, ``_merged`` and ``_routing_log``."""

    @contextmanager
    def force_gate(self, expert: ForcedSpec) -> Iterator["MoeEmpathyForCausalLM"]:
        """Uses a fixed mixture for every turn: one expert by name (external selection, as in
        the paper) or weights over all experts (a list, a tensor, or ``{name: weight}``); or one
        choice per row of the batch: a list of expert names or a ``[batch, E]`` tensor.

        Args:
            expert: an expert name, mixture weights (>= 0, summing to 1), or one of either per row.
        """
        weights = forced_mixture(expert, self.config.expert_names)
        previous, self._forced = self._forced, weights
        try:
            yield self
        finally:
            self._forced = previous

    @contextmanager
    def route_by_labels(self, share: float = 1.0) -> Iterator["MoeEmpathyForCausalLM"]:
        """Inside the block, a forward given ``gate_labels`` routes each labelled turn to its
        labelled expert (teacher routing, for training the experts apart): the turn's mixture
        is ``share x one_hot(label) + (1 - share) x`` the gate's. The gate still decides and
        reports its own weights, so its losses and accuracy are those of its own choice.

        Args:
            share: the label's share of the routing, in ``[0, 1]`` (1 = hard by label).
        """
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"route_by_labels takes a share in [0, 1] (1 = hard by label), got {share}")
        previous, self._label_share = self._label_share, float(share)
        try:
            yield self
        finally:
            self._label_share = previous

    @contextmanager
    def disable_experts(self) -> Iterator["MoeEmpathyForCausalLM"]:
        """Runs exactly the base model (no gate, no expert) inside the block."""
        previous, self._experts_disabled = self._experts_disabled, True
        try:
            yield self
        finally:
            self._experts_disabled = previous

    def enable_routing_log(self) -> None:
        """Starts recording every turn's gate decision (see :attr:`routing_log`)."""
        self._routing_log = RoutingLog(self.config.expert_names)

    def disable_routing_log(self) -> list[RoutingRecord]:
        """Stops recording and returns what was recorded."""
        log, self._routing_log = self._routing_log, None
        return log.records if log is not None else []

    @property
    def routing_log(self) -> list[RoutingRecord]:
        if self._routing_log is None:
            raise RuntimeError("the routing log is off; call model.enable_routing_log() first")
        return self._routing_log.records

    def save_routing_log(self, path: str | os.PathLike) -> None:
        """Writes the routing log as JSON (atomically).

        Args:
            path: the JSON file to write.
        """
        if self._routing_log is None:
            raise RuntimeError("the routing log is off; call model.enable_routing_log() first")
        self._routing_log.save(path)

    # ----------------------------------------------------------------- merging (as peft's LoRA)

    def merge_adapter(self, expert: ForcedSpec, safe_merge: bool = False) -> None:
        """Folds one mixture of the experts into the base weights: the model then runs as a plain
        base model holding that mixture (no gate, no expert GEMM) until :meth:`unmerge_adapter`.

        Args:
            expert: one expert name or one mixture over the experts, as for :meth:`force_gate`.
            safe_merge: first build every merged weight in a copy and check that it is finite; when
                one is not, a ValueError names the problem and no layer has changed.
        """
        mixture = forced_mixture(expert, self.config.expert_names)
        if mixture.dim() != 1:
            raise ValueError("merge_adapter folds one mixture for every row; give one expert name or one set of weights")
        if self._merged:
            raise RuntimeError("a mixture is already merged; call unmerge_adapter() before merging another")
        if safe_merge:  # every layer is checked before any changes
            for linear in self.experts.values():
                linear.checked_merged_weight(mixture)
        for linear in self.experts.values():
            linear.merge(mixture)
        self._merged = True

    def unmerge_adapter(self) -> None:
        """Takes the merged mixture out of the base weights again (equal up to rounding)."""
        if not self._merged:
            raise RuntimeError("no mixture is merged; merge_adapter() merges one")
        for linear in self.experts.values():
            linear.unmerge()
        self._merged = False

    def merge_and_unload(self, expert: ForcedSpec, safe_merge: bool = False) -> PreTrainedModel:
        """Merges one mixture and returns the base model alone, its expert linears replaced by
        plain ``nn.Linear`` layers holding the merged weights (this model is unusable afterwards).

        Args:
            expert, safe_merge: as for :meth:`merge_adapter`.
        """
        self.merge_adapter(expert, safe_merge=safe_merge)
        for path, linear in self.experts.items():
            parent, leaf = path.rsplit(".", 1)
            setattr(self.model.get_submodule(parent), leaf, linear.base_layer)
        self._routing_hooks.remove()
        self.experts = {}
        return self.model

