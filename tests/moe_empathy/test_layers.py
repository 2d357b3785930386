"""The expert linear's forward dispatch: every branch computes the same delta."""

import pytest
import torch
from torch import nn

from moe_empathy.kernels.reference import multi_lora_reference
from moe_empathy.layers import MultiLoraLinear
from moe_empathy.routing import RoutingPlan, RoutingSlot


@pytest.fixture
def linear():
    torch.manual_seed(0)
    layer = MultiLoraLinear(nn.Linear(24, 40), num_experts=3, rank=4, alpha=8, kernel_backend="torch")
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.routing_slot = RoutingSlot()
    return layer


def _expected(linear, x, weights):
    flat = x.reshape(-1, 24)
    delta = multi_lora_reference(flat, linear.lora_A, linear.lora_B, weights.reshape(-1, 3), linear.scaling)
    return (linear.base_layer(flat) + delta).view(*x.shape[:2], 40)


@pytest.mark.parametrize("top_k", [None, 2])
def test_inference_training_and_folded_branches_agree(linear, top_k):
    x = torch.randn(3, 5, 24)
    per_row = torch.softmax(torch.randn(3, 1, 3), -1).expand(3, 5, 3).contiguous()  # [batch, seq, E]
    if top_k:
        per_row = per_row * (per_row > per_row.min(-1, keepdim=True).values)  # two experts kept
    valid = torch.ones(3, 5, dtype=torch.bool)
    linear.routing_slot.plan = RoutingPlan.build(per_row, valid, top_k, may_fold=True)
    assert linear.routing_slot.plan.fold_key is None
    trained = linear.train()(x)  # autograd path through multi_lora (dropout is off: p = 0)
    with torch.no_grad():
        inferred = linear.eval()(x)  # cached concatenated experts and the plan's factors
    torch.testing.assert_close(trained, _expected(linear, x, per_row))
    torch.testing.assert_close(inferred, trained.detach())
    shared = per_row[:1, :1].expand(3, 5, 3)
    linear.routing_slot.plan = RoutingPlan.build(shared, valid, None, may_fold=True)
    with torch.no_grad():
        folded = linear(x)
    torch.testing.assert_close(folded, _expected(linear, x, shared))


def test_cached_experts_follow_parameter_updates(linear):
    x = torch.randn(2, 3, 24)
    weights = torch.softmax(torch.randn(2, 3, 3), -1)
    linear.routing_slot.plan = RoutingPlan.build(weights, torch.ones(2, 3, dtype=torch.bool), None, may_fold=True)
    with torch.no_grad():
        before = linear.eval()(x)
        linear.lora_B.mul_(2.0)  # an optimiser step or a load bumps the version
        after = linear(x)
    torch.testing.assert_close(after, _expected(linear, x, weights))
    assert not torch.allclose(before, after)


def test_a_folded_weight_follows_updates_and_replacements_of_every_parameter(linear):
    x = torch.randn(2, 3, 24)
    shared = torch.softmax(torch.randn(1, 1, 3), -1).expand(2, 3, 3)  # one mixture: the layer folds
    linear.routing_slot.plan = RoutingPlan.build(shared, torch.ones(2, 3, dtype=torch.bool), None, may_fold=True)
    assert linear.routing_slot.plan.fold_key is not None
    changes = [
        lambda: linear.lora_B.mul_(2.0),  # in place, as an optimiser step or a load
        lambda: linear.lora_A.add_(0.5),
        lambda: linear.base_layer.weight.mul_(0.5),
        lambda: setattr(linear, "lora_A", nn.Parameter(torch.randn_like(linear.lora_A))),  # replaced
        lambda: setattr(linear.base_layer, "weight", nn.Parameter(torch.randn_like(linear.base_layer.weight))),
    ]
    with torch.no_grad():
        linear.eval()(x)
        for change in changes:
            before = linear(x)  # the same plan object: the decode steps' fast path
            change()
            after = linear(x)
            torch.testing.assert_close(after, _expected(linear, x, shared))
            assert not torch.allclose(before, after)


def test_no_plan_is_exactly_the_base(linear):
    x = torch.randn(2, 3, 24)
    assert torch.equal(linear(x), linear.base_layer(x))


def test_merge_equals_the_folded_mixture_and_unmerge_restores_the_base(linear):
    x = torch.randn(2, 3, 24)
    mixture = torch.tensor([0.2, 0.5, 0.3])
    base_weight = linear.base_layer.weight.detach().clone()
    linear.routing_slot.plan = RoutingPlan.build(mixture.expand(2, 3, 3), torch.ones(2, 3, dtype=torch.bool), None, may_fold=True)
    with torch.no_grad():
        folded = linear.eval()(x)
        linear.merge(mixture, safe_merge=True)
        merged = linear(x)  # the base layer alone, now holding the mixture
        with pytest.raises(RuntimeError, match="unmerge"):
            linear.merge(mixture)
        linear.unmerge()
    torch.testing.assert_close(merged, folded)
    torch.testing.assert_close(linear.base_layer.weight, base_weight, atol=1e-6, rtol=0)
    assert not linear.merged


def test_safe_merge_refuses_non_finite_experts(linear):
    base_weight = linear.base_layer.weight.detach().clone()
    with torch.no_grad():
        linear.lora_A[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        linear.merge(torch.tensor([0.0, 1.0, 0.0]), safe_merge=True)
    assert torch.equal(linear.base_layer.weight, base_weight) and not linear.merged
