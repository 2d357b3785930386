"""Teacher-forced gate accuracy: the gate's own forward, scored turn by turn."""

from __future__ import annotations

import torch

from moe_empathy.eval.dialogues import select_dialogues, synthesise_split
from moe_empathy.eval.teacher_forced import gate_accuracy, shifts_followed
from moe_empathy.losses import IGNORE_INDEX
from moe_empathy.train.collate import encode_dialogue
from moe_empathy.train.gate_warmup import TurnFeatures
from moe_empathy.turns import find_turn_markers


def test_shifts_followed_counts_only_turns_whose_label_changes():
    labels = torch.tensor([[0, 0, 2, 2, 1, IGNORE_INDEX]])
    features = TurnFeatures(torch.zeros(1, 6, 4), torch.tensor([[3, 3, 3, 3, 3, 0]]), labels)
    logits = torch.zeros(1, 6, 3)
    logits[0, 2, 2] = 1.0  # the shift to 2 followed; the shift to 1 at turn 4 missed
    assert shifts_followed(logits, features) == (1, 2)


def test_gate_accuracy_agrees_with_the_models_forward(gated, tokenizer):
    records = select_dialogues(synthesise_split("test", 3, 5), 3, 5)
    result = gate_accuracy(gated, tokenizer, records)
    markers = find_turn_markers(tokenizer)
    right = total = 0
    for record in records:
        row = encode_dialogue(record, tokenizer, markers, gated.config.expert_names, 10**6)
        with torch.no_grad():
            weights = gated(**{k: torch.tensor([row[k]]) for k in ("input_ids", "turn_ids", "gate_mask")}).gate_weights[0]
        right += int((weights.argmax(-1) == torch.tensor(row["gate_labels"])).sum())
        total += len(row["gate_labels"])
    assert result["turns"] == total == 15
    assert abs(result["accuracy"]["all"] - right / total) < 1e-6
