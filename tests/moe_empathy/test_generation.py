"""The repeat guard: which n-grams it bans on hand-made ids, row independence, padding, its
settings in a generation config, and generate with and without the KV cache."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessorList

from moe_empathy.generation import RepeatGuardConfig, ReplyRepetitionLogitsProcessor
from moe_empathy.loading import shipped_checkpoint
from moe_empathy.turns import encode_chat

VOCAB = 20
PAD = 0


def _banned(processor, input_ids: list[list[int]]) -> list[set[int]]:
    """The tokens each row may not take next."""
    scores = torch.zeros(len(input_ids), VOCAB)
    out = processor(torch.tensor(input_ids), scores)
    return [set(torch.nonzero(torch.isinf(row)).flatten().tolist()) for row in out]


def test_bans_exactly_the_continuations_of_earlier_reply_trigrams():
    # Earlier reply 5 6 7 8 5 6 9: trigrams (5,6,7) (6,7,8) (7,8,5) (8,5,6) (5,6,9).
    processor = ReplyRepetitionLogitsProcessor(3, [[[5, 6, 7, 8, 5, 6, 9]]], prompt_length=3)
    assert _banned(processor, [[1, 2, 3, 5, 6]]) == [{7, 9}]  # both continuations of "5 6"
    assert _banned(processor, [[1, 2, 3, 7, 8]]) == [{5}]
    assert _banned(processor, [[1, 2, 3, 6, 5]]) == [set()]  # "6 5" never occurred
    assert _banned(processor, [[1, 2, 3, 5]]) == [set()]  # reply shorter than the prefix: free


def test_prefix_is_taken_from_the_reply_only_and_replies_do_not_join():
    # Two earlier replies "5 6" and "7 8": the bigrams across them (6 7) is not an n-gram.
    processor = ReplyRepetitionLogitsProcessor(2, [[[5, 6], [7, 8]]], prompt_length=2)
    assert _banned(processor, [[4, 6, 6]]) == [set()]  # "6 7" spans two replies
    assert _banned(processor, [[5, 4, 7]]) == [{8}]
    # The prompt's last token (5) with the first reply token would form "5 6": not looked at.
    assert _banned(processor, [[9, 5]]) == [set()]


def test_own_earlier_ngrams_of_the_current_reply_are_banned():
    processor = ReplyRepetitionLogitsProcessor(3, [[]], prompt_length=1)
    assert _banned(processor, [[1, 4, 5, 6, 4, 5]]) == [{6}]
    assert _banned(processor, [[1, 4, 5, 6, 4]]) == [set()]
    # The prompt's tokens are not part of the reply: "1 4 5" before them does not count.
    assert _banned(ReplyRepetitionLogitsProcessor(3, [[]], prompt_length=3), [[1, 4, 5, 9, 1, 4]]) == [set()]


def test_rows_are_independent_and_left_padding_is_ignored():
    earlier = [[[5, 6, 7]], [[5, 6, 8], [3, 3, 3, 3]], []]
    processor = ReplyRepetitionLogitsProcessor(3, earlier, prompt_length=4)
    batch = [
        [PAD, PAD, 1, 2, 5, 6],  # left-padded prompt
        [1, 2, 3, 4, 5, 6],
        [PAD, PAD, PAD, 1, 5, 6],
    ]
    assert _banned(processor, batch) == [{7}, {8}, set()]
    alone = ReplyRepetitionLogitsProcessor(3, earlier[1:2], prompt_length=2)
    assert _banned(alone, [[3, 4, 5, 6]]) == [{8}]  # same row, other padding, no neighbours
    # Padding values inside the processor's n-gram table (-1) never match a real prefix.
    assert _banned(processor, [[1, 1, 1, 1, 3, 3], [1, 1, 1, 1, 3, 3], [1, 1, 1, 1, 3, 3]]) == [set(), {3}, set()]


def test_penalty_subtracts_instead_of_banning():
    processor = ReplyRepetitionLogitsProcessor(2, [[[5, 6], [5, 7], [5, 6]]], prompt_length=1, penalty=2.5)  # "5 6" twice: one penalty
    scores = torch.ones(1, VOCAB)
    out = processor(torch.tensor([[1, 5]]), scores.clone())
    expected = scores.clone()
    expected[0, [6, 7]] -= 2.5
    assert torch.equal(out, expected)


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="ngram_size must be >= 2"):
        ReplyRepetitionLogitsProcessor(1, [[]], 0)
    with pytest.raises(ValueError, match="penalty must be a positive finite"):
        ReplyRepetitionLogitsProcessor(3, [[]], 0, penalty=math.inf)
    processor = ReplyRepetitionLogitsProcessor(3, [[], []], 2)
    with pytest.raises(ValueError, match="built for 2 rows but generate runs 1"):
        processor(torch.tensor([[1, 2, 3]]), torch.zeros(1, VOCAB))
    with pytest.raises(ValueError, match="repeat_guard_ngram_size must be an integer >= 2"):
        RepeatGuardConfig(ngram_size=1)


def test_settings_survive_a_generation_config_round_trip(tmp_path):
    config = GenerationConfig.from_dict({"_from_model_config": True, "eos_token_id": 2})
    assert RepeatGuardConfig.from_generation_config(config) == RepeatGuardConfig()  # nothing stored: defaults
    RepeatGuardConfig(ngram_size=5, penalty=3.0).write_to(config)
    config.save_pretrained(tmp_path)
    loaded = GenerationConfig.from_pretrained(tmp_path)
    assert RepeatGuardConfig.from_generation_config(loaded) == RepeatGuardConfig(ngram_size=5, penalty=3.0)


def test_the_shipped_checkpoint_carries_the_guard_settings():
    folder = shipped_checkpoint()
    if folder is None:
        pytest.skip("no shipped checkpoint in this tree")
    loaded = GenerationConfig.from_pretrained(folder)
    assert hasattr(loaded, "repeat_guard_ngram_size"), "generation_config.json lost its repeat_guard_* fields (is _from_model_config true?)"
    assert RepeatGuardConfig.from_generation_config(loaded) == RepeatGuardConfig(loaded.repeat_guard_ngram_size, loaded.repeat_guard_penalty)


def test_generate_with_the_guard_equals_with_and_without_cache(model, tokenizer, dialogue):
    chats = [dialogue, dialogue[:3]]
    encoded = [encode_chat(tokenizer, chat, add_generation_prompt=True) for chat in chats]
    width = max(e["input_ids"].shape[1] for e in encoded)
    batch = {}
    for key, pad in (("input_ids", tokenizer.pad_token_id), ("attention_mask", 0), ("turn_ids", -1), ("gate_mask", 0)):
        batch[key] = torch.cat([torch.nn.functional.pad(e[key], (width - e[key].shape[1], 0), value=pad) for e in encoded])
    earlier = [
        [tokenizer(m["content"], add_special_tokens=False)["input_ids"] for m in chat if m["role"] == "assistant"] for chat in chats
    ]
    guard = RepeatGuardConfig(ngram_size=2)
    outputs = {}
    for use_cache in (True, False):
        processors = LogitsProcessorList([guard.processor(earlier, width)])
        outputs[use_cache] = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=use_cache, logits_processor=processors)
    assert torch.equal(outputs[True], outputs[False])
    # The guard changed the decoding and no reply repeats a bigram of its row's earlier replies or of itself.
    plain = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert not torch.equal(plain, outputs[True])
    for b, row in enumerate(outputs[True][:, width:].tolist()):
        row = row[: row.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in row else row
        seen = {tuple(r[i : i + 2]) for r in earlier[b] for i in range(len(r) - 1)}
        for i in range(len(row) - 1):
            assert tuple(row[i : i + 2]) not in seen
            seen.add(tuple(row[i : i + 2]))
