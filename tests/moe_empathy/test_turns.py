import pytest
import torch

from moe_empathy import derive_turn_ids, encode_chat, find_turn_markers
from moe_empathy.turns import validate_turn_ids


def test_markers_of_chatml(tokenizer):
    user, assistant = find_turn_markers(tokenizer)
    assert tokenizer.decode(user) == "<|im_start|>user\n"
    assert tokenizer.decode(assistant) == "<|im_start|>assistant\n"


def test_encode_chat_marks_turns_replies_and_labels(tokenizer, dialogue):
    enc = encode_chat(tokenizer, dialogue[:4])
    ids, turns, gate, labels = (enc[k][0] for k in ("input_ids", "turn_ids", "gate_mask", "labels"))
    assert turns.tolist() == sorted(turns.tolist()) and set(turns.tolist()) == {0, 1}
    reply_tokens = ids[gate == 0]
    text = tokenizer.decode(reply_tokens)
    # Both replies, their end-of-turn tokens and nothing of the users' messages.
    assert dialogue[1]["content"] in text and dialogue[3]["content"] in text
    assert "thesis" not in text and "laptop" not in text
    assert torch.equal(labels[gate == 0], ids[gate == 0])
    assert (labels[gate == 1] == -100).all()
    # The system prompt and first user message belong to turn 0, the second user message to turn 1.
    assert "thesis" in tokenizer.decode(ids[(turns == 1) & (gate == 1)])


def test_generation_prompt_opens_its_own_turn(tokenizer, dialogue):
    enc = encode_chat(tokenizer, dialogue, add_generation_prompt=True)
    assert enc["turn_ids"][0, -1] == 2
    assert tokenizer.decode(enc["input_ids"][0, -4:]) == "<|im_start|>assistant\n"
    assert enc["gate_mask"][0, -1] == 1


def test_batch_is_left_padded_and_padding_is_marked(tokenizer, dialogue):
    enc = encode_chat(tokenizer, [dialogue, dialogue[:1]], add_generation_prompt=True)
    single = encode_chat(tokenizer, dialogue[:1], add_generation_prompt=True)
    width = single["input_ids"].shape[1]
    pad = enc["attention_mask"][1] == 0
    assert pad[: enc["input_ids"].shape[1] - width].all() and not pad[-width:].any()
    assert (enc["turn_ids"][1][pad] == -1).all() and (enc["gate_mask"][1][pad] == 0).all()
    for key in ("input_ids", "turn_ids", "gate_mask", "labels"):
        assert torch.equal(enc[key][1, -width:], single[key][0])


def test_no_chat_template_fails_clearly(tokenizer):
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match="no chat template"):
            encode_chat(tokenizer, [{"role": "user", "content": "hi"}])
    finally:
        tokenizer.chat_template = template


def test_bad_messages_fail_clearly(tokenizer):
    with pytest.raises(ValueError, match="role"):
        encode_chat(tokenizer, [{"text": "hi"}])
    with pytest.raises(ValueError, match="non-empty"):
        encode_chat(tokenizer, [])


def test_continuation_counts_from_the_open_turn(tokenizer, dialogue):
    user, assistant = find_turn_markers(tokenizer)
    full = encode_chat(tokenizer, dialogue, add_generation_prompt=True)
    first = encode_chat(tokenizer, dialogue[:2])
    cut = first["input_ids"].shape[1]
    turns, _ = derive_turn_ids(full["input_ids"][:, cut:], user, assistant, last_turn=torch.tensor([0]))
    assert torch.equal(turns, full["turn_ids"][:, cut:])


def test_no_markers_makes_one_turn():
    turns, gate = derive_turn_ids(torch.ones(2, 5, dtype=torch.long), None, None)
    assert (turns == 0).all() and (gate == 1).all()


def test_validate_turn_ids_errors():
    with pytest.raises(ValueError, match="shape"):
        validate_turn_ids(torch.zeros(1, 3, dtype=torch.long), (1, 4))
    with pytest.raises(ValueError, match="integer"):
        validate_turn_ids(torch.zeros(1, 4), (1, 4))
    with pytest.raises(ValueError, match="decrease in row 0 at position 2"):
        validate_turn_ids(torch.tensor([[0, 1, 0, 1]]), (1, 4))
    with pytest.raises(ValueError, match="-1"):
        validate_turn_ids(torch.tensor([[-2, 0, 0, 1]]), (1, 4))
    validate_turn_ids(torch.tensor([[-1, -1, 0, 2]]), (1, 4))


@pytest.mark.parametrize("length", range(1, 9))  # 1 .. 2x the longest ChatML marker (4 tokens)
def test_every_short_input_gets_turns(tokenizer, dialogue, length):
    ids = encode_chat(tokenizer, dialogue, add_generation_prompt=True)["input_ids"][:, -length:]
    user, assistant = find_turn_markers(tokenizer)
    assert 2 * max(len(user), len(assistant)) == 8
    turn_ids, gate_mask = derive_turn_ids(ids, user, assistant)
    assert turn_ids.shape == gate_mask.shape == ids.shape
    continued, _ = derive_turn_ids(ids, user, assistant, last_turn=torch.tensor([2]))
    assert (continued >= 2).all()


def test_content_must_be_a_string(tokenizer):
    with pytest.raises(ValueError, match="'content' must be a string, got NoneType"):
        encode_chat(tokenizer, [{"role": "user", "content": None}])
