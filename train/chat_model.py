"""A local Hugging Face chat model set up for batched prompting: the one place where
the synthetic-dialogue LLM backend and the evaluation's LLM judge load their model."""

from __future__ import annotations


def load_chat_model(model):
    """Resolve a chat-model argument to ``(model, tokenizer)``, ready for batched prompts.

    The tokenizer pads on the left (so that every prompt of a batch ends where generation
    starts) and, if it has no pad token, pads with its end-of-sequence token; the model
    is in eval mode.

    Args:
        model: a folder of a Hugging Face chat model, a ``(model, tokenizer)`` pair, or
            None for ``moe_empathy.load_default_base()`` (the embedded SmolLM2).
    """
    if model is None:
        from moe_empathy import load_default_base

        model, tokenizer = load_default_base()
    elif isinstance(model, (tuple, list)):
        model, tokenizer = model
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
        model = AutoModelForCausalLM.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.eval(), tokenizer
