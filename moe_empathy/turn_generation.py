"""``generate`` on the gated model: the prefill decides the turn, every decode step continues it.

The first forward of ``generate`` (the prefill) carries ``turn_ids`` / ``gate_mask`` when the
caller gave them, and the gate decides the turns. Once the gate's state is on the KV cache,
every later step decodes the reply of the turn just decided: it is sent with
``continues_turn=True`` and reuses the turn's routing plan from that state.
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin
from transformers.utils.deprecation import deprecate_kwarg

from .cache import gate_state_of


def extend_with_reply(
    turn_ids: torch.Tensor | None, gate_mask: torch.Tensor | None, length: int
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Extends ``[batch, seq]`` turn ids and gate mask to ``length`` with generated reply tokens:
    they belong to the last turn and no gate reads them.

    Args:
        turn_ids: turn ids of the tokens so far, or None.
        gate_mask: gate mask of the tokens so far, or None.
        length: the length to reach (shorter or equal inputs are returned as they are).
    """
    if turn_ids is not None and turn_ids.shape[1] < length:
        turn_ids = torch.cat([turn_ids, turn_ids[:, -1:].expand(-1, length - turn_ids.shape[1])], dim=-1)
    if gate_mask is not None and gate_mask.shape[1] < length:
        gate_mask = torch.cat([gate_mask, gate_mask.new_zeros(gate_mask.shape[0], length - gate_mask.shape[1])], dim=-1)
    return turn_ids, gate_mask


class MoeEmpathyGenerationMixin(GenerationMixin):
    """``GenerationMixin`` that hands the turn inputs to the prefill and ``continues_turn`` to decode steps."""

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def prepare_inputs_for_generation(self, input_ids, turn_ids=None, gate_mask=None, continues_turn=False, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if continues_turn:  # decoding a reply on the cache: the turn's routing is on its gate state
            inputs["continues_turn"] = True
            return inputs
        width = (inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs["inputs_embeds"]).shape[1]
        # Assisted and prompt-lookup decoding append candidate tokens beyond the kwargs' length.
        turn_ids, gate_mask = extend_with_reply(turn_ids, gate_mask, input_ids.shape[1])
        if turn_ids is not None:
            inputs["turn_ids"] = turn_ids[:, -width:]
        if gate_mask is not None:
            inputs["gate_mask"] = gate_mask[:, -width:]
        return inputs

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, is_encoder_decoder=False, num_new_tokens=1):
        model_kwargs = super()._update_model_kwargs_for_generation(
            outputs, model_kwargs, is_encoder_decoder=is_encoder_decoder, num_new_tokens=num_new_tokens
        )
        if gate_state_of(model_kwargs.get("cache")) is not None:
            # Every later step decodes the reply of the turn just decided: its routing is on the cache.
            model_kwargs["continues_turn"] = True
            model_kwargs.pop("turn_ids", None)
            model_kwargs.pop("gate_mask", None)
            return model_kwargs
        turn_ids, gate_mask = model_kwargs.get("turn_ids"), model_kwargs.get("gate_mask")
        reference = turn_ids if turn_ids is not None else gate_mask
        if reference is not None:
            turn_ids, gate_mask = extend_with_reply(turn_ids, gate_mask, reference.shape[1] + num_new_tokens)
            model_kwargs["turn_ids"], model_kwargs["gate_mask"] = turn_ids, gate_mask
        return model_kwargs

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """``GenerationMixin.generate``; the turn's folded expert weights are freed afterwards."""
        try:
            return super().generate(*args, **kwargs)
        finally:
            for linear in self.experts.values():
                linear.drop_merged_weight()
