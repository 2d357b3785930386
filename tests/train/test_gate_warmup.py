"""The gate's warm-up on cached turn features, and training the experts apart by label."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from moe_empathy import MoeEmpathyConfig, MoeEmpathyForCausalLM
from moe_empathy.eval import own_replies
from moe_empathy.losses import IGNORE_INDEX
from moe_empathy.train.collate import encode_dialogue
from moe_empathy.train.config import ConfigError
from moe_empathy.train.config_sections import GateWarmupSection
from moe_empathy.train import gate_rewarm
from moe_empathy.train.gate_rewarm import check_rewarmable
from moe_empathy.train.gate_warmup import (
    TurnFeatures, accuracy_by_turn, load_features, save_features, shuffle_replies, train_gate, turn_features,
)
from moe_empathy.train.synth import SynthConfig, generate
from moe_empathy.train.trainer import train
from moe_empathy.turns import find_turn_markers
from test_prefix_cache import NAMES, _base
from train_support import tiny_config, tiny_values


@pytest.fixture(scope="module")
def long_rows(tokenizer) -> list[dict]:
    """Six encoded dialogues of 4-9 turns (different lengths, so batches are padded)."""
    records = generate(SynthConfig(dialogues=30, min_turns=4, max_turns=9, seed=7))["train"][:6]
    markers = find_turn_markers(tokenizer)
    return [encode_dialogue(r, tokenizer, markers, NAMES, 2048) for r in records]


@pytest.mark.parametrize("memory", ["none", "gru"])
def test_features_give_the_logits_of_the_models_own_forward(tokenizer, long_rows, memory):
    """The warm-up trains exactly what the model's forward computes from the same dialogue."""
    model = MoeEmpathyForCausalLM.from_base(
        _base(), tokenizer=tokenizer, lora_rank=4, gate_layer=2, gate_memory=memory, gate_memory_size=8, expert_names=NAMES
    ).eval()
    features = turn_features(model, long_rows, pad_token_id=2, batch_size=4)
    logits, _ = model.gate.decide(features.pooled, features.counts, torch.zeros_like(features.counts, dtype=torch.bool), None)
    for i, row in enumerate(long_rows):
        turns = len(row["gate_labels"])
        with torch.no_grad():
            out = model(**{k: torch.tensor([row[k]]) for k in ("input_ids", "turn_ids", "gate_mask")})
        torch.testing.assert_close(logits[i, :turns], out.gate_logits[0], rtol=1e-4, atol=1e-5)
        assert features.labels[i, :turns].tolist() == row["gate_labels"]
        assert (features.labels[i, turns:] == IGNORE_INDEX).all() and (features.counts[i, turns:] == 0).all()


def _remembered(dialogues: int, turns: int, hidden: int, seed: int) -> TurnFeatures:
    """Features whose label is set by a signal seen only at the turns where it changes, as a
    state-changing message is followed by follow-up questions that say nothing of the state."""
    generator = torch.Generator().manual_seed(seed)
    pooled = torch.randn(dialogues, turns, hidden, generator=generator) * 0.1
    labels = torch.zeros(dialogues, turns, dtype=torch.long)
    for d in range(dialogues):
        label = int(torch.randint(3, (1,), generator=generator))
        for t in range(turns):
            if t == 0 or torch.rand(1, generator=generator) < 0.2:
                label = int(torch.randint(3, (1,), generator=generator))
                pooled[d, t, label] += 3.0  # the signal, only on the turn that changes the state
            labels[d, t] = label
    return TurnFeatures(pooled, torch.ones(dialogues, turns, dtype=torch.long), labels)


@pytest.mark.parametrize("memory", ["none", "gru"])
def test_warm_up_learns_what_only_a_memory_can_carry(tokenizer, memory):
    hidden = 16
    model = MoeEmpathyForCausalLM.from_base(
        _base(), tokenizer=tokenizer, lora_rank=4, gate_layer=2, gate_memory=memory, gate_memory_size=16, expert_names=NAMES
    )
    model.gate = type(model.gate)(hidden, 3, 32, "soft", 1, 1.0, memory, 0.5, 16)  # a gate reading 16-wide features
    train_set, validation = _remembered(192, 12, hidden, seed=0), _remembered(64, 12, hidden, seed=1)
    log = train_gate(model, train_set, validation, GateWarmupSection(epochs=30, batch_size=32, learning_rate=1e-2), seed=0)
    accuracy = accuracy_by_turn(model, validation)
    assert accuracy["all"] == log["best"]["validation_accuracy"]["all"]  # the best state is the one kept
    if memory == "gru":
        assert accuracy["all"] > 0.9
    else:  # each turn alone: right on the changing turns, chance-like on the others
        assert accuracy["all"] < 0.7


