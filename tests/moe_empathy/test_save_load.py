"""Saving and loading: full and compact checkpoints, Auto classes, atomic writes."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moe_empathy.modeling_moe_empathy as modeling
from moe_empathy import MoeEmpathyConfig, MoeEmpathyForCausalLM, encode_chat

from .conftest import randomise_experts, tiny_base


def logits(model, enc):
    with torch.no_grad():
        return model(**{k: enc[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")}).logits


def test_full_save_then_auto_load_equals_before(model, tokenizer, dialogue, tmp_path):
    enc = encode_chat(tokenizer, [dialogue, dialogue[:3]])
    before = logits(model, enc)
    model.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors").is_file()
    assert isinstance(AutoConfig.from_pretrained(tmp_path / "ckpt"), MoeEmpathyConfig)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").eval()
    assert isinstance(loaded, MoeEmpathyForCausalLM)
    assert torch.equal(logits(loaded, enc), before)
    assert loaded.config.user_turn_marker == model.config.user_turn_marker
    # Tied embeddings stay tied after the round trip.
    assert loaded.get_output_embeddings().weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    with torch.no_grad(), loaded.disable_experts():
        assert torch.equal(loaded(enc["input_ids"], attention_mask=enc["attention_mask"]).logits, tiny_base()(enc["input_ids"], attention_mask=enc["attention_mask"]).logits)


def test_compact_save_holds_only_experts_and_gate(tokenizer, dialogue, tmp_path):
    base = tiny_base()
    base.save_pretrained(tmp_path / "base")
    model = MoeEmpathyForCausalLM.from_base(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tokenizer=tokenizer, lora_rank=4, gate_layer=1
    ).eval()
    assert model.config.base_model_name_or_path == str(tmp_path / "base")
    randomise_experts(model)
    enc = encode_chat(tokenizer, dialogue)
    before = logits(model, enc)
    model.save_pretrained(tmp_path / "compact", compact=True)
    files = {p.name for p in (tmp_path / "compact").iterdir()}
    assert "experts.safetensors" in files and "model.safetensors" not in files
    size = (tmp_path / "compact" / "experts.safetensors").stat().st_size
    assert size < (tmp_path / "base" / "model.safetensors").stat().st_size / 2
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "compact").eval()
    assert torch.equal(logits(loaded, enc), before)


def test_compact_checkpoint_without_its_base_fails_clearly(model, tmp_path):
    model.config.base_model_name_or_path = str(tmp_path / "gone")
    model.save_pretrained(tmp_path / "compact", compact=True)
    with pytest.raises(FileNotFoundError, match="cannot be found.*base_model="):
        MoeEmpathyForCausalLM.from_pretrained(tmp_path / "compact")
    loaded = MoeEmpathyForCausalLM.from_pretrained(tmp_path / "compact", base_model=tiny_base())
    assert loaded.expert_names == model.expert_names


def test_compact_save_needs_a_base_reference(model, tmp_path):
    model.config.base_model_name_or_path = None
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        model.save_pretrained(tmp_path / "c", compact=True)


def test_expert_names_must_match_the_checkpoint(model, tmp_path):
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"has experts \['low', 'medium', 'high'\]"):
        MoeEmpathyForCausalLM.from_pretrained(tmp_path / "ckpt", expert_names=["calm", "warm", "deep"])


def test_failed_save_leaves_the_earlier_checkpoint_intact(model, tokenizer, dialogue, tmp_path, monkeypatch):
    enc = encode_chat(tokenizer, dialogue)
    model.config.base_model_name_or_path = "unused"
    model.save_pretrained(tmp_path / "ckpt", compact=True)
    saved = (tmp_path / "ckpt" / "experts.safetensors").read_bytes()
    before = logits(model, enc)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    with torch.no_grad():
        for linear in model.experts.values():
            linear.lora_B.mul_(2)
    monkeypatch.setattr(modeling, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "ckpt", compact=True)
    assert (tmp_path / "ckpt" / "experts.safetensors").read_bytes() == saved
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")] == []
    loaded = MoeEmpathyForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=tiny_base()).eval()
    assert torch.equal(logits(loaded, enc), before)
