"""Token ids of a rollout's turns: the chat template's separators around each turn, and rows
of tokens with their turn ids and gate mask, batched with left padding."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

_PROBE_USER = "MOEPROBEUSER"
_PROBE_REPLY = "MOEPROBEREPLY"


class TurnTokens:
    """The token ids the chat template puts around each turn, found by rendering probes.

    Args:
        tokenizer: a tokenizer with a chat template (whose renderings of a dialogue are
            prefixes of its continuations).
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        history = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_REPLY}]
        closed = self._render(history, False)
        opened = self._render(history + [{"role": "user", "content": _PROBE_USER}], True)
        if not opened.startswith(closed) or _PROBE_REPLY not in closed:
            raise ValueError("the chat template does not render a dialogue as a prefix of its continuation; rollouts cannot continue it")
        # What the template writes after a reply's text (e.g. "<|im_end|>\n").
        self.closing = closed.split(_PROBE_REPLY, 1)[1]
        # The user message with its markers and the assistant header; {} marks the content.
        self.user_turn = opened[len(closed) :].replace(_PROBE_USER, "{}", 1)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def first(self, system: str | None, user: str) -> list[int]:
        """The prompt of the first turn: system message (if any), user message, assistant header."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        return self._encode(self._render(messages, True))

    def next(self, user: str, stop_text: str = "") -> tuple[list[int], list[int]]:
        """What follows a generated reply: the rest of its closing (part of the reply's turn),
        then the next user message with the assistant header (the new turn).

        Args:
            user: the next user message.
            stop_text: the token that ended the reply (e.g. ``<|im_end|>``), "" when the reply
                was cut at the length cap.
        """
        closing = self.closing
        if stop_text and closing.startswith(stop_text):
            closing = closing[len(stop_text) :]
        return (self._encode(closing) if closing else []), self._encode(self.user_turn.replace("{}", user, 1))


def left_pad(rows: list[list[int]], value: int) -> torch.Tensor:
    """``[batch, width]`` of rows left-padded with ``value``."""
    width = max(len(r) for r in rows)
    return torch.tensor([[value] * (width - len(r)) + r for r in rows], dtype=torch.long)


@dataclass
class RowTokens:
    """A row's tokens with their turn ids and gate mask (what the gate may read)."""

    ids: list[int] = field(default_factory=list)
    turns: list[int] = field(default_factory=list)
    readable: list[int] = field(default_factory=list)

    def add(self, ids: list[int], turn: int, readable: int) -> "RowTokens":
        self.ids += ids
        self.turns += [turn] * len(ids)
        self.readable += [readable] * len(ids)
        return self

    def __add__(self, other: "RowTokens") -> "RowTokens":
        return RowTokens(self.ids + other.ids, self.turns + other.turns, self.readable + other.readable)


def batch_tensors(rows: list[RowTokens], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-padded ``[batch, width]`` ``input_ids``, ``attention_mask``, ``turn_ids`` (-1 on
    padding) and ``gate_mask``."""
    return {
        "input_ids": left_pad([r.ids for r in rows], pad_id),
        "attention_mask": left_pad([[1] * len(r.ids) for r in rows], 0),
        "turn_ids": left_pad([r.turns for r in rows], -1),
        "gate_mask": left_pad([r.readable for r in rows], 0),
    }


def split_reply(new: list[int], eos_ids: set[int]) -> tuple[int, int | None]:
    """Length of a generated reply up to and including its first stop token, and that token
    (None when the reply was cut at the length cap)."""
    for i, token in enumerate(new):
        if token in eos_ids:
            return i + 1, token
    return len(new), None


def eos_ids_of(model, tokenizer) -> set[int]:
    """The token ids that end a reply: the model's generation config's and the tokenizer's."""
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return set(eos) | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