def test_features_are_saved_and_read_back(tmp_path):
    features = {"train": _remembered(4, 5, 8, seed=0), "test": _remembered(2, 3, 8, seed=1)}
    save_features(features, tmp_path / "f.safetensors")
    again = load_features(tmp_path / "f.safetensors")
    assert again.keys() == features.keys()
    for name, f in features.items():
        for key in ("pooled", "counts", "labels"):
            assert torch.equal(getattr(again[name], key), getattr(f, key))


@pytest.mark.integration  # a trainer run
def test_a_run_with_warm_up_and_label_routing(corpus_dir, tmp_path):
    """The warm-up writes its log and the joint run keeps its gate (freeze_gate) while the
    experts train by label."""
    config = tiny_config(
        corpus_dir,
        model={"gate_memory": "gru", "gate_memory_size": 8},
        gate_warmup={"data": {"path": str(corpus_dir), "max_length": 256}, "epochs": 3, "batch_size": 16},
        training={"max_steps": 3, "eval_steps": 3, "label_routing": 1.0, "freeze_gate": True},
    )
    train(config, output_dir=tmp_path / "run")
    log = json.loads((tmp_path / "run" / "gate_warmup.json").read_text())
    assert len(log["epochs"]) == 3 and log["turns"]["train"] > 0
    assert 0.0 <= log["test_accuracy"]["all"] <= 1.0
    warmed = load_features(tmp_path / "run" / "gate_features.safetensors")
    assert set(warmed) == {"train", "validation", "test"}
    trained = MoeEmpathyForCausalLM.from_pretrained(tmp_path / "run" / "last")
    accuracy = accuracy_by_turn(trained, warmed["test"])
    assert accuracy["all"] == pytest.approx(log["test_accuracy"]["all"])  # the frozen gate is the warmed-up one


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"training": {"label_routing": 1.5}}, "label_routing: must lie in"),
        ({"method": "single_lora", "training": {"label_routing": 1.0}}, "need a gated model"),
        ({"method": "per_level", "gate_warmup": {"data": {"path": "x"}}}, "need a gated model"),
        ({"gate_warmup": {"epochs": 2}}, "gate_warmup.data.path is missing"),
        ({"gate_warmup": {"data": {"path": "x"}, "epochs": 0}}, "gate_warmup.epochs"),
    ],
)
def test_warm_up_and_label_routing_settings_are_checked(corpus_dir, sections, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(corpus_dir, **sections)


def test_a_restarted_warm_up_reads_its_features_back_unless_the_dialogues_changed(tokenizer, long_rows, tmp_path, monkeypatch):
    from moe_empathy.train import gate_warmup

    model = MoeEmpathyForCausalLM.from_base(_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=2, expert_names=NAMES)
    splits = {"train": long_rows[:4], "validation": long_rows[4:5], "test": long_rows[5:]}
    section = GateWarmupSection(epochs=1, batch_size=4)
    first = gate_warmup.warm_up_gate(model, splits, 2, section, 0, tmp_path)
    computed = []
    real = gate_warmup.turn_features
    monkeypatch.setattr(gate_warmup, "turn_features", lambda *a, **k: computed.append(1) or real(*a, **k))
    again = gate_warmup.warm_up_gate(model, splits, 2, section, 0, tmp_path)
    assert computed == [] and again["dialogues"] == first["dialogues"]
    gate_warmup.warm_up_gate(model, {**splits, "train": long_rows[:3]}, 2, section, 0, tmp_path)
    assert len(computed) == 3  # another corpus: every split computed again
    assert load_features(tmp_path / "gate_features.safetensors")["train"].pooled.shape[0] == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_warm_up_runs_on_the_device_it_is_given_and_matches_the_cpu(tokenizer, long_rows, tmp_path):
    from moe_empathy.train import gate_warmup

    splits = {"train": long_rows[:4], "validation": long_rows[4:5], "test": long_rows[5:]}
    section = GateWarmupSection(epochs=2, batch_size=4)
    logs = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = MoeEmpathyForCausalLM.from_base(_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=2, expert_names=NAMES)
        logs[device] = gate_warmup.warm_up_gate(model, splits, 2, section, 0, tmp_path / device, device=device)
        assert next(model.gate.parameters()).device.type == device
    for cpu, cuda in zip(logs["cpu"]["epochs"], logs["cuda"]["epochs"]):
        assert cuda["train_loss"] == pytest.approx(cpu["train_loss"], rel=1e-3)


def test_compare_memories_trains_one_fresh_gate_per_kind_and_puts_the_own_gate_back(tokenizer):
    from moe_empathy.train.gate_warmup import compare_memories

    model = MoeEmpathyForCausalLM.from_base(_base(), tokenizer=tokenizer, lora_rank=4, gate_layer=2, gate_memory_size=8, expert_names=NAMES)
    own = model.gate
    features = {"train": _remembered(32, 6, 32, seed=0), "validation": _remembered(8, 6, 32, seed=1), "test": _remembered(8, 6, 32, seed=2)}
    results = compare_memories(model, features, ["none", "gru"], GateWarmupSection(epochs=2, batch_size=16), seed=0)
    assert list(results) == ["none", "gru"] and model.gate is own
    assert all(0.0 <= r["test"]["all"] <= 1.0 for r in results.values())


def test_shuffled_replies_keep_the_users_and_the_labels():
    records = generate(SynthConfig(dialogues=40, min_turns=3, max_turns=6, seed=3))["train"]
    shuffled = shuffle_replies(records, seed=0)
    assert shuffle_replies(records, seed=0) == shuffled  # seeded
    pool = {t["content"] for r in records for t in r["turns"] if t["role"] == "assistant"}
    changed = 0
    for before, after in zip(records, shuffled):
        assert [t["role"] for t in after["turns"]] == [t["role"] for t in before["turns"]]
        for old, new in zip(before["turns"], after["turns"]):
            assert {k: v for k, v in new.items() if k != "content"} == {k: v for k, v in old.items() if k != "content"}
            if old["role"] == "user":
                assert new == old
            else:
                assert new["content"] in pool
                changed += new["content"] != old["content"]
    assert changed > 0.9 * sum(len(r["turns"]) // 2 for r in records)


def test_rewarm_refuses_experts_that_trained_under_the_gate(corpus_dir):
    warmup = {"data": {"path": str(corpus_dir)}, "epochs": 1}
    config = tiny_config(corpus_dir, gate_warmup=warmup, training={"label_routing": 0.5, "freeze_gate": True})
    with pytest.raises(ConfigError, match="retrain with `moe-empathy train`"):
        check_rewarmable(config, MoeEmpathyConfig())
    with pytest.raises(ConfigError, match="not one of"):
        tiny_config(corpus_dir, gate_warmup={**warmup, "context_replies": "random"})


@pytest.mark.integration  # a trainer run
def test_rewarm_changes_the_gate_and_keeps_the_experts(corpus_dir, tmp_path, monkeypatch):
    """A run routed by label with a frozen gate, then its gate warmed up again on shuffled replies,
    and on its own replies."""
    sections = {
        "model": {"gate_memory": "gru", "gate_memory_size": 8},
        "gate_warmup": {"data": {"path": str(corpus_dir), "max_length": 256}, "epochs": 2, "batch_size": 16},
        "training": {"max_steps": 2, "eval_steps": 2, "label_routing": 1.0, "freeze_gate": True},
    }
    train(tiny_config(corpus_dir, **sections), output_dir=tmp_path / "run")
    sections["gate_warmup"] |= {"context_replies": "shuffled", "epochs": 3}
    values = tiny_values(corpus_dir, **sections)
    (tmp_path / "rewarm.yaml").write_text(yaml.safe_dump(values))
    assert gate_rewarm.main(["--model", str(tmp_path / "run" / "last"), "--config", str(tmp_path / "rewarm.yaml"), "--out", str(tmp_path / "new")]) == 0
    assert (tmp_path / "new" / "experts.safetensors").is_file() and not (tmp_path / "new" / "model.safetensors").exists()  # compact
    before = MoeEmpathyForCausalLM.from_pretrained(tmp_path / "run" / "last")
    after = MoeEmpathyForCausalLM.from_pretrained(tmp_path / "new")
    experts = {k: v for k, v in before.state_dict().items() if "lora_" in k}
    assert experts and all(torch.equal(v, after.state_dict()[k]) for k, v in experts.items())
    assert any(not torch.equal(p, q) for p, q in zip(before.gate.parameters(), after.gate.parameters()))
    assert len(json.loads((tmp_path / "new" / "gate_warmup.json").read_text())["epochs"]) == 3
    # The same on contexts that hold the model's own replies: every warm-up dialogue is played.
    given = ["--model", str(tmp_path / "run" / "last"), "--config", str(tmp_path / "rewarm.yaml")]
    with monkeypatch.context() as patched:  # an --out already taken is refused before any dialogue is played
        patched.setattr(own_replies, "rollout", lambda *a, **k: pytest.fail("played a dialogue for a refused --out"))
        assert own_replies.main([*given, "--out", str(tmp_path / "new")]) == 2
    assert own_replies.main([*given, "--out", str(tmp_path / "own"), "--reply-tokens", "4"]) == 0
    played = (tmp_path / "own" / "own_replies.jsonl").read_text().splitlines()
    log = json.loads((tmp_path / "own" / "gate_warmup.json").read_text())
    assert len(played) == sum(log["dialogues"].values())
    own = MoeEmpathyForCausalLM.from_pretrained(tmp_path / "own")
    assert all(torch.equal(v, own.state_dict()[k]) for k, v in experts.items())
