"""From chats to ``turn_ids`` and ``gate_mask``.

A *turn* (exchange) is one user message and the assistant reply to it; a system prompt
belongs to turn 0. ``turn_ids [batch, seq]`` gives each token's turn (-1 on padding) and
``gate_mask [batch, seq]`` is 1 on every token a gate may read: everything but assistant
replies (the reply's end-of-turn token and the newline after it included).

Both are derived from two token-id *markers* found in the chat template: the tokens that
open a user message (``<|im_start|>user\\n`` for ChatML) and those that open an assistant
reply. The same derivation serves :func:`encode_chat` and a model called without
``turn_ids`` (plain ``generate`` or a ``pipeline``), so both agree token for token.
"""

from __future__ import annotations

import torch
from transformers import BatchEncoding, PreTrainedTokenizerBase

_PROBE = [
    {"role": "user", "content": "MOEPROBEUSERONE"},
    {"role": "assistant", "content": "MOEPROBEREPLY"},
    {"role": "user", "content": "MOEPROBEUSERTWO"},
]


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its end-of-sequence token.

    Args:
        tokenizer: a Hugging Face tokenizer.
    """
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def find_turn_markers(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Finds the token ids that open a user message and an assistant reply in the template.

    Args:
        tokenizer: a tokenizer with a chat template.

    Returns:
        ``(user_turn_marker, assistant_turn_marker)`` as lists of token ids.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"{type(tokenizer).__name__} has no chat template, so turns cannot be found; set "
            "`tokenizer.chat_template`, or pass `turn_ids` and `gate_mask` yourself."
        )
    two = _render(tokenizer, _PROBE[:2], False)
    three = _render(tokenizer, _PROBE, False)
    opened = _render(tokenizer, _PROBE, True)
    if not three.startswith(two) or not opened.startswith(three):
        raise ValueError(
            "the chat template does not render a conversation as a prefix of its continuation, so turn "
            "markers cannot be derived; set `user_turn_marker` and `assistant_turn_marker` in the config."
        )
    user_text = three[len(two) :].split(_PROBE[2]["content"])[0]
    assistant_text = opened[len(three) :]
    markers = []
    for text, role in ((user_text, "user"), (assistant_text, "assistant")):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        full = tokenizer(opened, add_special_tokens=False)["input_ids"]
        if not ids or not _contains(full, ids):
            raise ValueError(
                f"the {role} marker {text!r} of the chat template does not tokenise the same inside a "
                "conversation; set `user_turn_marker` and `assistant_turn_marker` in the config."
            )
        markers.append(ids)
    return markers[0], markers[1]


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def _marker_hits(input_ids: torch.Tensor, marker: list[int]) -> torch.Tensor:
    """``[batch, seq]`` True at each position where ``marker`` starts."""
    batch, seq = input_ids.shape
    width = len(marker)
    hits = torch.zeros(batch, seq, dtype=torch.bool, device=input_ids.device)
    if seq >= width:
        windows = input_ids.unfold(1, width, 1)  # [batch, seq - width + 1, width]
        hits[:, : seq - width + 1] = (windows == torch.tensor(marker, device=input_ids.device)).all(-1)
    return hits


def derive_turn_ids(
    input_ids: torch.Tensor,
    user_turn_marker: list[int] | None,
    assistant_turn_marker: list[int] | None,
    attention_mask: torch.Tensor | None = None,
    last_turn: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn ids and gate mask of rendered chats, from the template's markers.

    Args:
        input_ids: ``[batch, seq]`` token ids.
        user_turn_marker: ids that open a user message; None makes the input one turn.
        assistant_turn_marker: ids that open an assistant reply.
        attention_mask: ``[batch, seq]`` with 0 on padding (padding gets turn -1), or None.
        last_turn: ``[batch]`` the turn open before this input (continuing a KV cache), or None.

    Returns:
        ``turn_ids [batch, seq]`` (long) and ``gate_mask [batch, seq]`` (long).
    """
    batch, seq = input_ids.shape
    device = input_ids.device
    start = last_turn.view(batch, 1) if last_turn is not None else torch.zeros(batch, 1, dtype=torch.long, device=device)
    if user_turn_marker is None:
        turn_ids = start.expand(batch, seq).clone()
        gate_mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    else:
        user = _marker_hits(input_ids, user_turn_marker)
        opened = user.long().cumsum(1)  # [batch, seq] user messages opened so far
        turn_ids = start + opened if last_turn is not None else (opened - 1).clamp(min=0)
        # A reply starts right after an assistant marker and ends where the next user marker starts.
        reply_start = torch.zeros_like(user)
        width = len(assistant_turn_marker)
        if seq > width:  # a shorter input holds no complete marker followed by a reply token
            reply_start[:, width:] = _marker_hits(input_ids, assistant_turn_marker)[:, : seq - width]
        positions = torch.arange(seq, device=device).expand(batch, seq)
        last_reply = torch.where(reply_start, positions, -1).cummax(1).values
        last_user = torch.where(user, positions, -1).cummax(1).values
        gate_mask = (last_reply <= last_user).long()
    if attention_mask is not None and attention_mask.dim() == 2:
        padding = attention_mask == 0
        turn_ids = turn_ids.masked_fill(padding, -1)
        gate_mask = gate_mask.masked_fill(padding, 0)
    return turn_ids, gate_mask


