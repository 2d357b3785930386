"""Trainer runs of the tiny config: learning, checkpoints, exact resume, atomic saves, baselines."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from moe_empathy import register

register()  # AutoModelForCausalLM loads our checkpoints
from moe_empathy import MoeEmpathyForCausalLM
from moe_empathy.train.hf_trainer import EncodedDialogues, MoeEmpathyTrainer
from moe_empathy.train.run import resolve_resume
from moe_empathy.train.trainer import train
from train_support import tiny_config

pytestmark = pytest.mark.integration

NAMES = ["low", "medium", "high"]


def _logs(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def _experts(folder):
    return load_file(str(folder / "experts.safetensors"))


def test_tiny_training_learns_and_saves_loadable_checkpoints(corpus_dir, tmp_path):
    from datasets import load_from_disk

    run = tmp_path / "run"
    config = tiny_config(corpus_dir, training={"max_steps": 40, "eval_steps": 20, "logging_steps": 10})
    summary = train(config, run)

    logs = [log for log in _logs(run) if "lm_loss" in log and "eval_loss" not in log]
    assert [log["step"] for log in logs] == [10, 20, 30, 40]
    assert logs[-1]["lm_loss"] < logs[0]["lm_loss"]
    assert logs[-1]["gate_label_loss"] < logs[0]["gate_label_loss"]
    for key in ("loss", "gate_label_loss", "load_balancing_loss", "z_loss", "gate_accuracy", "gate_entropy", "tokens_per_second"):
        assert all(key in log for log in logs), key
    # Well above chance (1/3), and above always answering the test split's most common level.
    levels = Counter(t["level"] for r in load_from_disk(str(corpus_dir))["test"] for t in r["turns"] if t["role"] == "assistant")
    majority = max(levels.values()) / sum(levels.values())
    accuracy = summary["test"]["test_gate_accuracy"]
    assert accuracy > max(majority, 1 / 3 + 0.15), (accuracy, majority)
    assert summary["padding_fraction"]["bucket"] < summary["padding_fraction"]["pad"]

    # Checkpoints are compact and load with AutoModelForCausalLM; `last` is the final state.
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    for folder in (run / "last", run / "best", run / "checkpoint-20"):
        assert not list(folder.glob("model*.safetensors"))
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert isinstance(model, MoeEmpathyForCausalLM)
        stored = _experts(folder)
        assert all(torch.equal(model.expert_state_dict()[k], stored[k]) for k in stored)
    final = _experts(run / "last")
    assert all(torch.equal(final[k], v) for k, v in _experts(run / "checkpoint-40").items())
    assert summary["best_checkpoint"].endswith(("checkpoint-20", "checkpoint-40"))


def test_resume_is_exact_and_an_interrupted_save_leaves_the_last_checkpoint(corpus_dir, tmp_path, monkeypatch):
    config = tiny_config(corpus_dir, training={"max_steps": 6, "eval_steps": 3, "logging_steps": 1}, data={"max_eval_dialogues": 8})
    train(config, tmp_path / "full")

    save_rng_state = MoeEmpathyTrainer._save_rng_state

    def killed_at_step_6(self, output_dir):
        if self.state.global_step == 6:
            raise KeyboardInterrupt("killed while writing a checkpoint")
        save_rng_state(self, output_dir)

    cut = tmp_path / "cut"
    monkeypatch.setattr(MoeEmpathyTrainer, "_save_rng_state", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(config, cut)
    monkeypatch.undo()
    assert (cut / "tmp-checkpoint-6" / "experts.safetensors").is_file()
    assert not (cut / "checkpoint-6").exists()
    assert resolve_resume(cut) == str(cut / "checkpoint-3")
    assert isinstance(AutoModelForCausalLM.from_pretrained(cut / "checkpoint-3"), MoeEmpathyForCausalLM)

    train(config, cut, resume=cut)
    full, resumed = _experts(tmp_path / "full" / "checkpoint-6"), _experts(cut / "checkpoint-6")
    assert full.keys() == resumed.keys()
    for key in full:
        assert torch.equal(full[key], resumed[key]), key
    assert not (cut / "tmp-checkpoint-6").exists()
    # The log keeps one line per step: the interrupted run's steps 4-6 were replaced.
    steps = [log["step"] for log in _logs(cut) if "loss" in log and "eval_loss" not in log]
    assert steps == [1, 2, 3, 4, 5, 6]
    losses = {log["step"]: log["loss"] for log in _logs(tmp_path / "full") if "loss" in log and "eval_loss" not in log}
    assert [log["loss"] for log in _logs(cut) if "loss" in log and "eval_loss" not in log] == [losses[s] for s in steps]


def test_baselines_share_the_trainer(corpus_dir, tmp_path):
    short = {"training": {"max_steps": 2, "eval_steps": 2, "logging_steps": 1}, "data": {"max_eval_dialogues": 8}}
    single = train(tiny_config(corpus_dir, method="single_lora", **short), tmp_path / "single")
    assert (tmp_path / "single" / "last" / "adapter_model.safetensors").is_file()
    assert "test_gate_accuracy" not in single["test"] and single["test"]["test_lm_loss"] > 0

    experts = tmp_path / "experts"
    per_level = train(tiny_config(corpus_dir, method="per_level", **short), experts)
    assert set(per_level["experts"]) == set(NAMES)
    for name in NAMES:
        assert (experts / name / "adapter_config.json").is_file()
        assert per_level["experts"][name]["steps"] == 2
    assert json.loads((experts / "summary.json").read_text())["method"] == "per_level"

    gated = tiny_config(corpus_dir, method="gated_from_experts", model={"init_from_experts": str(experts)}, **short)
    summary = train(gated, tmp_path / "gated")
    assert "test_gate_accuracy" in summary["test"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gated" / "last")
    assert model.expert_names == NAMES
    assert all(linear.lora_B.abs().sum() > 0 for linear in model.experts.values())


def test_the_trainers_objective_is_the_per_step_formula(tokenizer, tmp_path):
    """LM loss summed over the step's assistant tokens, gate-label and z losses summed over its
    labelled turns, plus the load-balancing loss: the objective as it was written out before the
    losses had a module of their own, and its gradients."""
    import torch.nn.functional as F
    from transformers import LlamaForCausalLM, TrainingArguments

    from moe_empathy.train.collate import IGNORE_INDEX, DialogueCollator, encode_dialogue
    from moe_empathy.train.config_sections import TinyBaseSection
    from moe_empathy.train.synth import SynthConfig, generate
    from moe_empathy.turns import find_turn_markers

    records = generate(SynthConfig(dialogues=20, min_turns=2, max_turns=3, seed=5))["train"][:4]
    rows = [encode_dialogue(r, tokenizer, find_turn_markers(tokenizer), NAMES, 512) for r in records]
    batch = DialogueCollator(pad_token_id=2)(rows)
    torch.manual_seed(0)
    base = LlamaForCausalLM(TinyBaseSection(hidden_size=32, intermediate_size=64).llama_config(len(tokenizer)))
    model = MoeEmpathyForCausalLM.from_base(base, tokenizer=tokenizer, lora_rank=4, gate_layer=1, gate_temperature=0.7).train()
    with torch.no_grad():
        for linear in model.experts.values():
            linear.lora_B.normal_(std=0.3)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False)
    trainer = MoeEmpathyTrainer(model=model, args=args, train_dataset=EncodedDialogues(rows), train_lengths=[r["length"] for r in rows])
    _, num_items = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    trainer.current_gradient_accumulation_steps = 1
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    cfg = model.config
    out = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "turn_ids", "gate_mask")})
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)
    lm_sum = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    known = (batch["gate_labels"] != IGNORE_INDEX) & out.turn_mask
    logits = out.gate_logits[known]  # [n, E]
    label_sum = F.cross_entropy(logits / cfg.gate_temperature, batch["gate_labels"][known], reduction="sum")
    z_sum = torch.logsumexp(logits, -1).pow(2).sum()
    share = F.one_hot(out.gate_weights[out.turn_mask].argmax(-1), cfg.num_experts).float().mean(0)
    balance = cfg.num_experts * (share * F.softmax(out.gate_logits[out.turn_mask] / cfg.gate_temperature, -1).mean(0)).sum()
    expected = (
        lm_sum / num_items
        + (cfg.gate_label_loss_weight * label_sum + cfg.z_loss_weight * z_sum) / known.sum()
        + cfg.load_balancing_loss_weight * balance
    )
    expected.backward()
    assert num_items == (targets != IGNORE_INDEX).sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert grads[name].abs().sum() > 0, name
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-6, atol=1e-6, msg=name)
