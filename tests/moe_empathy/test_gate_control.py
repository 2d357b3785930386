"""The gated model's controls: forced mixtures, the routing log, merged mixtures."""

import json

import pytest
import torch
from torch import nn

from moe_empathy import encode_chat

def test_force_gate_mixture_and_errors(model, tokenizer, dialogue):
    enc = encode_chat(tokenizer, dialogue)
    with torch.no_grad():
        with model.force_gate({"low": 0.25, "high": 0.75}):
            out = model(enc["input_ids"])
        assert torch.allclose(out.gate_weights, torch.tensor([0.25, 0.0, 0.75]).expand(1, 3, 3))
        with model.force_gate([0.25, 0.0, 0.75]):
            assert torch.equal(model(enc["input_ids"]).logits, out.logits)
    for bad, message in [
        ("joyful", "unknown expert"),
        ([0.5, 0.5], "needs 3 weights"),
        (torch.ones(2, 2, 3) / 3, "needs 3 weights"),
        ([1.5, -0.5, 0.0], ">= 0"),
        ([0.2, 0.2, 0.2], "sum to 1"),
        ({"nope": 1.0}, "unknown experts"),
    ]:
        with pytest.raises(ValueError, match=message):
            with model.force_gate(bad):
                pass


def test_force_gate_per_row_equals_each_row_forced_alone(model, tokenizer, dialogue):
    """One batch with a different expert forced in each row (external selection by task)."""
    batch = encode_chat(tokenizer, [dialogue[:3], dialogue, dialogue[:1]])  # rows 0 and 2 left-padded
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    choices = ["high", "low", "medium"]
    with torch.no_grad():
        with model.force_gate(choices):
            mixed = model(**inputs)
        for row, name in enumerate(choices):
            with model.force_gate(name):
                alone = model(**inputs)
            torch.testing.assert_close(mixed.logits[row], alone.logits[row], rtol=1e-5, atol=1e-5)  # fp32: a batch of one folds the mixture into W, a mixed batch adds it per row
            assert mixed.gate_weights[row, :, model.expert_names.index(name)].max() == 1
        with model.force_gate(torch.eye(3)[[2, 0, 1]]):
            assert torch.equal(model(**inputs).logits, mixed.logits)
    with pytest.raises(ValueError, match="2 per-row mixtures for a batch of 3"):
        with torch.no_grad(), model.force_gate(["low", "high"]):
            model(**inputs)
    with pytest.raises(ValueError, match=r"unknown expert\(s\) \['joyful'\]"):
        with model.force_gate(["low", "joyful"]):
            pass


