"""Saving and loading: full and compact checkpoints, Auto classes, atomic writes."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import moe_empathy.checkpoint as checkpoint
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
    monkeypatch.setattr(checkpoint, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "ckpt", compact=True)
    assert (tmp_path / "ckpt" / "experts.safetensors").read_bytes() == saved
    assert [p.name for p in (tmp_path / "ckpt").iterdir() if p.name.startswith(".")] == []
    loaded = MoeEmpathyForCausalLM.from_pretrained(tmp_path / "ckpt", base_model=tiny_base()).eval()
    assert torch.equal(logits(loaded, enc), before)


@pytest.fixture
def compact_dir(tokenizer, tmp_path):
    """A compact checkpoint with dropout on its experts, over a base saved next to it."""
    tiny_base().save_pretrained(tmp_path / "base")
    model = MoeEmpathyForCausalLM.from_base(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tokenizer=tokenizer, lora_rank=4, gate_layer=1, lora_dropout=0.5
    )
    randomise_experts(model)
    model.save_pretrained(tmp_path / "compact", compact=True)
    return tmp_path / "compact"


def test_a_compact_checkpoint_loads_in_eval_mode(compact_dir, tokenizer, dialogue):
    loaded = AutoModelForCausalLM.from_pretrained(compact_dir)
    assert not loaded.training
    assert not any(module.training for module in loaded.modules())
    enc = encode_chat(tokenizer, dialogue)
    assert torch.equal(logits(loaded, enc), logits(loaded, enc))  # dropout is off


@pytest.mark.parametrize("name", ["dtype", "torch_dtype"])
def test_a_compact_checkpoint_honours_dtype_and_a_one_device_map(compact_dir, name):
    loaded = MoeEmpathyForCausalLM.from_pretrained(compact_dir, **{name: torch.float16}, device_map="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.float16}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with pytest.raises(ValueError, match="loads onto one device"):
        MoeEmpathyForCausalLM.from_pretrained(compact_dir, device_map={"model.embed": 0, "lm_head": 1})
    with pytest.raises(ValueError, match=r"does not take \['attn_implementation'\]"):
        MoeEmpathyForCausalLM.from_pretrained(compact_dir, attn_implementation="eager")


def test_a_damaged_compact_checkpoint_names_the_file(compact_dir):
    weights = compact_dir / checkpoint.COMPACT_WEIGHTS
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"experts\.safetensors cannot be read .* save the checkpoint again, or download it again"):
        AutoModelForCausalLM.from_pretrained(compact_dir)
