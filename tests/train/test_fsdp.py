"""FSDP without processes: the wrapping plan of the 8B template's model (built on the meta device)
and the compact save from a state dict gathered from shards. The 2-process FSDP run itself is in
test_train_distributed.py."""

from __future__ import annotations

import torch
import yaml
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from safetensors.torch import load_file
from train_support import CONFIGS
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments
from transformers.integrations.accelerate import infer_auto_device_map

from moe_empathy.layers import MultiLoraLinear
from moe_empathy.checkpoint import COMPACT_WEIGHTS
from moe_empathy.modeling_moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.train.hf_trainer import MoeEmpathyTrainer

# Llama-3.1-8B's shape.
LLAMA_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=False,
)


def _template_model(base_config: LlamaConfig) -> MoeEmpathyForCausalLM:
    """The gated model of llama-8b-fsdp.yaml on ``base_config``, on the meta device (no weights)."""
    settings = yaml.safe_load((CONFIGS / "llama-8b-fsdp.yaml").read_text())["model"]
    settings.pop("base")
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(base_config)
        return MoeEmpathyForCausalLM.from_base(base, base_model_name_or_path="llama-8b", **settings)


def test_the_8b_template_shards_every_expert_with_its_decoder_layer_and_the_gate_with_the_root():
    model = _template_model(LlamaConfig(**LLAMA_8B))
    # Collected by transformers from the wrapped base: what `device_map="auto"` and FSDP auto-wrap read.
    assert model._no_split_modules == {"LlamaDecoderLayer"}

    # The plan of the shipped launch config, as accelerate's FSDP2 preparation applies it: a unit per
    # module its auto-wrap policy picks, then the input embeddings and the head (untied) each in a
    # unit of their own, the rest in the root's.
    launch = yaml.safe_load((CONFIGS / "accelerate-fsdp.yaml").read_text())["fsdp_config"]
    assert launch["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the trainer refuses others for gated models
    assert "fsdp_transformer_layer_cls_to_wrap" not in launch  # taken from `_no_split_modules`
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=launch["fsdp_version"],
        auto_wrap_policy=launch["fsdp_auto_wrap_policy"],
        state_dict_type=launch["fsdp_state_dict_type"],
    )
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    layers = [f"model.model.layers.{i}" for i in range(LLAMA_8B["num_hidden_layers"])]
    assert [name for name, module in model.named_modules() if policy(module)] == layers
    own_units = {"model.model.embed_tokens.weight": "embeddings", "model.lm_head.weight": "head"}
    assert {name for name, p in model.named_parameters() if p is model.get_input_embeddings().weight} == {"model.model.embed_tokens.weight"}
    assert {name for name, p in model.named_parameters() if p is model.get_output_embeddings().weight} == {"model.lm_head.weight"}

    def unit_of(name: str) -> str:
        return next((layer for layer in layers if name.startswith(layer + ".")), own_units.get(name, "root"))

    units = {name: unit_of(name) for name, _ in model.named_parameters()}
    experts = {name: module for name, module in model.named_modules() if isinstance(module, MultiLoraLinear)}
    gate_layer, targets = model.config.gate_layer, len(model.config.target_modules)
    assert len(experts) == (LLAMA_8B["num_hidden_layers"] - gate_layer) * targets
    for name in experts:
        layer = unit_of(name + ".lora_A")
        assert layer != "root" and int(layer.rsplit(".", 1)[1]) >= gate_layer
        # The expert's parameters and the frozen linear it adapts are in the same unit.
        assert {units[f"{name}.{p}"] for p in ("lora_A", "lora_B", "base_layer.weight")} == {layer}
    root = {name for name, unit in units.items() if unit == "root"}
    # Left to the root: the gate, and the final norm (accelerate looks for it among the direct
    # children of `base_model_prefix`, which here is the whole base causal LM) - 0.01% of the model.
    assert root == {name for name in units if name.startswith("gate.")} | {"model.model.norm.weight"}
    sizes = dict(model.named_parameters())
    total = sum(p.numel() for p in sizes.values())
    assert sum(sizes[name].numel() for name in root) < 1e-3 * total

    # `device_map="auto"` (transformers' plan) never splits a decoder layer: its experts stay with it.
    device_map = infer_auto_device_map(model, max_memory={"cpu": "6GiB", "disk": "100GiB"}, no_split_module_classes=model._no_split_modules)
    assert set(device_map.values()) == {"cpu", "disk"}
    placed = [name for name in device_map if name.startswith("model.model.layers.")]
    assert placed == layers


def test_the_compact_save_takes_the_gathered_state_dict(tmp_path):
    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**shape))
    model = MoeEmpathyForCausalLM.from_base(base, base_model_name_or_path="tiny-base", lora_rank=2, gate_layer=0)
    other = MoeEmpathyForCausalLM(model.config)  # the same names and shapes, other values
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = MoeEmpathyTrainer(model=model, args=args, train_lengths=[])
    # Under FSDP the model's own parameters are this process's shards; the Trainer hands `_save`
    # the full state it gathered. Here that state is another model's, so the file shows which was written.
    trainer._save(str(tmp_path / "gathered"), state_dict=other.state_dict())
    trainer._save(str(tmp_path / "own"))
    gathered, own = load_file(tmp_path / "gathered" / COMPACT_WEIGHTS), load_file(tmp_path / "own" / COMPACT_WEIGHTS)
    expected, mine = other.expert_state_dict(), model.expert_state_dict()
    assert set(gathered) == set(own) == set(expected)
    assert all(torch.equal(gathered[k], expected[k]) for k in expected)
    assert all(torch.equal(own[k], mine[k]) for k in mine)
    assert not all(torch.equal(gathered[k], own[k]) for k in own)