def validate_turn_ids(turn_ids: torch.Tensor, input_shape: tuple[int, int], name: str = "turn_ids") -> None:
    """Raises a ValueError for turn ids of the wrong shape or dtype, or that decrease.

    Args:
        turn_ids: ``[batch, seq]`` integer tensor, -1 on padding.
        input_shape: ``(batch, seq)`` of ``input_ids``.
        name: the argument's name in messages.
    """
    if not isinstance(turn_ids, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [batch, seq], got {type(turn_ids).__name__}")
    if turn_ids.dtype.is_floating_point or turn_ids.dtype == torch.bool or turn_ids.is_complex():
        raise ValueError(f"{name} must be an integer tensor (torch.long), got {turn_ids.dtype}")
    if tuple(turn_ids.shape) != tuple(input_shape):
        raise ValueError(
            f"{name} has shape {tuple(turn_ids.shape)} but input_ids has {tuple(input_shape)}: "
            "give one turn id per input token."
        )
    if (turn_ids < -1).any():
        raise ValueError(f"{name} must be >= 0, or -1 to mark padding")
    running = torch.where(turn_ids >= 0, turn_ids, -1).cummax(1).values
    bad = (turn_ids >= 0) & (turn_ids < running)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{name} decrease in row {row} at position {col} ({int(running[row, col])} -> {int(turn_ids[row, col])}); "
            "turn ids must be non-decreasing along the sequence (each exchange after the previous one)."
        )


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict] | list[list[dict]],
    add_generation_prompt: bool = False,
    markers: tuple[list[int], list[int]] | None = None,
) -> BatchEncoding:
    """Encodes one dialogue or a batch of dialogues (left-padded) for the gated model.

    Args:
        tokenizer: a tokenizer with a chat template.
        messages: a list of ``{"role", "content"}`` messages, or a list of such lists.
        add_generation_prompt: end with the assistant header, ready for ``generate``; the
            open turn gets its own turn id.
        markers: ``(user_turn_marker, assistant_turn_marker)``; found from the template when None.

    Returns:
        A ``BatchEncoding`` of ``[batch, seq]`` tensors: ``input_ids``, ``attention_mask``,
        ``turn_ids`` (-1 on padding), ``gate_mask`` and ``labels`` (assistant tokens only, else -100).
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts, or a list of such lists")
    dialogues = messages if isinstance(messages[0], list) else [messages]
    for d, dialogue in enumerate(dialogues):
        for m, message in enumerate(dialogue):
            if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
                raise ValueError(f"dialogue {d}, message {m}: expected a dict with 'role' and 'content', got {message!r}")
            if not isinstance(message["content"], str):
                raise ValueError(
                    f"dialogue {d}, message {m}: 'content' must be a string, got {type(message['content']).__name__}; "
                    "give an empty string for an empty message"
                )
    user_marker, assistant_marker = markers if markers is not None else find_turn_markers(tokenizer)
    rows = [
        tokenizer(_render(tokenizer, dialogue, add_generation_prompt), add_special_tokens=False)["input_ids"]
        for dialogue in dialogues
    ]
    width = max(len(r) for r in rows)
    pad_id = padding_id(tokenizer)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.long)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    turn_ids, gate_mask = derive_turn_ids(input_ids, user_marker, assistant_marker, attention_mask)
    labels = input_ids.masked_fill((gate_mask == 1) | (attention_mask == 0), -100)
    return BatchEncoding(
        {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "turn_ids": turn_ids,
            "gate_mask": gate_mask,
            "labels": labels,
        }
    )
