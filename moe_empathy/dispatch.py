"""How one forward is routed: decided once at ``gate_layer``, handed to every expert linear.

The model's forward builds one :class:`GateCall` (the forward's routing inputs) and passes it
to the decoder layers as the keyword argument ``ROUTING_KWARG``. Forward pre-hooks consume it
(:class:`RoutingHooks`):

* on decoder layer ``gate_layer``: the gate reads the hidden states entering the layer and
  decides every turn's mixture, the call's :class:`RoutingPlan` is built from it, once, and put
  into the :class:`RoutingSlot` the expert linears read;
* only while activation checkpointing is on, on each expert layer's ``self_attn``: the plan of
  the layer's own call goes into the slot again. The hook runs inside transformers' gradient
  checkpointing, which wraps the layer's ``forward``, so the recomputation in backward (after
  the forward has returned and emptied the slot) sees the very same plan. Without
  checkpointing there is nothing to recompute, and a decode step pays for no hook but the
  gate layer's.

A forward that continues the reply of an already decided turn (a decode step) gets the plan
kept on the gate's state (:func:`continuing_call`): nothing is derived, validated or read back
from the device per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from .configuration_moe_empathy import MoeEmpathyConfig
from .gate import GateOutput, GateState, TurnGate
from .layers import ROUTING_KWARG
from .losses import GateLosses, check_gate_labels, gate_losses
from .routing import RoutingPlan, RoutingSlot
from .turns import derive_turn_ids, validate_turn_ids


@dataclass
class GateCall:
    """One forward's routing inputs; the gate layer's pre-hook fills ``output`` and ``plan``.

    Args:
        gate: the model's gate.
        turn_ids: ``[batch, seq]`` each token's turn (-1 on padding), or None when continuing.
        gate_mask: ``[batch, seq]`` 1 on the tokens the gate may read, or None when continuing.
        state: the gate's state carried on the KV cache, or None.
        forced: ``[E]`` or ``[batch, E]`` a forced mixture (see ``force_gate``), or None.
        top_k: the experts kept per token for the kernels' sparse path, or None for dense.
        output: the gate's decision, once made.
        plan: the routing of this forward's tokens, once built (or given when continuing a turn).
        labels: ``[batch, turns]`` expert index of each turn (-100 = none) to route by, in
            training under ``route_by_labels``; None routes by the gate's own weights.
        label_share: the labels' share of each labelled turn's routing (1 = hard by label).
    """

    gate: TurnGate
    turn_ids: torch.Tensor | None
    gate_mask: torch.Tensor | None
    state: GateState | None
    forced: torch.Tensor | None
    top_k: int | None
    output: GateOutput | None = None
    plan: RoutingPlan | None = None
    labels: torch.Tensor | None = None
    label_share: float = 0.0


def routing_top_k(config: MoeEmpathyConfig, forced: torch.Tensor | None) -> int | None:
    """The experts a top-k gate keeps per token; None for a soft gate or a forced mixture."""
    return config.gate_top_k if config.gate_type == "top_k" and forced is None else None


def label_routing(weights: torch.Tensor, labels: torch.Tensor, share: float) -> torch.Tensor:
    """Routing weights that follow the turns' labels: on each labelled turn
    ``share x one_hot(label) + (1 - share) x`` the gate's weights; unlabelled turns keep the gate's.

    Args:
        weights: ``[batch, turns, E]`` the gate's weights.
        labels: ``[batch, turns]`` expert index of each turn, -100 (any negative) for none.
        share: in ``[0, 1]``.
    """
    if labels.shape != weights.shape[:2]:
        raise ValueError(
            f"gate_labels has shape {tuple(labels.shape)} but the input has {tuple(weights.shape[:2])} (batch, turns); "
            "give one label per turn of each row (-100 where a turn has none)"
        )
    one_hot = F.one_hot(labels.clamp(min=0), weights.shape[-1]).to(weights.dtype)  # [batch, turns, E]
    mixed = share * one_hot + (1.0 - share) * weights
    return torch.where((labels >= 0).unsqueeze(-1), mixed, weights)


def plan_turns(turn_weights: torch.Tensor, turn_ids: torch.Tensor, top_k: int | None, may_fold: bool) -> RoutingPlan:
    """Spreads each turn's mixture over its tokens.

    Args:
        turn_weights: ``[batch, turns, E]`` the gate's weights of each turn.
        turn_ids: ``[batch, seq]`` each token's turn, -1 on padding.
        top_k: see :attr:`GateCall.top_k`.
        may_fold: look for one mixture shared by all tokens (see :meth:`RoutingPlan.build`).
    """
    index = turn_ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, turn_weights.shape[-1])  # [batch, seq, E]
    valid = turn_ids >= 0  # [batch, seq]
    weights = turn_weights.gather(1, index) * valid.unsqueeze(-1)  # [batch, seq, E]
    return RoutingPlan.build(weights, valid, top_k, may_fold)


def deciding_call(
    gate: TurnGate,
    config: MoeEmpathyConfig,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    turn_ids: torch.Tensor | None,
    gate_mask: torch.Tensor | None,
    state: GateState | None,
    forced: torch.Tensor | None,
    gate_labels: torch.Tensor | None = None,
    label_share: float = 0.0,
) -> GateCall:
    """The call of a forward whose turns the gate decides (a prefill, a training batch).

    Args:
        gate, config: the model's gate and configuration.
        input_ids, inputs_embeds, attention_mask: the forward's inputs (one of the first two).
        turn_ids, gate_mask: as given to the forward; derived from the chat template's
            markers when ``turn_ids`` is None (without token ids the input is one turn).
        state: the gate's state carried on the KV cache, or None.
        forced: a forced mixture, or None.
        gate_labels, label_share: route the labelled turns by their labels with this share
            (:func:`label_routing`); ignored when ``label_share`` is 0 or there are no labels.
    """
    reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
    shape = tuple(reference.shape)
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = attention_mask[:, -shape[1] :]  # the mask also covers cached tokens
    if turn_ids is None:
        ids = input_ids if input_ids is not None else reference.new_zeros(shape, dtype=torch.long)
        markers = (config.user_turn_marker, config.assistant_turn_marker) if input_ids is not None else (None, None)
        last_turn = state.last_turn if state is not None else None
        turn_ids, derived_mask = derive_turn_ids(ids, *markers, attention_mask, last_turn)
        gate_mask = derived_mask if gate_mask is None else gate_mask
    else:
        validate_turn_ids(turn_ids, shape)
    if gate_mask is None:
        gate_mask = (turn_ids >= 0).long()
    elif tuple(gate_mask.shape) != shape:
        raise ValueError(f"gate_mask has shape {tuple(gate_mask.shape)} but input_ids has {shape}")
    device = reference.device
    labels = gate_labels.to(device) if gate_labels is not None and label_share > 0 and forced is None else None
    return GateCall(
        gate, turn_ids.to(device), gate_mask.to(device), state, forced, routing_top_k(config, forced), labels=labels, label_share=label_share
    )


def continuing_call(gate: TurnGate, config: MoeEmpathyConfig, state: GateState | None, seq: int, forced: torch.Tensor | None) -> GateCall:
    """The call of ``seq`` tokens per row that continue the turn open in ``state``; the turn's
    plan is built at its first decode step and kept on the state.

    Args:
        gate, config: the model's gate and configuration.
        state: the gate's state carried on the KV cache.
        seq: the forward's tokens per row.
        forced: a forced mixture, or None.
    """
    if state is None:
        raise ValueError(
            "continues_turn=True continues the turn open at the end of a KV cache, but no gate state came with "
            "it; pass the `cache` returned by an earlier forward of this model (or drop continues_turn)"
        )
    top_k = routing_top_k(config, forced)
    if state.plan is None:  # once per turn, one token per row; the fold is looked for even when grad is on
        state.plan = plan_turns(state.turn_weights, state.last_turn.view(-1, 1), top_k, may_fold=True)
    return GateCall(gate, None, None, state, forced, top_k, plan=state.plan.repeat_tokens(seq))


def gate_fields(gate: GateOutput, gate_labels: torch.Tensor | None, config: MoeEmpathyConfig) -> tuple[dict, GateLosses]:
    """What a forward whose gate decided its turns reports: its output fields and gate losses.

    Args:
        gate: the gate's decision.
        gate_labels: ``[batch, turns]`` expert index of each turn (-100 = none), or None.
        config: the model's configuration (loss weights, expert names).
    """
    if gate_labels is not None:
        check_gate_labels(gate_labels, tuple(gate.logits.shape[:2]), config.expert_names)
    losses = gate_losses(gate, gate_labels, config)
    fields = {
        "gate_weights": gate.weights, "gate_logits": gate.logits, "turn_mask": gate.turn_mask, "gate_state": gate.state,
        "aux_loss": losses.aux, "gate_label_loss": losses.gate_label, "load_balancing_loss": losses.load_balancing,
        "z_loss": losses.z_loss,
    }
    return fields, losses


class HandOverPlanHook:
    """Pre-hook of an expert layer's ``self_attn`` under activation checkpointing: puts the plan
    of the layer's call into the slot, so that the layer's recomputation in backward finds it.

    An object rather than a closure, so that ``copy.deepcopy`` of a model points the copy's
    hooks at the copy's slot.

    Args:
        slot: the routing slot the model's expert linears read.
    """

    def __init__(self, slot: RoutingSlot):
        self.slot = slot

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call: GateCall | None = kwargs.get(ROUTING_KWARG)
        self.slot.plan = call.plan if call is not None else None


class DecideGateHook(HandOverPlanHook):
    """Pre-hook of layer ``gate_layer``: decides the gate from the states entering it, plans the
    forward (unless the call continues a decided turn), then hands the plan over like any expert layer.

    Args:
        slot: the routing slot the model's expert linears read.
    """

    def __call__(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        call: GateCall | None = kwargs.get(ROUTING_KWARG)
        if call is not None and call.plan is None:
            hidden = args[0] if args else kwargs["hidden_states"]  # [batch, seq, hidden]
            call.output = call.gate(hidden, call.turn_ids, call.gate_mask, call.state, call.forced)
            # Looking for a fold reads the weights back: only where a fold can be used (inference).
            may_fold = not torch.is_grad_enabled() and not layer.training
            weights = call.output.weights  # [batch, turns, E]
            if call.labels is not None:
                weights = label_routing(weights, call.labels, call.label_share)
            call.plan = plan_turns(weights, call.turn_ids, call.top_k, may_fold)
        super().__call__(layer, args, kwargs)


class RoutingHooks:
    """The routing pre-hooks of one model: the gate layer's always, the hand-over hooks only
    while activation checkpointing is on in an expert layer (:meth:`follow_checkpointing`).

    Args:
        layers: the base model's decoder layers.
        gate_layer: the first layer with experts; the gate reads the states entering it.
        slot: the routing slot the model's expert linears read.
    """

    def __init__(self, layers: nn.ModuleList, gate_layer: int, slot: RoutingSlot):
        self.expert_layers = list(layers[gate_layer:])
        self.slot = slot
        self.handles: list[RemovableHandle] = [layers[gate_layer].register_forward_pre_hook(DecideGateHook(slot), with_kwargs=True)]
        self.hand_over: list[RemovableHandle] = []

    def follow_checkpointing(self) -> None:
        """Installs the hand-over hooks when an expert layer checkpoints its activations, removes them when none does."""
        checkpointing = any(getattr(layer, "gradient_checkpointing", False) for layer in self.expert_layers)
        if checkpointing and not self.hand_over:
            hand_over = HandOverPlanHook(self.slot)
            for layer in self.expert_layers:
                target = getattr(layer, "self_attn", None) or layer
                self.hand_over.append(target.register_forward_pre_hook(hand_over, with_kwargs=True))
        elif not checkpointing and self.hand_over:
            for handle in self.hand_over:
                handle.remove()
            self.hand_over = []

    def remove(self) -> None:
        """Removes every routing hook (the model's experts are being unloaded)."""
        for handle in self.handles + self.hand_over:
            handle.remove()
        self.handles, self.hand_over = [], []
