"""Invariants of the gated model on a tiny random Llama."""

import copy

import pytest
import torch
import torch.nn.functional as F

from moe_empathy import MoeEmpathyForCausalLM, encode_chat
from moe_empathy import dispatch
from moe_empathy.cache import gate_state_of
from moe_empathy.layers import decoder_layers

from .conftest import randomise_experts, tiny_base


def test_fresh_experts_equal_the_base_and_wrapping_keeps_the_base(tokenizer, dialogue):
    base = tiny_base()
    enc = encode_chat(tokenizer, dialogue)
    with torch.no_grad():
        before = base(enc["input_ids"]).logits
        model = MoeEmpathyForCausalLM.from_base(base, tokenizer=tokenizer, lora_rank=4).eval()
        assert torch.equal(model(**enc.data if False else {k: enc[k] for k in ("input_ids", "turn_ids", "gate_mask")}).logits, before)
        assert torch.equal(base(enc["input_ids"]).logits, before)
    assert base.config._attn_implementation == "sdpa"


def test_disabled_experts_equal_the_base_exactly(model, tokenizer, dialogue):
    enc = encode_chat(tokenizer, dialogue)
    reference = tiny_base()
    with torch.no_grad():
        expected = reference(enc["input_ids"]).logits
        assert not torch.allclose(model(enc["input_ids"]).logits, expected)
        with model.disable_experts():
            out = model(enc["input_ids"])
    assert torch.equal(out.logits, expected)
    assert out.gate_weights is None


