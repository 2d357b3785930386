"""Training on a cached prefix: equal to the full forward, and a cache file that is never reused stale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.train.collate import IGNORE_INDEX, DialogueCollator, encode_dialogue
from moe_empathy.train.config import ConfigError
from moe_empathy.train.prefix_cache import PrefixCache, compute_prefix, forward_from_prefix, use_prefix_cache
from moe_empathy.train.synth import SynthConfig, generate
from moe_empathy.turns import find_turn_markers
from train_support import tiny_config

NAMES = ["low", "medium", "high"]
GATE_LAYER = 2
TOLERANCE = 1e-5


def _base(seed: int = 0, vocab_size: int = 49152) -> LlamaForCausalLM:
    """A random 4-layer Llama, hidden 32, tied embeddings (like SmolLM2)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=vocab_size, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config)


def _model(tokenizer, gate_type: str = "soft", gate_layer: int = GATE_LAYER, seed: int = 0) -> MoeEmpathyForCausalLM:
    """A gated tiny model in training mode with non-zero experts and gate (fresh experts have B = 0)."""
    model = MoeEmpathyForCausalLM.from_base(
        _base(seed), tokenizer=tokenizer, lora_rank=4, gate_layer=gate_layer, gate_type=gate_type, gate_top_k=2,
        expert_names=NAMES,
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for linear in model.experts.values():
            linear.lora_B.copy_(torch.randn(linear.lora_B.shape, generator=generator) * 0.3)
        for param in model.gate.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return model.train()


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[dict]:
    """Twelve encoded dialogues of 2-3 turns (different lengths, so batches are padded)."""
    records = generate(SynthConfig(dialogues=40, min_turns=2, max_turns=3, seed=3))["train"][:12]
    markers = find_turn_markers(tokenizer)
    return [encode_dialogue(r, tokenizer, markers, NAMES, 512) for r in records]


def _batch(rows: list[dict], indices: list[int], padding: str) -> dict[str, torch.Tensor]:
    """The collator's right-padded batch of ``rows[indices]``, or the same rows padded on the left."""
    batch = DialogueCollator(pad_token_id=2)([{**rows[i], "dialogue_index": i} for i in indices])
    if padding == "left":
        shifts = (batch["attention_mask"] == 0).sum(-1)  # [batch]
        for key in ("input_ids", "attention_mask", "labels", "turn_ids", "gate_mask"):
            batch[key] = torch.stack([row.roll(int(s)) for row, s in zip(batch[key], shifts)])
    return batch


def _loss_and_grads(model, batch: dict, prefix: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The trainer's objective (LM loss per assistant token + the gate's weighted losses) and the
    gradient of every trainable parameter, by the full forward (``prefix`` None) or from ``prefix``."""
    model.zero_grad(set_to_none=True)
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)  # [batch, seq]
    inputs = {k: batch[k] for k in ("attention_mask", "turn_ids", "gate_mask", "gate_labels")}
    if prefix is None:
        outputs = model(input_ids=batch["input_ids"], **inputs)
        logits, predicted = outputs.logits.flatten(0, 1), targets.flatten()
    else:
        keep = targets != IGNORE_INDEX
        outputs = forward_from_prefix(model, prefix, *inputs.values(), keep=keep)
        logits, predicted = outputs.logits, targets[keep]
    loss = F.cross_entropy(logits.float(), predicted, ignore_index=IGNORE_INDEX) + outputs.aux_loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def _assert_close(full, cached) -> None:
    (loss, grads), (cached_loss, cached_grads) = full, cached
    assert abs(float(loss - cached_loss)) <= TOLERANCE, (float(loss), float(cached_loss))
    assert grads.keys() == cached_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        assert grad.abs().sum() > 0, f"{name} has no gradient: the test would not see a difference"
        assert torch.allclose(grad, cached_grads[name], atol=TOLERANCE, rtol=0), (name, float((grad - cached_grads[name]).abs().max()))


@pytest.mark.parametrize("gate_type", ["soft", "top_k"])
def test_cached_prefix_gives_the_loss_and_gradients_of_the_full_forward(tokenizer, rows, tmp_path, gate_type):
    model = _model(tokenizer, gate_type)
    cache = PrefixCache(model, rows, "float32", tmp_path)
    # The cache is filled from other batches than the one trained on (as in a later epoch).
    for group in ([0, 5, 9], [1, 2], [3, 4, 6, 7, 8, 10, 11]):
        cache.batch(model, torch.tensor(group), *(_batch(rows, group, "right")[k] for k in ("input_ids", "attention_mask")))
    batch = _batch(rows, [9, 1, 4, 7], "right")
    assert batch["attention_mask"].min() == 0  # padded
    prefix = cache.batch(model, batch["dialogue_index"], batch["input_ids"], batch["attention_mask"])
    _assert_close(_loss_and_grads(model, batch, None), _loss_and_grads(model, batch, prefix))


@pytest.mark.parametrize("gate_type", ["soft", "top_k"])
def test_forward_from_a_left_padded_prefix_equals_the_full_forward(tokenizer, rows, gate_type):
    model = _model(tokenizer, gate_type)
    batch = _batch(rows, [9, 1, 4, 7], "left")
    assert batch["attention_mask"][:, 0].min() == 0  # padded on the left
    prefix = compute_prefix(model, batch["input_ids"], batch["attention_mask"])
    _assert_close(_loss_and_grads(model, batch, None), _loss_and_grads(model, batch, prefix))


def test_forward_from_prefix_with_activation_checkpointing(tokenizer, rows):
    batch = _batch(rows, [0, 3, 8], "right")
    model = _model(tokenizer)
    full = _loss_and_grads(model, batch, None)
    model.activation_checkpointing_enable()
    prefix = compute_prefix(model, batch["input_ids"], batch["attention_mask"])
    _assert_close(full, _loss_and_grads(model, batch, prefix))


# --------------------------------------------------------------------- the cache file


def _filled(model, rows, folder, dtype: str = "float32") -> PrefixCache:
    """A cache of ``rows[:4]`` written to ``folder``."""
    cache = PrefixCache(model, rows, dtype, folder)
    batch = _batch(rows, [0, 1, 2, 3], "right")
    cache.batch(model, batch["dialogue_index"], batch["input_ids"], batch["attention_mask"])
    cache.save()
    return cache


def test_a_saved_cache_is_read_back_and_not_recomputed(tokenizer, rows, tmp_path, monkeypatch):
    model = _model(tokenizer)
    written = _filled(model, rows, tmp_path, "float16")
    assert written.path.is_file() and not written.dirty
    again = PrefixCache(model, rows, "float16", tmp_path)
    assert again.path == written.path and len(again) == 4

    def recomputed(*args):
        raise AssertionError("a cached prefix was recomputed")

    monkeypatch.setattr("moe_empathy.train.prefix_cache.compute_prefix", recomputed)
    batch = _batch(rows, [3, 1], "right")
    prefix = again.batch(model, batch["dialogue_index"], batch["input_ids"], batch["attention_mask"])
    for position, row in enumerate([3, 1]):
        length = len(rows[row]["input_ids"])
        assert torch.equal(prefix[position, :length], written.states[row].float())
        assert prefix[position, length:].abs().sum() == 0


def test_a_changed_corpus_base_gate_layer_or_dtype_never_reads_the_old_file(tokenizer, rows, tmp_path):
    model = _model(tokenizer)
    old = _filled(model, rows, tmp_path).path
    changed_rows = [{**rows[0], "input_ids": rows[0]["input_ids"][:-1] + [rows[0]["input_ids"][-1] + 1]}] + rows[1:]
    heavier = _model(tokenizer)
    with torch.no_grad():
        heavier.model.get_decoder().layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    others = {
        "corpus": PrefixCache(model, changed_rows, "float32", tmp_path),
        "base": PrefixCache(heavier, rows, "float32", tmp_path),
        "gate_layer": PrefixCache(_model(tokenizer, gate_layer=1), rows, "float32", tmp_path),
        "dtype": PrefixCache(model, rows, "bfloat16", tmp_path),
    }
    for what, cache in others.items():
        assert cache.path != old and len(cache) == 0, what
    # A change above gate_layer does not change the prefix, so the file stays valid.
    above = _model(tokenizer)
    with torch.no_grad():
        above.model.get_decoder().layers[GATE_LAYER].mlp.up_proj.weight[0, 0] += 1e-3
    assert len(PrefixCache(above, rows, "float32", tmp_path)) == 4


def test_a_renamed_cache_file_is_refused_naming_the_file_and_the_fix(tokenizer, rows, tmp_path):
    model = _model(tokenizer)
    other = _filled(_model(tokenizer, gate_layer=1), rows, tmp_path / "other").path
    target = PrefixCache(model, rows, "float32", tmp_path).path
    target.write_bytes(other.read_bytes())
    with pytest.raises(ValueError) as error:
        PrefixCache(model, rows, "float32", tmp_path)
    message = str(error.value)
    assert str(target) in message and "gate_layer" in message and "base" in message and f"rm {target}" in message


@pytest.mark.parametrize("damage", ["garbage", "truncated", "tensors"])
def test_a_damaged_cache_file_is_refused_naming_the_file_and_the_fix(tokenizer, rows, tmp_path, damage):
    model = _model(tokenizer)
    cache = _filled(model, rows, tmp_path)
    data = cache.path.read_bytes()
    if damage == "garbage":
        cache.path.write_bytes(b"not a safetensors file")
    elif damage == "truncated":
        cache.path.write_bytes(data[: len(data) // 2])
    else:  # well-formed, but its tensors do not match its dialogues
        from safetensors.torch import save_file

        save_file({"index": torch.tensor([0, 1]), "states": torch.zeros(3, 32)}, str(cache.path), metadata=cache.identity)
    with pytest.raises(ValueError) as error:
        PrefixCache(model, rows, "float32", tmp_path)
    message = str(error.value)
    assert str(cache.path) in message and "damaged" in message and f"rm {cache.path}" in message


def test_rows_out_of_dataset_order_or_not_right_padded_are_refused(tokenizer, rows, tmp_path):
    model = _model(tokenizer)
    cache = PrefixCache(model, rows, "float32", tmp_path)
    batch = _batch(rows, [0, 1], "right")
    with pytest.raises(ValueError, match="training dialogue 5 has"):
        cache.batch(model, torch.tensor([5, 1]), batch["input_ids"], batch["attention_mask"])
    left = _batch(rows, [0, 1], "left")
    with pytest.raises(ValueError, match="right-padded"):
        cache.batch(model, left["dialogue_index"], left["input_ids"], left["attention_mask"])


def test_a_prefix_that_overflows_the_storage_dtype_is_refused(tokenizer, rows, tmp_path):
    model = _model(tokenizer)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e8)
    cache = PrefixCache(model, rows, "float16", tmp_path)
    batch = _batch(rows, [0], "right")
    with pytest.raises(ValueError, match="not finite in torch.float16.*prefix_cache_dtype: float32"):
        cache.batch(model, batch["dialogue_index"], batch["input_ids"], batch["attention_mask"])


# --------------------------------------------------------------------- settings


def test_prefix_cache_settings_are_validated(corpus_dir):
    with pytest.raises(ConfigError, match="training.prefix_cache: 'yes' is not one of"):
        tiny_config(corpus_dir, training={"prefix_cache": "yes"})
    with pytest.raises(ConfigError, match="training.prefix_cache_dtype: 'fp8'"):
        tiny_config(corpus_dir, training={"prefix_cache_dtype": "fp8"})
    with pytest.raises(ConfigError, match="needs a gated model, but method is 'single_lora'"):
        tiny_config(corpus_dir, method="single_lora", training={"prefix_cache": "on"})
    assert tiny_config(corpus_dir).training.prefix_cache == "auto"


def test_when_the_prefix_cache_is_used(tokenizer):
    gated, bottom = _model(tokenizer), _model(tokenizer, gate_layer=0)
    assert use_prefix_cache("auto", gated, 1) == (not torch.cuda.is_available())
    assert not use_prefix_cache("auto", gated, 2) and not use_prefix_cache("auto", bottom, 1)
    assert not use_prefix_cache("auto", _base(), 1) and not use_prefix_cache("off", gated, 1)
    assert use_prefix_cache("on", gated, 1) and use_prefix_cache("on", bottom, 1)
    with pytest.raises(ValueError, match="2 processes.*prefix_cache: off"):
        use_prefix_cache("on", gated, 2)
    with pytest.raises(ValueError, match="needs a gated model"):
        use_prefix_cache("on", _base(), 1)


# --------------------------------------------------------------------- the trainer


@pytest.mark.integration
def test_training_on_the_prefix_cache_logs_the_losses_of_full_training(corpus_dir, tmp_path, monkeypatch):
    from moe_empathy.train.trainer import train

    def config(mode: str):
        return tiny_config(
            corpus_dir,
            model={"gate_layer": GATE_LAYER},
            data={"max_train_dialogues": 16, "max_eval_dialogues": 8},
            training={"max_steps": 5, "eval_steps": 5, "logging_steps": 1, "prefix_cache": mode, "prefix_cache_dir": str(tmp_path / "cache")},
        )

    def losses(run):
        logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        return [(log["loss"], log["lm_loss"], log["gate_accuracy"]) for log in logs if "loss" in log and "eval_loss" not in log]

    full = train(config("off"), tmp_path / "full")
    cached = train(config("on"), tmp_path / "cached")  # 2 steps an epoch: 1 computing, 1.5 epochs reading
    assert full["prefix_cache"] is None and Path(cached["prefix_cache"]).is_file()
    assert len(losses(tmp_path / "full")) == 5
    for (loss, lm, accuracy), (cached_loss, cached_lm, cached_accuracy) in zip(losses(tmp_path / "full"), losses(tmp_path / "cached")):
        assert cached_loss == pytest.approx(loss, rel=1e-5) and cached_lm == pytest.approx(lm, rel=1e-5)
        assert cached_accuracy == accuracy
    assert cached["validation"]["eval_loss"] == pytest.approx(full["validation"]["eval_loss"], rel=1e-5)

    def recomputed(*args):
        raise AssertionError("a cached prefix was recomputed")

    monkeypatch.setattr("moe_empathy.train.prefix_cache.compute_prefix", recomputed)
    again = train(config("auto"), tmp_path / "again")  # auto: on, on a CPU; every prefix read from the file
    assert again["prefix_cache"] == cached["prefix_cache"] or torch.cuda.is_available()
