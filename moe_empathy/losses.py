"""The training objective's terms, in one place: the LM loss and the gate's losses.

The model's forward reports them as means over its batch; the trainer sums them over a
micro-batch and divides by the counts of the whole optimizer step. Both take the terms from
here, as do the prefix-cached forward and the benchmarks.

* LM loss: cross-entropy of each position's logits against the next token's label, over the
  labelled (assistant) tokens.
* ``gate_label``: cross-entropy of a turn's tempered gate logits against its empathy-level label.
* ``z_loss``: squared log-sum-exp of a turn's gate logits (keeps them small).
* ``load_balancing``: Switch-style ``E * sum_e f_e * P_e`` over the decided turns (1 when
  balanced), ``f_e`` the share of turns routed mostly to expert ``e``, ``P_e`` its mean probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .configuration_moe_empathy import MoeEmpathyConfig
from .gate import GateOutput

IGNORE_INDEX = -100


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: position ``t`` predicts token ``t + 1``; the last predicts none.

    Shifting the labels (not slicing the logits) spares a full-size copy of the logits' gradient.

    Args:
        labels: ``[batch, seq]`` token ids, ``IGNORE_INDEX`` where no loss is taken.

    Returns:
        ``[batch, seq]`` targets.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def lm_loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM cross-entropy summed over the targets that are not ``IGNORE_INDEX``, in fp32.

    Args:
        logits: ``[..., vocab]``, e.g. ``[batch, seq, vocab]`` or ``[n, vocab]``.
        targets: ``[...]`` the matching targets (:func:`next_token_targets`).

    Returns:
        The summed loss and the number of targets it covers.
    """
    flat = logits.float().reshape(-1, logits.shape[-1])  # [tokens, vocab]
    total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """The LM loss per labelled token of a causal LM's output.

    Args:
        logits: ``[batch, seq, vocab]``.
        labels: ``[batch, seq]`` unshifted, ``IGNORE_INDEX`` where no loss is taken.
        num_items_in_batch: divide by this count instead of this batch's labelled tokens (as
            ``transformers.Trainer`` passes it, to average over a whole optimizer step).
    """
    total, count = lm_loss_sum(logits, next_token_targets(labels).to(logits.device))
    return total / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))


@dataclass
class GateTurnLosses:
    """The gate's losses of each turn it decided in one forward.

    Args:
        label: ``[n]`` cross-entropy of each decided turn against its label (0 where unlabelled).
        labelled: ``[n]`` True for turns with a label.
        z: ``[n]`` squared log-sum-exp of each decided turn's logits.
        load_balancing: the load-balancing loss of the decided turns (a scalar).
    """

    label: torch.Tensor
    labelled: torch.Tensor
    z: torch.Tensor
    load_balancing: torch.Tensor

    def labelled_sum(self, config: MoeEmpathyConfig) -> torch.Tensor:
        """The weighted label and z losses summed over the labelled turns (the trainer's per-turn terms).

        Args:
            config: the model's configuration (the weights).
        """
        per_turn = config.gate_label_loss_weight * self.label + config.z_loss_weight * self.z  # [n]
        return per_turn[self.labelled].sum()


def gate_turn_losses(
    logits: torch.Tensor, weights: torch.Tensor, decided: torch.Tensor, gate_labels: torch.Tensor | None, temperature: float
) -> GateTurnLosses:
    """The gate's losses of the turns ``decided`` in one forward.

    Args:
        logits: ``[batch, turns, E]`` gate logits.
        weights: ``[batch, turns, E]`` the routing weights the logits gave.
        decided: ``[batch, turns]`` True for the turns decided by the gate in this forward.
        gate_labels: ``[batch, turns]`` expert index of each turn (``IGNORE_INDEX`` = none), or None.
        temperature: the gate's softmax temperature.
    """
    chosen = logits[decided].float()  # [n, E]
    num_experts = chosen.shape[-1]
    share = F.one_hot(weights[decided].argmax(-1), num_experts).float().mean(0)  # [E]
    probs = F.softmax(chosen / temperature, dim=-1).mean(0)  # [E]
    if gate_labels is None:
        labels = torch.full(chosen.shape[:1], IGNORE_INDEX, dtype=torch.long, device=chosen.device)  # [n]
    else:
        width = logits.shape[1]
        labels = F.pad(gate_labels[:, :width], (0, width - min(gate_labels.shape[1], width)), value=IGNORE_INDEX)
        labels = labels.to(chosen.device)[decided].long()  # [n]
    label = F.cross_entropy(chosen / temperature, labels, ignore_index=IGNORE_INDEX, reduction="none")  # [n]
    return GateTurnLosses(
        label=label,
        labelled=labels != IGNORE_INDEX,
        z=torch.logsumexp(chosen, dim=-1).pow(2),
        load_balancing=num_experts * (share * probs).sum(),
    )


@dataclass
class GateLosses:
    """The gate's losses of one forward as the model reports them: means over the decided turns.

    Args:
        gate_label: mean cross-entropy over the labelled turns.
        load_balancing: the load-balancing loss.
        z_loss: mean squared log-sum-exp over the decided turns.
        aux: the weighted sum of the three (what the model adds to its LM loss).
    """

    gate_label: torch.Tensor
    load_balancing: torch.Tensor
    z_loss: torch.Tensor
    aux: torch.Tensor


def check_gate_labels(gate_labels: torch.Tensor, shape: tuple[int, int], expert_names: list[str]) -> None:
    """Raises a ValueError unless ``gate_labels`` is ``[batch, turns]`` (``shape``) of expert indices or -100.

    Args:
        gate_labels: the labels given to the forward.
        shape: ``(batch, turns)`` of the forward's gate decision.
        expert_names: the model's experts, in index order.
    """
    if tuple(gate_labels.shape) != shape:
        raise ValueError(
            f"gate_labels must have shape [batch, turns] = {list(shape)}, one label per turn of the input, "
            f"got {tuple(gate_labels.shape)}; use {IGNORE_INDEX} for a turn without a label"
        )
    bad = (gate_labels != IGNORE_INDEX) & ((gate_labels < 0) | (gate_labels >= len(expert_names)))
    if bad.any():
        raise ValueError(
            f"gate_labels must be expert indices in [0, {len(expert_names) - 1}] ({expert_names}) "
            f"or {IGNORE_INDEX} to ignore a turn"
        )


def gate_losses(gate: GateOutput, gate_labels: torch.Tensor | None, config: MoeEmpathyConfig) -> GateLosses:
    """The gate's losses over the turns it decided in this forward, weighted by ``config``.

    Args:
        gate: the gate's output; the losses are zero when it decided no turn (forced or carried).
        gate_labels: ``[batch, turns]`` expert index of each turn (``IGNORE_INDEX`` = none), or None.
        config: the model's configuration (temperature and weights).
    """
    if gate.logits is None or not gate.fresh.any():
        zero = gate.weights.sum() * 0
        return GateLosses(zero, zero, zero, zero)
    turns = gate_turn_losses(gate.logits, gate.weights, gate.fresh, gate_labels, config.gate_temperature)
    label = turns.label.sum() / turns.labelled.sum().clamp(min=1)
    z_loss = turns.z.mean()
    aux = (
        config.gate_label_loss_weight * label
        + config.load_balancing_loss_weight * turns.load_balancing
        + config.z_loss_weight * z_loss
    )
    return GateLosses(label, turns.load_balancing, z_loss, aux)