def test_gate_weights_sum_to_one_on_present_turns(model, tokenizer, dialogue):
    enc = encode_chat(tokenizer, [dialogue, dialogue[:1]])
    out = model(**{k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")})
    assert out.gate_weights.shape == (2, 3, 3)
    assert out.turn_mask.tolist() == [[True, True, True], [True, False, False]]
    sums = out.gate_weights.sum(-1)
    assert torch.allclose(sums[out.turn_mask], torch.ones(4))
    assert (sums[~out.turn_mask] == 0).all()


def test_one_hot_forced_gate_equals_a_single_peft_lora(model, tokenizer, dialogue, tmp_path):
    from peft import PeftModel

    enc = encode_chat(tokenizer, dialogue)
    model.export_peft_expert("medium", tmp_path / "medium")
    peft_model = PeftModel.from_pretrained(tiny_base(), tmp_path / "medium").eval()
    with torch.no_grad():
        with model.force_gate("medium"):
            ours = model(enc["input_ids"]).logits
        theirs = peft_model(enc["input_ids"]).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_peft_adapters_import_as_experts(tokenizer, dialogue, tmp_path):
    from peft import LoraConfig, get_peft_model

    enc = encode_chat(tokenizer, dialogue)
    expected, folders = {}, {}
    for seed, (name, rank, modules) in enumerate([("calm", 2, ["q_proj", "v_proj"]), ("warm", 4, ["q_proj", "o_proj"])]):
        peft_model = get_peft_model(tiny_base(), LoraConfig(r=rank, lora_alpha=8, target_modules=modules))
        torch.manual_seed(seed)
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.2)
        peft_model.save_pretrained(tmp_path / name)
        with torch.no_grad():
            expected[name] = peft_model.eval()(enc["input_ids"]).logits
        folders[name] = tmp_path / name
    model = MoeEmpathyForCausalLM.from_peft_adapters(tiny_base(), folders, tokenizer=tokenizer).eval()
    assert model.expert_names == ["calm", "warm"] and model.config.lora_rank == 4 and model.config.gate_layer == 0
    assert sorted(model.config.target_modules) == ["o_proj", "q_proj", "v_proj"]
    for name in folders:
        with torch.no_grad(), model.force_gate(name):
            torch.testing.assert_close(model(enc["input_ids"]).logits, expected[name], rtol=1e-5, atol=1e-5)


def test_peft_adapter_outside_the_experts_is_refused(tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_base(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    model = MoeEmpathyForCausalLM.from_base(tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=2)
    with pytest.raises(ValueError, match="lower gate_layer"):
        model.load_peft_expert("low", tmp_path / "a")


def test_only_experts_and_gate_get_gradients(model, tokenizer, dialogue):
    model.train()
    enc = encode_chat(tokenizer, dialogue[:4])
    out = model(**{k: enc[k] for k in ("input_ids", "turn_ids", "gate_mask", "labels")}, gate_labels=torch.tensor([[0, 2]]))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad, "nothing was trained"
    assert all(".lora_A" in n or ".lora_B" in n or n.startswith("gate.") for n in with_grad)
    assert any(n.startswith("gate.") for n in with_grad)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n and not n.startswith("gate."))


def test_gate_label_loss_is_cross_entropy_of_the_turn_logits(model, tokenizer, dialogue):
    enc = encode_chat(tokenizer, dialogue[:4])
    labels = torch.tensor([[2, -100]])
    out = model(**{k: enc[k] for k in ("input_ids", "turn_ids", "gate_mask")}, gate_labels=labels)
    expected = F.cross_entropy(out.gate_logits[0, :1] / model.config.gate_temperature, labels[0, :1])
    torch.testing.assert_close(out.gate_label_loss, expected)
    cfg = model.config
    total = cfg.gate_label_loss_weight * expected + cfg.load_balancing_loss_weight * out.load_balancing_loss + cfg.z_loss_weight * out.z_loss
    torch.testing.assert_close(out.aux_loss, total)
    with pytest.raises(ValueError, match="expert indices"):
        model(**{k: enc[k] for k in ("input_ids", "turn_ids", "gate_mask")}, gate_labels=torch.tensor([[3, 0]]))


def test_turn_k_is_unaffected_by_turn_k_plus_one(model, tokenizer, dialogue):
    changed = copy.deepcopy(dialogue)
    changed[2]["content"] = "Never mind, everything is fine and I am very happy today."
    a, b = encode_chat(tokenizer, dialogue[:4]), encode_chat(tokenizer, changed[:4])
    keep = int((a["turn_ids"][0] == 0).sum())
    assert torch.equal(a["input_ids"][0, :keep], b["input_ids"][0, :keep])
    with torch.no_grad():
        out_a = model(**{k: a[k] for k in ("input_ids", "turn_ids", "gate_mask")})
        out_b = model(**{k: b[k] for k in ("input_ids", "turn_ids", "gate_mask")})
    assert torch.equal(out_a.logits[0, :keep], out_b.logits[0, :keep])
    assert torch.equal(out_a.gate_weights[0, 0], out_b.gate_weights[0, 0])
    assert not torch.equal(out_a.gate_weights[0, 1], out_b.gate_weights[0, 1])


def test_a_reply_never_reaches_its_own_gate(model, tokenizer, dialogue):
    changed = copy.deepcopy(dialogue)
    changed[1]["content"] = "I am so sorry, that must feel awful. How are you holding up?"
    a, b = encode_chat(tokenizer, dialogue[:2]), encode_chat(tokenizer, changed[:2])
    with torch.no_grad():
        ga = model(**{k: a[k] for k in ("input_ids", "turn_ids", "gate_mask")}).gate_weights
        gb = model(**{k: b[k] for k in ("input_ids", "turn_ids", "gate_mask")}).gate_weights
    assert torch.equal(ga, gb)


def test_padding_never_leaks(model, tokenizer, dialogue):
    batch = encode_chat(tokenizer, [dialogue, dialogue[:3]])
    single = encode_chat(tokenizer, dialogue[:3])
    width = single["input_ids"].shape[1]
    with torch.no_grad():
        out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")})
        ref = model(**{k: single[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")})
    torch.testing.assert_close(out.gate_weights[1, :2], ref.gate_weights[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logits[1, -width:], ref.logits[0], rtol=1e-4, atol=1e-5)


def test_turns_are_derived_from_the_template_when_not_given(model, tokenizer, dialogue):
    enc = encode_chat(tokenizer, [dialogue, dialogue[:3]], add_generation_prompt=True)
    with torch.no_grad():
        explicit = model(**{k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")})
        derived = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    assert torch.equal(explicit.logits, derived.logits)
    assert torch.equal(explicit.gate_weights, derived.gate_weights)


@pytest.mark.parametrize("memory", ["none", "ema", "gru"])
@pytest.mark.parametrize("gate_type", ["soft", "top_k"])
def test_generate_with_cache_equals_without(tokenizer, dialogue, memory, gate_type):
    model = MoeEmpathyForCausalLM.from_base(
        tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=1, gate_memory=memory, gate_type=gate_type, gate_top_k=2
    ).eval()
    randomise_experts(model, std=0.5)
    for batch in ([dialogue], [dialogue, dialogue[:1], dialogue[:3]]):
        enc = encode_chat(tokenizer, batch, add_generation_prompt=True)
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=2, eos_token_id=None)
        cached = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
        fresh = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], use_cache=False, **kwargs)
        explicit = model.generate(**{k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")}, **kwargs)
        assert torch.equal(cached, fresh)
        assert torch.equal(cached, explicit)


def test_generation_decides_the_gate_once_at_prefill(model, tokenizer, dialogue):
    enc = encode_chat(tokenizer, dialogue, add_generation_prompt=True)
    model.enable_routing_log()
    model.generate(input_ids=enc["input_ids"], max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None)
    records = model.disable_routing_log()
    assert [(r.call, r.turn) for r in records] == [(0, 0), (0, 1), (0, 2)]
    assert all(abs(sum(r.weights.values()) - 1) < 1e-5 for r in records)


def test_top_k_gate_keeps_k_experts(tokenizer, dialogue):
    model = MoeEmpathyForCausalLM.from_base(tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_type="top_k", gate_top_k=2)
    randomise_experts(model)
    out = model(**{k: encode_chat(tokenizer, dialogue)[k] for k in ("input_ids", "turn_ids", "gate_mask")})
    assert ((out.gate_weights > 0).sum(-1) == 2).all()
    torch.testing.assert_close(out.gate_weights.sum(-1), torch.ones(1, 3))


def test_bad_turn_ids_are_refused(model, tokenizer, dialogue):
    enc = encode_chat(tokenizer, dialogue)
    ids = enc["input_ids"]
    with pytest.raises(ValueError, match="shape"):
        model(ids, turn_ids=enc["turn_ids"][:, 1:])
    with pytest.raises(ValueError, match="integer"):
        model(ids, turn_ids=enc["turn_ids"].float())
    with pytest.raises(ValueError, match="decrease"):
        model(ids, turn_ids=enc["turn_ids"].flip(1))


def test_target_modules_matching_nothing_are_refused(tokenizer):
    with pytest.raises(ValueError, match="match no nn.Linear.*q_proj"):
        MoeEmpathyForCausalLM.from_base(tiny_base(), tokenizer=tokenizer, target_modules=["query"])


def _hand_over_hooks(model) -> int:
    layers = decoder_layers(model.model)[model.config.gate_layer :]
    return sum(len(layer.self_attn._forward_pre_hooks) for layer in layers)


@pytest.mark.parametrize("switch", ["model", "base"])
def test_gradient_checkpointing_gives_the_same_gradients(tokenizer, dialogue, switch):
    enc = encode_chat(tokenizer, dialogue[:4])
    grads = []
    for checkpointing in (False, True):
        model = MoeEmpathyForCausalLM.from_base(tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=1)
        randomise_experts(model)
        model.train()
        if checkpointing:  # through the gated model, or behind its back on the base it wraps
            (model if switch == "model" else model.model).activation_checkpointing_enable()
        out = model(**{k: enc[k] for k in ("input_ids", "turn_ids", "gate_mask", "labels")}, gate_labels=torch.tensor([[0, 1]]))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("gate.") for n in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_per_layer_routing_hooks_exist_only_under_checkpointing(tokenizer):
    model = MoeEmpathyForCausalLM.from_base(tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=1)
    experts = len(decoder_layers(model.model)) - 1
    assert _hand_over_hooks(model) == 0  # decoding pays for the gate layer's hook alone
    model.activation_checkpointing_enable()
    assert _hand_over_hooks(model) == experts
    model.activation_checkpointing_enable()  # twice: still one hook per layer
    assert _hand_over_hooks(model) == experts
    model.activation_checkpointing_disable()
    assert _hand_over_hooks(model) == 0


def test_a_deep_copy_routes_through_its_own_slot(tokenizer, dialogue):
    model = MoeEmpathyForCausalLM.from_base(tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=1)
    randomise_experts(model)
    model.eval()
    clone = copy.deepcopy(model)
    (hook,) = decoder_layers(clone.model)[1]._forward_pre_hooks.values()
    assert hook.slot is clone._routing_slot
    enc = encode_chat(tokenizer, dialogue)
    with torch.no_grad():
        assert torch.equal(model(enc["input_ids"]).logits, clone(enc["input_ids"]).logits)
    clone.activation_checkpointing_enable()
    assert _hand_over_hooks(model) == 0 and _hand_over_hooks(clone) == len(decoder_layers(clone.model)) - 1


def test_text_generation_pipeline_with_chat_messages(model, tokenizer, dialogue):
    from transformers import pipeline

    chat = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = chat(dialogue, max_new_tokens=4, do_sample=False)
    assert out[0]["generated_text"][-1]["role"] == "assistant"


def test_from_base_accepts_a_local_folder(tokenizer, tmp_path, dialogue):
    tiny_base().save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    model = MoeEmpathyForCausalLM.from_base(tmp_path / "base", lora_rank=4).eval()
    assert model.config.user_turn_marker is not None  # found from the folder's tokenizer
    enc = encode_chat(tokenizer, dialogue)
    with torch.no_grad():
        assert torch.equal(model(enc["input_ids"]).logits, tiny_base()(enc["input_ids"]).logits)
    with pytest.raises(FileNotFoundError, match="cannot be found"):
        MoeEmpathyForCausalLM.from_base(tmp_path / "missing")


@pytest.mark.parametrize("memory", ["none", "ema", "gru"])
def test_a_dialogue_continued_on_its_cache_equals_a_full_forward(tokenizer, dialogue, memory):
    """Multi-turn rollouts: each turn prefills only the new user message on the carried cache."""
    from transformers import DynamicCache

    model = MoeEmpathyForCausalLM.from_base(tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=1, gate_memory=memory).eval()
    randomise_experts(model, std=0.5)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=2, eos_token_id=None)
    cache = DynamicCache(config=model.config.text_config)
    sequence = encode_chat(tokenizer, dialogue[:1], add_generation_prompt=True)["input_ids"]
    for user in (dialogue[2], dialogue[4]):
        # An explicit mask: with pad == eos, generate would otherwise mask every <|im_end|> as padding.
        sequence = model.generate(input_ids=sequence, attention_mask=torch.ones_like(sequence), cache=cache, **kwargs)
        suffix = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True).split("<|im_start|>user")[1]
        suffix_ids = tokenizer("<|im_end|>\n<|im_start|>user" + suffix, add_special_tokens=False, return_tensors="pt")["input_ids"]
        sequence = torch.cat([sequence, suffix_ids], dim=1)
    mask = torch.ones_like(sequence)
    continued = model.generate(input_ids=sequence, attention_mask=mask, cache=cache, **kwargs)
    full = model.generate(input_ids=sequence, attention_mask=mask, use_cache=False, **kwargs)
    assert torch.equal(continued, full)
    assert gate_state_of(cache).turn_weights.shape == (1, 3, 3)
    with torch.no_grad():
        gate = model(sequence).gate_weights
    torch.testing.assert_close(gate_state_of(cache).turn_weights, gate, rtol=1e-5, atol=1e-6)


def test_a_forced_gate_on_a_left_padded_batch_applies_to_every_row(model, tokenizer, dialogue):
    """The folded (merged) weight takes its mixture from a real token, never from padding."""
    batch = encode_chat(tokenizer, [dialogue[:1], dialogue])  # row 0 is left-padded
    single = encode_chat(tokenizer, dialogue[:1])
    width = single["input_ids"].shape[1]
    with torch.no_grad(), model.force_gate("low"):
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(input_ids=single["input_ids"]).logits
    with torch.no_grad(), model.disable_experts():
        base = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(padded, base)
    torch.testing.assert_close(padded[0, -width:], alone[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("length", range(1, 9))  # 1 .. 2x the longest ChatML marker
def test_short_inputs_without_turn_ids_run_with_and_without_a_cache(model, tokenizer, dialogue, length):
    prompt = encode_chat(tokenizer, dialogue, add_generation_prompt=True)["input_ids"]
    reply = tokenizer("Hold the power button for ten seconds, then start it again.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        alone = model(input_ids=prompt[:, -length:])
        prefix = model(input_ids=prompt, use_cache=True)
        continued = model(input_ids=reply[:, :length], cache=prefix.cache, use_cache=True)
        full = model(input_ids=torch.cat([prompt, reply[:, :length]], 1))
    assert alone.logits.shape[1] == length
    torch.testing.assert_close(continued.logits, full.logits[:, -length:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("with_turns", [True, False])
def test_prompt_lookup_decoding_equals_greedy(model, tokenizer, dialogue, with_turns):
    enc = encode_chat(tokenizer, dialogue, add_generation_prompt=True)
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")[: 4 if with_turns else 2]}
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=2, eos_token_id=None)
    greedy = model.generate(**inputs, **kwargs)
    lookup = model.generate(**inputs, prompt_lookup_num_tokens=2, **kwargs)
    assert torch.equal(lookup, greedy)


def test_force_gate_input_errors_name_the_fix(model, tokenizer, dialogue):
    with pytest.raises(ValueError, match="mixing expert names and numbers"):
        with model.force_gate(["low", 0.5]):
            pass
    enc = encode_chat(tokenizer, dialogue, add_generation_prompt=True)
    with model.force_gate(["low"]), pytest.raises(ValueError, match="repeat_interleave"):
        model.generate(input_ids=enc["input_ids"], num_beams=2, max_new_tokens=2, pad_token_id=2)
    with model.force_gate(["low", "low"]):  # each row's choice repeated per beam
        model.generate(input_ids=enc["input_ids"], num_beams=2, max_new_tokens=2, pad_token_id=2)


@pytest.mark.parametrize("turns", [2, 4])
def test_gate_labels_with_the_wrong_number_of_turns_are_refused(model, tokenizer, dialogue, turns):
    enc = encode_chat(tokenizer, dialogue)  # 3 turns
    with pytest.raises(ValueError, match=r"gate_labels must have shape \[batch, turns\] = \[1, 3\]"):
        model(**{k: enc[k] for k in ("input_ids", "turn_ids", "gate_mask")}, gate_labels=torch.zeros(1, turns, dtype=torch.long))


@pytest.mark.parametrize("gate_type", ["soft", "top_k"])
def test_decode_steps_reuse_the_turns_plan_without_deriving_anything(tokenizer, dialogue, gate_type, monkeypatch):
    model = MoeEmpathyForCausalLM.from_base(
        tiny_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=1, gate_type=gate_type, gate_top_k=2
    ).eval()
    randomise_experts(model, std=0.5)
    enc = encode_chat(tokenizer, [dialogue, dialogue[:3]], add_generation_prompt=True)
    inputs = {k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")}
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=2, eos_token_id=None)
    reference = model.generate(**inputs, use_cache=False, **kwargs)
    calls = {"gate": 0, "derive": 0}
    gate_forward, derive = model.gate.forward, dispatch.derive_turn_ids
    monkeypatch.setattr(model.gate, "forward", lambda *a, **k: calls.__setitem__("gate", calls["gate"] + 1) or gate_forward(*a, **k))
    monkeypatch.setattr(dispatch, "derive_turn_ids", lambda *a, **k: calls.__setitem__("derive", calls["derive"] + 1) or derive(*a, **k))
    monkeypatch.setattr(dispatch, "validate_turn_ids", lambda *a, **k: calls.__setitem__("validate", calls.get("validate", 0) + 1))
    cached = model.generate(**inputs, **kwargs)
    assert torch.equal(cached, reference)
    assert calls == {"gate": 1, "derive": 0, "validate": 1}  # the prefill only
    assert model._routing_slot.plan is None  # nothing routed outside a forward


def test_continuing_a_turn_equals_deriving_it_and_needs_a_cache(model, tokenizer, dialogue):
    enc = encode_chat(tokenizer, dialogue, add_generation_prompt=True)
    with torch.no_grad():
        prefill = model(input_ids=enc["input_ids"], use_cache=True)
        step = torch.tensor([[42, 43]])
        derived = model(input_ids=step, cache=copy.deepcopy(prefill.cache), use_cache=True)
        continued = model(input_ids=step, cache=prefill.cache, use_cache=True, continues_turn=True)
        torch.testing.assert_close(continued.logits, derived.logits)
        assert torch.equal(continued.gate_weights, prefill.gate_weights)
        with pytest.raises(ValueError, match="continues_turn=True .* no gate state"):
            model(input_ids=step, continues_turn=True)
