"""The objective's terms: the model's losses equal the formulas written out, and the sums the
trainer takes agree with the means the model reports."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.gate import GateOutput, GateState
from moe_empathy.losses import IGNORE_INDEX, gate_losses, gate_turn_losses, lm_loss, lm_loss_sum, next_token_targets

from .conftest import randomise_experts, tiny_base

VOCAB = 512


def _batch() -> dict[str, torch.Tensor]:
    """Three rows of three, two and two turns (the last right-padded), some turns without a label."""
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(3, VOCAB, (3, 24), generator=generator)
    turn_ids = torch.tensor([[0] * 8 + [1] * 8 + [2] * 8, [0] * 12 + [1] * 12, [0] * 6 + [1] * 10 + [-1] * 8])
    readable = (torch.arange(24) % 8 < 4).long().expand(3, -1)  # the first half of every 8 tokens: "user"
    gate_mask = readable * (turn_ids >= 0)
    labels = torch.where((gate_mask == 0) & (turn_ids >= 0), input_ids, IGNORE_INDEX)  # the "assistant" tokens
    return {
        "input_ids": input_ids,
        "attention_mask": (turn_ids >= 0).long(),
        "turn_ids": turn_ids,
        "gate_mask": gate_mask,
        "labels": labels,
        "gate_labels": torch.tensor([[2, 0, 1], [1, IGNORE_INDEX, IGNORE_INDEX], [0, 2, IGNORE_INDEX]]),
    }


def _model(gate_type: str) -> MoeEmpathyForCausalLM:
    model = MoeEmpathyForCausalLM.from_base(
        tiny_base(vocab_size=VOCAB), lora_rank=4, gate_layer=1, gate_type=gate_type, gate_top_k=2, gate_temperature=0.7
    )
    randomise_experts(model)
    return model.train()


def _reference_loss(model: MoeEmpathyForCausalLM, batch: dict) -> torch.Tensor:
    """The objective as it was written before the losses had a module of their own: the base's
    mean LM loss plus the weighted gate losses over the decided turns."""
    out = model(**{k: v for k, v in batch.items() if k not in ("labels", "gate_labels")})
    cfg = model.config
    shifted = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    lm = F.cross_entropy(out.logits.float().flatten(0, 1), shifted.flatten(), ignore_index=IGNORE_INDEX)
    decided = out.turn_mask
    logits, weights = out.gate_logits[decided], out.gate_weights[decided]  # [n, E]
    labels = batch["gate_labels"][decided]
    label = F.cross_entropy(logits / cfg.gate_temperature, labels, ignore_index=IGNORE_INDEX)
    share = F.one_hot(weights.argmax(-1), cfg.num_experts).float().mean(0)
    balance = cfg.num_experts * (share * F.softmax(logits / cfg.gate_temperature, -1).mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    return lm + cfg.gate_label_loss_weight * label + cfg.load_balancing_loss_weight * balance + cfg.z_loss_weight * z


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("gate_type", ["soft", "top_k"])
def test_the_models_loss_and_gradients_are_the_formulas_written_out(gate_type):
    model, batch = _model(gate_type), _batch()
    out = model(**batch)
    out.loss.backward()
    grads = _grads(model)
    expected = _reference_loss(model, batch)
    expected.backward()
    reference = _grads(model)
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.loss, out.lm_loss + out.aux_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == reference.keys()
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"{name} has no gradient: the test would not see a difference"
        torch.testing.assert_close(grad, reference[name], rtol=1e-6, atol=1e-6, msg=name)


def test_lm_loss_on_the_kept_positions_equals_the_full_batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=generator)  # [batch, seq, vocab]
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, 5, 6], [IGNORE_INDEX, IGNORE_INDEX, 1, 2, 9, IGNORE_INDEX]])
    targets = next_token_targets(labels)
    assert targets[:, -1].eq(IGNORE_INDEX).all() and torch.equal(targets[:, :-1], labels[:, 1:])
    total, count = lm_loss_sum(logits, targets)
    keep = targets != IGNORE_INDEX  # what the prefix-cached forward computes logits for
    kept_total, kept_count = lm_loss_sum(logits[keep], targets[keep])
    torch.testing.assert_close(total, kept_total)
    assert count == kept_count == 7
    torch.testing.assert_close(lm_loss(logits, labels), total / 7)
    torch.testing.assert_close(lm_loss(logits, labels, num_items_in_batch=12), total / 12)


def test_the_trainers_sums_and_the_models_means_are_the_same_per_turn_terms():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 3, generator=generator, requires_grad=True)  # [batch, turns, E]
    weights = F.softmax(logits, -1)
    decided = torch.tensor([[True, True, True], [True, True, False]])
    gate_labels = torch.tensor([[0, IGNORE_INDEX, 2], [1, 1, IGNORE_INDEX]])
    config = _model("soft").config
    turns = gate_turn_losses(logits, weights, decided, gate_labels, config.gate_temperature)
    assert turns.labelled.tolist() == [True, False, True, True, True]
    assert turns.label[~turns.labelled].eq(0).all()
    gate = GateOutput(weights, logits, decided, decided, GateState(weights.detach(), torch.tensor([2, 1])))
    means = gate_losses(gate, gate_labels, config)
    torch.testing.assert_close(means.gate_label, turns.label.sum() / 4)
    torch.testing.assert_close(means.z_loss, turns.z.mean())
    labelled_sum = turns.labelled_sum(config)
    expected = config.gate_label_loss_weight * turns.label.sum() + config.z_loss_weight * turns.z[turns.labelled].sum()
    torch.testing.assert_close(labelled_sum, expected)


def test_load_balancing_is_one_when_the_turns_are_spread_evenly():
    logits = torch.eye(3).unsqueeze(0) * 5  # [1, 3 turns, 3 experts], each turn to its own expert
    turns = gate_turn_losses(logits, F.softmax(logits, -1), torch.ones(1, 3, dtype=torch.bool), None, 1.0)
    torch.testing.assert_close(turns.load_balancing, torch.tensor(1.0))
    skewed = torch.tensor([[[5.0, 0, 0]] * 3])  # every turn to expert 0
    assert gate_turn_losses(skewed, F.softmax(skewed, -1), torch.ones(1, 3, dtype=torch.bool), None, 1.0).load_balancing > 2
    assert not turns.labelled.any()


def test_a_forced_gate_has_zero_losses_that_still_backpropagate():
    weights = torch.full((1, 2, 3), 1 / 3, requires_grad=True)
    gate = GateOutput(weights, None, torch.ones(1, 2, dtype=torch.bool), torch.zeros(1, 2, dtype=torch.bool), GateState(weights, torch.tensor([1])))
    losses = gate_losses(gate, None, _model("soft").config)
    assert float(losses.aux.detach()) == 0 and losses.aux.requires_grad
