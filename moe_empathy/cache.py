"""A KV cache that appends in place.

transformers' ``DynamicLayer`` grows by ``torch.cat``, which copies a layer's whole cache
at every decoding step. Long multi-turn rollouts on a CPU spend a large share of their
time in those copies (a quarter of a batch-40 step at 1,024 cached tokens with
SmolLM2-135M). :class:`GrowingCache` keeps each layer's keys and values in a buffer with
spare room, grown by half its size when full, so a step writes only the new positions.
It returns the same tensors' values as ``DynamicCache``, hence the same logits.

Any cache also carries the gate's state of the forward that filled it
(:func:`attach_gate_state`, :func:`gate_state_of`), so a continuation of the cache
(``generate``, multi-turn rollouts) reuses the turns already decided.
"""

from __future__ import annotations

import torch
from transformers import Cache, DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 256
_GATE_STATE = "_moe_empathy_gate_state"


def attach_gate_state(cache: Cache | None, state) -> None:
    """Stores the gate's state on the KV cache it belongs to (no-op without a cache).

    Args:
        cache: the KV cache a forward returned, or None.
        state: the gate's :class:`~moe_empathy.gate.GateState` after that forward.
    """
    if cache is not None:
        setattr(cache, _GATE_STATE, state)


def gate_state_of(cache: Cache | None):
    """The gate's state stored on ``cache`` by the model's last forward, or None.

    Args:
        cache: a KV cache, or None.
    """
    return getattr(cache, _GATE_STATE, None) if cache is not None else None


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``keys``/``values`` are views of preallocated buffers.

    ``keys`` and ``values`` stay plain attributes, so every ``DynamicLayer`` method that
    reads or replaces them (``crop``, ``batch_select_indices``, ...) keeps working: a
    replaced tensor is adopted as the new buffer content at the next update.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer: torch.Tensor | None = None  # [batch, kv_heads, capacity, head_dim]
        self._value_buffer: torch.Tensor | None = None

    def _owns_current(self) -> bool:
        """True while ``keys`` is still a view of our buffer (``crop`` keeps it one)."""
        buffer = self._key_buffer
        return buffer is not None and self.keys.data_ptr() == buffer.data_ptr() and self.keys.shape[0] == buffer.shape[0]

    def _regrow(self, new_states: torch.Tensor, length: int, needed: int) -> None:
        """New buffers with room for ``needed`` positions, holding the current ``length`` ones."""
        old = self._key_buffer.shape[-2] if self._key_buffer is not None else 0
        capacity = max(needed, old + old // 2, MIN_CAPACITY)
        shape = (*new_states.shape[:-2], capacity, new_states.shape[-1])
        keys, values = self.keys, self.values
        self._key_buffer, self._value_buffer = new_states.new_empty(shape), new_states.new_empty(shape)
        if length:
            self._key_buffer[..., :length, :] = keys
            self._value_buffer[..., :length, :] = values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Appends ``[batch, kv_heads, new, head_dim]`` states; returns all cached states.

        Args:
            key_states: the new keys.
            value_states: the new values.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not (self._owns_current() and needed <= self._key_buffer.shape[-2]):
            self._regrow(key_states, length, needed)
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """``DynamicCache`` with :class:`GrowingLayer` for its full-attention layers (sliding-window
    layers, if the model has any, keep their own type).

    Args:
        config: the model's config (its text config is used).
    """

    def __init__(self, config: PretrainedConfig):
        super().__init__(config=config)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
