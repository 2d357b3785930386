"""Decoding that does not loop: a logits processor that keeps a reply from repeating n-grams
of the dialogue's earlier assistant replies (cross-turn copying) or of itself (loops inside
a reply), and its settings, stored in a checkpoint's ``generation_config.json``.

Greedy decoding with a model's own earlier replies in the context tends to copy them word
for word. :class:`ReplyRepetitionLogitsProcessor` looks only at assistant text: the earlier
replies of each row's dialogue, given as token ids, and the reply being generated (the
tokens after the prompt). User messages and the chat template's markers are never counted,
unlike transformers' ``no_repeat_ngram_size``, which bans every n-gram of the whole prompt.

The earlier replies are passed explicitly rather than found from ``gate_mask`` /
``turn_ids`` so that the processor works the same for every model (the gated model, the
base, a peft model; none but the gated model takes turn ids), n-grams never span two
replies, and neither padding nor the KV cache's layout plays any part.

Settings (:class:`RepeatGuardConfig`) travel as extra attributes of a ``GenerationConfig``,
named ``repeat_guard_<field>``; transformers keeps such attributes through
``save_pretrained`` / ``from_pretrained`` only when the file's ``_from_model_config`` is
false, which :meth:`RepeatGuardConfig.write_to` sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor

GENERATION_CONFIG_PREFIX = "repeat_guard_"


class ReplyRepetitionLogitsProcessor(LogitsProcessor):
    """Penalises (or bans) every next token that would complete an n-gram already present in
    the dialogue's earlier assistant replies or in the reply generated so far.

    At each step, the last ``ngram_size - 1`` tokens of the current reply form a prefix; a
    token ``t`` is penalised when ``prefix + [t]`` occurs in one of the row's earlier replies
    or earlier in the current reply. The reply's first ``ngram_size - 1`` tokens are free.

    Args:
        ngram_size: length of the n-grams that may not repeat (>= 2).
        earlier_replies: ``[batch][replies][tokens]`` token ids of each row's earlier
            assistant replies (content only: leave out end-of-turn tokens, so that a reply
            may still end the way an earlier one did). Rows may have different numbers of
            replies of different lengths; no padding.
        prompt_length: width of the (left-padded) prompt given to ``generate``; the
            current reply is ``input_ids[:, prompt_length:]``.
        penalty: subtracted from the logit of each such token; None bans it (``-inf``).
    """

    def __init__(self, ngram_size: int, earlier_replies: Sequence[Sequence[Sequence[int]]], prompt_length: int, penalty: float | None = None):
        if ngram_size < 2:
            raise ValueError(f"ngram_size must be >= 2 (1 would ban every token of the earlier replies), got {ngram_size}")
        if penalty is not None and not (0 < penalty < float("inf")):
            raise ValueError(f"penalty must be a positive finite number, or None to ban the tokens; got {penalty}")
        if prompt_length < 0:
            raise ValueError(f"prompt_length must be >= 0, got {prompt_length}")
        self.ngram_size = ngram_size
        self.prompt_length = prompt_length
        self.penalty = penalty
        rows = []
        for replies in earlier_replies:
            grams = [torch.tensor(list(r), dtype=torch.long).unfold(0, ngram_size, 1) for r in replies if len(r) >= ngram_size]
            rows.append(torch.cat(grams) if grams else torch.empty(0, ngram_size, dtype=torch.long))  # [grams_b, n]
        width = max((g.shape[0] for g in rows), default=0)
        self.earlier = torch.full((len(rows), width, ngram_size), -1, dtype=torch.long)  # [batch, grams, n]
        self.earlier_valid = torch.zeros(len(rows), width, dtype=torch.bool)  # [batch, grams]
        for b, grams in enumerate(rows):
            self.earlier[b, : grams.shape[0]] = grams
            self.earlier_valid[b, : grams.shape[0]] = True

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        """
        Args:
            input_ids: ``[batch, prompt + generated]`` every token so far.
            scores: ``[batch, vocab]`` the next token's logits.

        Returns:
            ``[batch, vocab]`` the logits with repeating tokens penalised or banned.
        """
        batch, width = input_ids.shape
        if batch != self.earlier.shape[0]:
            raise ValueError(
                f"ReplyRepetitionLogitsProcessor was built for {self.earlier.shape[0]} rows but generate runs {batch}; "
                "give one list of earlier replies per row (and build a new processor for each batch)"
            )
        if width < self.prompt_length:
            raise ValueError(f"input_ids has {width} tokens, fewer than the prompt_length {self.prompt_length} the processor was built with")
        n = self.ngram_size
        reply = input_ids[:, self.prompt_length :]  # [batch, generated]
        if reply.shape[1] < n - 1:
            return scores
        if self.earlier.device != input_ids.device:  # moved once, not at every step
            self.earlier, self.earlier_valid = self.earlier.to(input_ids.device), self.earlier_valid.to(input_ids.device)
        prefix = reply[:, reply.shape[1] - (n - 1) :]  # [batch, n-1]
        grams, valid = self.earlier, self.earlier_valid  # [batch, G, n], [batch, G]
        if reply.shape[1] >= n:
            own = reply.unfold(1, n, 1)  # [batch, generated-n+1, n]
            grams = torch.cat([grams, own], 1)
            valid = torch.cat([valid, valid.new_ones(own.shape[:2])], 1)
        hit = valid & (grams[..., :-1] == prefix[:, None, :]).all(-1)  # [batch, G']
        # Fixed shapes throughout (no nonzero): the step never waits for the device.
        tokens = grams[..., -1].clamp(min=0)  # [batch, G'] (padding grams hit nothing)
        repeats = torch.zeros_like(scores, dtype=torch.bool).scatter_reduce_(1, tokens, hit, reduce="amax")  # [batch, vocab]
        if self.penalty is None:
            return scores.masked_fill(repeats, float("-inf"))
        return scores - repeats.to(scores.dtype) * self.penalty


@dataclass(frozen=True)
class RepeatGuardConfig:
    """Settings of the default generation guard (:class:`ReplyRepetitionLogitsProcessor`).

    Stored in a checkpoint's ``generation_config.json`` as ``repeat_guard_<field>``;
    fields missing there take the defaults below.

    Args:
        ngram_size: see the field's help.
        penalty: see the field's help.
    """

    ngram_size: int = field(
        default=4,
        metadata={"help": "length of the n-grams a reply may not repeat from the dialogue's earlier replies or from itself (>= 2)"},
    )
    penalty: float | None = field(
        default=None,
        metadata={"help": "subtracted from the logit of a token that would repeat such an n-gram; null bans the token"},
    )

    def __post_init__(self) -> None:
        if not isinstance(self.ngram_size, int) or self.ngram_size < 2:
            raise ValueError(f"repeat_guard_ngram_size must be an integer >= 2, got {self.ngram_size!r}; fix the generation config")
        if self.penalty is not None and not (0 < float(self.penalty) < float("inf")):
            raise ValueError(f"repeat_guard_penalty must be a positive finite number or null (ban), got {self.penalty!r}; fix the generation config")

    @classmethod
    def from_generation_config(cls, generation_config: GenerationConfig) -> "RepeatGuardConfig":
        """The guard's settings stored on a generation config (defaults for missing ones).

        Args:
            generation_config: e.g. ``model.generation_config``.
        """
        stored = {f.name: getattr(generation_config, GENERATION_CONFIG_PREFIX + f.name) for f in fields(cls) if hasattr(generation_config, GENERATION_CONFIG_PREFIX + f.name)}
        return cls(**stored)

    def write_to(self, generation_config: GenerationConfig) -> None:
        """Stores the settings on a generation config, so that ``save_pretrained`` writes them
        and ``GenerationConfig.from_pretrained`` keeps them.

        Args:
            generation_config: e.g. ``model.generation_config`` (changed in place).
        """
        generation_config._from_model_config = False  # else from_pretrained drops extra attributes
        for f in fields(self):
            setattr(generation_config, GENERATION_CONFIG_PREFIX + f.name, getattr(self, f.name))

    def processor(self, earlier_replies: Sequence[Sequence[Sequence[int]]], prompt_length: int) -> ReplyRepetitionLogitsProcessor:
        """The guard for one ``generate`` call.

        Args:
            earlier_replies: ``[batch][replies][tokens]`` each row's earlier replies (content ids).
            prompt_length: width of the prompt given to ``generate``.
        """
        return ReplyRepetitionLogitsProcessor(self.ngram_size, earlier_replies, prompt_length, self.penalty)

    def describe(self) -> str:
        """One line for reports."""
        action = "banned" if self.penalty is None else f"penalised by {self.penalty:g}"
        return f"repeat guard: {self.ngram_size}-grams of the dialogue's earlier replies and of the reply itself {action}"
