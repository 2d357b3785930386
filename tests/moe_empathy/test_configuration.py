import pytest
from transformers import LlamaConfig

from moe_empathy import MoeEmpathyConfig

TEXT = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2)


def make(**overrides):
    return MoeEmpathyConfig(text_config=TEXT.to_dict(), **overrides)


def test_defaults_are_resolved_and_documented_values():
    config = make()
    assert config.model_type == "moe_empathy"
    assert config.expert_names == ["low", "medium", "high"]
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config.gate_layer == 2  # a third of 6 layers
    assert config.scaling == config.lora_alpha / config.lora_rank


def test_save_and_load_round_trip(tmp_path):
    config = make(expert_names=["a", "b"], lora_rank=4, gate_type="top_k", gate_top_k=1, gate_memory="ema")
    config.save_pretrained(tmp_path)
    loaded = MoeEmpathyConfig.from_pretrained(tmp_path)
    for field in ("expert_names", "lora_rank", "gate_layer", "gate_type", "gate_top_k", "gate_memory"):
        assert getattr(loaded, field) == getattr(config, field)
    assert loaded.text_config.hidden_size == 32


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"expert_names": []}, "expert_names"),
        ({"expert_names": ["a", "a"]}, "expert_names"),
        ({"lora_rank": 0}, "lora_rank"),
        ({"lora_alpha": 0}, "lora_alpha"),
        ({"lora_dropout": 1.0}, "lora_dropout"),
        ({"target_modules": []}, "target_modules"),
        ({"gate_layer": 6}, "gate_layer"),
        ({"gate_layer": -1}, "gate_layer"),
        ({"gate_type": "hard"}, "gate_type"),
        ({"gate_type": "top_k", "gate_top_k": 4}, "gate_top_k"),
        ({"gate_temperature": 0}, "gate_temperature"),
        ({"gate_hidden_size": -1}, "gate_hidden_size"),
        ({"gate_memory": "lstm"}, "gate_memory"),
        ({"gate_memory_decay": 1.0}, "gate_memory_decay"),
        ({"z_loss_weight": -1}, "z_loss_weight"),
        ({"kernel_backend": "cuda"}, "kernel_backend"),
        ({"user_turn_marker": [], "assistant_turn_marker": [1]}, "user_turn_marker"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        make(**overrides)


def test_markers_must_come_in_pairs():
    with pytest.raises(ValueError, match="set together"):
        make(user_turn_marker=[1, 2])
