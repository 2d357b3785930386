import copy

from moe_empathy.train.chat_model import load_chat_model
from tests.moe_empathy.conftest import tiny_base


def test_a_loaded_pair_is_set_up_for_left_padded_batches(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token, tokenizer.padding_side = None, "right"
    model = tiny_base(vocab_size=len(tokenizer)).train()

    loaded, loaded_tokenizer = load_chat_model((model, tokenizer))
    assert loaded is model and not loaded.training
    assert loaded_tokenizer.pad_token == tokenizer.eos_token and loaded_tokenizer.padding_side == "left"
    batch = loaded_tokenizer(["hi", "a much longer prompt than the first"], padding=True, return_tensors="pt")
    assert batch["attention_mask"][:, -1].all()  # every prompt ends where generation starts
    assert not batch["attention_mask"][0, 0]