def test_routing_log_saves_json(model, tokenizer, dialogue, tmp_path):
    enc = encode_chat(tokenizer, [dialogue, dialogue[:3]])
    model.enable_routing_log()
    with torch.no_grad():
        out = model(**{k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")})
    model.save_routing_log(tmp_path / "log.json")
    data = json.loads((tmp_path / "log.json").read_text())
    assert data["expert_names"] == ["low", "medium", "high"]
    assert [(r["dialogue"], r["turn"]) for r in data["records"]] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    first = data["records"][1]
    assert first["weights"]["high"] == pytest.approx(float(out.gate_weights[0, 1, 2]))
    with pytest.raises(RuntimeError, match="enable_routing_log"):
        model.disable_routing_log()
        model.routing_log


def test_merged_mixture_equals_the_forced_gate_and_unmerges_to_the_base(model, tokenizer, dialogue, tmp_path):
    inputs = {k: encode_chat(tokenizer, [dialogue, dialogue[:3]])[k] for k in ("input_ids", "attention_mask")}
    before = {name: linear.base_layer.weight.detach().clone() for name, linear in model.experts.items()}
    mixture = {"low": 0.2, "high": 0.8}
    with torch.no_grad():
        with model.force_gate(mixture):
            forced = model(**inputs).logits
        with model.disable_experts():
            base = model(**inputs).logits
        model.merge_adapter(mixture, safe_merge=True)
        merged = model(**inputs)
        with pytest.raises(ValueError, match="unmerge_adapter"):
            model.save_pretrained(tmp_path, compact=True)
        with pytest.raises(RuntimeError, match="unmerge_adapter"):
            model.merge_adapter("low")
        model.unmerge_adapter()
        after = model(**inputs).logits
    torch.testing.assert_close(merged.logits, forced, rtol=1e-5, atol=1e-5)
    assert merged.gate_weights is None  # a merged model runs as a plain model: no gate
    for name, linear in model.experts.items():
        torch.testing.assert_close(linear.base_layer.weight, before[name], rtol=0, atol=1e-6)
    with model.disable_experts(), torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base, rtol=0, atol=1e-5)  # equal up to rounding
    assert not torch.allclose(after, forced)  # the gate decides again
    with pytest.raises(RuntimeError, match="no mixture is merged"):
        model.unmerge_adapter()


def test_safe_merge_of_a_broken_expert_changes_nothing(model):
    before = {name: linear.base_layer.weight.detach().clone() for name, linear in model.experts.items()}
    last = list(model.experts.values())[-1]
    with torch.no_grad():
        last.lora_A[2].fill_(float("nan"))  # the high expert of the last layer
    with pytest.raises(ValueError, match="non-finite"):
        model.merge_adapter("high", safe_merge=True)
    for name, linear in model.experts.items():
        assert torch.equal(linear.base_layer.weight, before[name]) and not linear.merged
    with pytest.raises(ValueError, match="one mixture for every row"):
        model.merge_adapter(["low", "high"])


def test_merge_and_unload_returns_the_base_with_the_mixture_in_plain_linears(model, tokenizer, dialogue):
    inputs = {k: encode_chat(tokenizer, dialogue)[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), model.force_gate("medium"):
        forced = model(**inputs).logits
    base = model.merge_and_unload("medium")
    targets = tuple(model.config.target_modules)
    assert all(type(m) is nn.Linear for name, m in base.named_modules() if name.endswith(targets))
    assert all(not layer._forward_pre_hooks for layer in base.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).logits, forced, rtol=1e-5, atol=1e-5)


def test_route_by_labels_routes_each_labelled_turn_to_its_expert(model, tokenizer, dialogue):
    """Teacher routing: the tokens of a turn labelled ``low`` see exactly the forced ``low`` expert,
    while the gate still reports (and is trained on) its own weights."""
    enc = encode_chat(tokenizer, dialogue)  # 3 turns
    inputs = {k: enc[k] for k in ("input_ids", "turn_ids", "gate_mask")}
    early = enc["turn_ids"][0] <= 1  # [seq] tokens of turns 0 and 1
    labels = torch.tensor([[0, 0, 2]])
    with torch.no_grad():
        own = model(**inputs)
        with model.route_by_labels(1.0):
            routed = model(**inputs, gate_labels=labels)
            unlabelled = model(**inputs, gate_labels=torch.full_like(labels, -100))
        with model.route_by_labels(0.0):
            no_share = model(**inputs, gate_labels=labels)
        with model.force_gate("low"):
            low = model(**inputs)
    torch.testing.assert_close(routed.logits[0, early], low.logits[0, early])
    assert not torch.allclose(routed.logits[0, ~early], low.logits[0, ~early])
    assert torch.equal(routed.gate_weights, own.gate_weights)
    assert torch.equal(unlabelled.logits, own.logits)
    assert torch.equal(no_share.logits, own.logits)
    with pytest.raises(ValueError, match=r"share in \[0, 1\]"):
        with model.route_by_labels(1.5):
            pass
    with model.route_by_labels(1.0), pytest.raises(ValueError, match="one label per turn"):
        model(**inputs, gate_labels=torch.tensor([[0, 1]]))


def test_hard_label_routing_trains_only_the_labelled_experts(model, tokenizer, dialogue):
    enc = encode_chat(tokenizer, dialogue)
    inputs = {k: enc[k] for k in ("input_ids", "turn_ids", "gate_mask")}
    model.zero_grad()
    with model.route_by_labels(1.0):
        model(**inputs, labels=enc["input_ids"], gate_labels=torch.tensor([[0, 0, 2]])).loss.backward()
    grads = {name: 0.0 for name in model.expert_names}
    for param_name, param in model.named_parameters():
        if param.grad is not None and "lora_" in param_name:
            for index, name in enumerate(model.expert_names):
                grads[name] += param.grad[index].abs().sum().item()
    assert grads["low"] > 0 and grads["high"] > 0 and grads["medium"] == 0
    assert model.gate.proj[-1].weight.grad.abs().sum() > 0  # the gate learns from its label loss
    model.zero_grad()
