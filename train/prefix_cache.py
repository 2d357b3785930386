"""Training on a frozen prefix: the hidden states entering ``gate_layer``, computed once per dialogue.

Everything below ``gate_layer`` is frozen and has no experts, so the hidden states entering
decoder layer ``gate_layer`` are a constant of training for each dialogue. The first time a
training dialogue is met they are computed with its batch (exactly what the ordinary forward
computes) and kept; every later step runs only the layers from ``gate_layer`` up (with the
model's own hooks, so the gate and the experts run as in the full forward), the final norm
and the LM head on the positions that predict an assistant token.

The kept states live in memory and, between runs, in one safetensors file per
(corpus, base, ``gate_layer``, storage dtype): its name holds a hash of the four, its metadata
repeats them, so a changed corpus, base or gate layer never reads a stale file.

Only plain full-attention decoders (Llama, and models built like it: ``embed_tokens``,
``layers``, ``norm``, ``rotary_emb``) are supported; others are refused with a message.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.masking_utils import create_causal_mask

from moe_empathy.layers import ROUTING_KWARG
from moe_empathy.dispatch import deciding_call, gate_fields
from moe_empathy.modeling_moe_empathy import MoeEmpathyCausalLMOutputWithPast, MoeEmpathyForCausalLM
from moe_empathy.utils import atomic_path

from .config import PREFIX_CACHE_DTYPES, PREFIX_CACHE_MODES

CACHE_FORMAT = "moe_empathy-prefix-cache-v1"
STORAGE_DTYPES = {name: getattr(torch, name) for name in PREFIX_CACHE_DTYPES}


# --------------------------------------------------------------------- the two halves of the forward


def _decoder(model: MoeEmpathyForCausalLM):
    """The base's decoder stack (``LlamaModel``), checked to be one the split forward supports.

    Args:
        model: the gated model.
    """
    decoder = model.model.get_decoder()
    missing = [name for name in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, name)]
    config = decoder.config
    sliding = [t for t in (getattr(config, "layer_types", None) or []) if t != "full_attention"]
    if missing or sliding or getattr(config, "sliding_window", None):
        what = f"has no {missing}" if missing else f"uses {sorted(set(sliding)) or 'a sliding window'} attention"
        raise ValueError(
            f"training.prefix_cache runs a Llama-style full-attention decoder from gate_layer up, but "
            f"{type(decoder).__name__} {what}; set training.prefix_cache: off for this base"
        )
    return decoder


def _layer_inputs(decoder, hidden: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    """The keyword arguments every decoder layer gets, built as the decoder's own forward builds
    them without a KV cache: positions 0..seq-1, transformers' causal/padding mask, rotary embeddings.

    Args:
        decoder: the base's decoder stack.
        hidden: ``[batch, seq, hidden]`` the states entering the first layer to run.
        attention_mask: ``[batch, seq]`` 1 on tokens, 0 on padding.
    """
    position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # [1, seq]
    mask = create_causal_mask(
        config=decoder.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=position_ids
    )
    return {
        "attention_mask": mask,
        "position_ids": position_ids,
        "position_embeddings": decoder.rotary_emb(hidden, position_ids=position_ids),  # ([1, seq, head_dim],) * 2
        "cache": None,
        "use_cache": False,
    }


@torch.no_grad()
def compute_prefix(model: MoeEmpathyForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden states entering decoder layer ``gate_layer`` (embeddings, then the frozen layers below it).

    Args:
        model: the gated model.
        input_ids: ``[batch, seq]``.
        attention_mask: ``[batch, seq]`` 1 on tokens, 0 on padding.

    Returns:
        ``[batch, seq, hidden]`` in the model's dtype.
    """
    decoder = _decoder(model)
    hidden = decoder.embed_tokens(input_ids)  # [batch, seq, hidden]
    kwargs = _layer_inputs(decoder, hidden, attention_mask)
    for layer in decoder.layers[: model.config.gate_layer]:
        hidden = layer(hidden, **kwargs)
    return hidden


def forward_from_prefix(
    model: MoeEmpathyForCausalLM,
    prefix: torch.Tensor,
    attention_mask: torch.Tensor,
    turn_ids: torch.Tensor,
    gate_mask: torch.Tensor,
    gate_labels: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> MoeEmpathyCausalLMOutputWithPast:
    """The gated model's forward from decoder layer ``gate_layer`` up, given the states entering it.

    The routing call is built as the model's forward builds it (:func:`deciding_call`) and the decoder layers are called as the
    full forward calls them, so the gate's pre-hook at ``gate_layer`` decides the mixture from
    ``prefix`` and the experts apply it; gradient checkpointing works as in the full forward.

    Args:
        model: the gated model.
        prefix: ``[batch, seq, hidden]`` the states entering ``gate_layer`` (:func:`compute_prefix`).
        attention_mask: ``[batch, seq]`` 1 on tokens, 0 on padding.
        turn_ids: ``[batch, seq]`` exchange of each token, -1 on padding.
        gate_mask: ``[batch, seq]`` 1 where the gate may read.
        gate_labels: ``[batch, turns]`` expert index of each turn, -100 for none.
        keep: ``[batch, seq]`` bool, the positions whose logits are wanted (those predicting a
            label); None keeps all.

    Returns:
        The output the full forward gives (gate weights, logits, losses), except that ``logits``
        is ``[n, vocab]`` over the ``keep`` positions in row-major order when ``keep`` is given.
    """
    if model._experts_disabled:
        raise ValueError("the prefix-cached forward trains the experts; it cannot run inside model.disable_experts()")
    decoder = _decoder(model)
    if model.training:  # as the model's forward: checkpointed layers need the hand-over hooks
        model._routing_hooks.follow_checkpointing()
    call = deciding_call(
        model.gate, model.config, None, prefix, attention_mask, turn_ids, gate_mask, None, model._forced, gate_labels, model._label_share
    )
    kwargs = _layer_inputs(decoder, prefix, attention_mask)
    hidden = prefix
    for layer in decoder.layers[model.config.gate_layer : decoder.config.num_hidden_layers]:
        hidden = layer(hidden, **kwargs, **{ROUTING_KWARG: call})
    hidden = decoder.norm(hidden)  # [batch, seq, hidden]
    if keep is not None:
        hidden = hidden[keep]  # [n, hidden]
    logits = model.get_output_embeddings()(hidden)  # [batch, seq, vocab] or [n, vocab]
    # What MoeEmpathyForCausalLM.forward adds after the base's forward: the gate's losses.
    fields, _ = gate_fields(call.output, gate_labels, model.config)
    return MoeEmpathyCausalLMOutputWithPast(logits=logits, **fields)


# --------------------------------------------------------------------- the cache


def _digest(*parts: bytes | str) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part.encode() if isinstance(part, str) else part)
    return hasher.hexdigest()


def corpus_fingerprint(rows: Sequence[dict]) -> str:
    """A hash of the encoded training dialogues (token ids in dataset order).

    Args:
        rows: encoded dialogues (:func:`.collate.encode_dialogue`).
    """
    return _digest(json.dumps([r["input_ids"] for r in rows], separators=(",", ":")))


def base_fingerprint(model: MoeEmpathyForCausalLM) -> str:
    """A hash of everything the prefix depends on: the base's configuration, its embeddings and
    the weights of the layers below ``gate_layer``.

    Args:
        model: the gated model.
    """
    decoder = _decoder(model)
    hasher = hashlib.blake2b(digest_size=32)
    # The configuration, less where it was loaded from and by which version (the same base can move).
    settings = {k: v for k, v in decoder.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    hasher.update(json.dumps(settings, sort_keys=True, default=str).encode())
    modules = {"embed_tokens": decoder.embed_tokens, "rotary_emb": decoder.rotary_emb}
    modules.update({f"layers.{i}": decoder.layers[i] for i in range(model.config.gate_layer)})
    for prefix, module in modules.items():
        for name, tensor in sorted(module.state_dict().items()):
            data = tensor.detach().to("cpu").contiguous()
            hasher.update(f"{prefix}.{name}:{data.dtype}:{tuple(data.shape)}".encode())
            hasher.update(data.view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def default_cache_dir() -> Path:
    """``$MOE_EMPATHY_CACHE/prefix-cache`` (default ``~/.cache/moe_empathy/prefix-cache``)."""
    from moe_empathy.base import default_cache_dir as package_cache

    return package_cache() / "prefix-cache"


class PrefixCache:
    """The hidden states entering ``gate_layer`` of each training dialogue, kept once computed.

    Args:
        model: the gated model being trained.
        rows: the encoded training dialogues; dataset index ``i`` is ``rows[i]``.
        dtype: storage dtype name, one of :data:`STORAGE_DTYPES`.
        folder: where the cache file lives (None: :func:`default_cache_dir`).

    Raises:
        ValueError: the cache file exists but is damaged or was written for other data; the
            message names the file and how to rebuild it.
    """

    def __init__(self, model: MoeEmpathyForCausalLM, rows: Sequence[dict], dtype: str = "float32", folder: str | os.PathLike | None = None):
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"prefix cache dtype {dtype!r} is not one of {sorted(STORAGE_DTYPES)}")
        _decoder(model)
        self.dtype = STORAGE_DTYPES[dtype]
        self.lengths = [len(r["input_ids"]) for r in rows]
        self.identity = {
            "format": CACHE_FORMAT,
            "corpus": corpus_fingerprint(rows),
            "base": base_fingerprint(model),
            "gate_layer": str(model.config.gate_layer),
            "dtype": dtype,
            "dialogues": str(len(rows)),
        }
        key = _digest(*(f"{k}={v}\n" for k, v in self.identity.items()))
        self.path = Path(folder if folder is not None else default_cache_dir()) / f"prefix-{key[:20]}.safetensors"
        self.states: dict[int, torch.Tensor] = {}  # dialogue index -> [length, hidden]
        self.dirty = False
        if self.path.is_file():
            self._load()

    def __len__(self) -> int:
        return len(self.states)

    def _rebuild_hint(self) -> str:
        return f"delete it (rm {self.path}) and the next run rebuilds it, or set training.prefix_cache: off"

    def _load(self) -> None:
        """Reads the cache file, refusing a damaged one or one written for other data."""
        try:
            with safe_open(str(self.path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                stored = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise ValueError(
                f"the prefix cache {self.path} cannot be read ({type(error).__name__}: {error}); it is damaged: "
                + self._rebuild_hint()
            ) from error
        differ = sorted(k for k, v in self.identity.items() if metadata.get(k) != v)
        if differ:
            raise ValueError(
                f"the prefix cache {self.path} was written for another {', '.join(differ)} than this run's (it was "
                "renamed or copied); it is not used: " + self._rebuild_hint()
            )
        index, states = stored.get("index"), stored.get("states")  # [n], [tokens, hidden]
        lengths = torch.tensor(self.lengths)
        if (
            index is None or states is None or index.dim() != 1 or states.dim() != 2 or states.dtype != self.dtype
            or bool(((index < 0) | (index >= len(self.lengths))).any())
            or int(lengths[index].sum()) != states.shape[0]
        ):
            raise ValueError(
                f"the prefix cache {self.path} does not hold the tensors its metadata describes; it is damaged: "
                + self._rebuild_hint()
            )
        sizes = lengths[index].tolist()
        self.states = dict(zip(index.tolist(), states.split(sizes)))

    def save(self) -> None:
        """Writes the kept states to :attr:`path` (atomically) if any were added since the last save."""
        if not self.dirty:
            return
        order = sorted(self.states)
        tensors = {
            "index": torch.tensor(order, dtype=torch.long),  # [n]
            "states": torch.cat([self.states[i] for i in order]),  # [tokens, hidden]
        }
        with atomic_path(self.path) as staging:
            save_file(tensors, str(staging), metadata=self.identity)
        self.dirty = False

    def batch(self, model: MoeEmpathyForCausalLM, index: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The states entering ``gate_layer`` for a right-padded batch of training dialogues.

        When a dialogue of the batch has none kept yet, the batch's prefix is computed (as the
        full forward would) and its new dialogues are kept. The states are returned as stored,
        so every epoch trains on the same inputs whether they were just computed or read.

        Args:
            model: the gated model.
            index: ``[batch]`` dataset index of each row.
            input_ids: ``[batch, seq]``.
            attention_mask: ``[batch, seq]`` 1 on tokens, 0 on right padding.

        Returns:
            ``[batch, seq, hidden]`` in the model's dtype, zeros on padding.
        """
        rows = index.tolist()
        lengths = attention_mask.sum(-1).tolist()
        for position, (row, length) in enumerate(zip(rows, lengths)):
            if length != self.lengths[row] or not bool(attention_mask[position, :length].all()):
                raise ValueError(
                    f"training dialogue {row} has {self.lengths[row]} tokens but its batch row has {length} "
                    "right-padded ones; the prefix cache needs the training rows in dataset order, right-padded"
                )
        missing = [r for r in rows if r not in self.states]
        if missing:
            computed = compute_prefix(model, input_ids, attention_mask)  # [batch, seq, hidden]
            for position, (row, length) in enumerate(zip(rows, lengths)):
                if row in missing:
                    state = computed[position, :length].to(device="cpu", dtype=self.dtype)
                    if not torch.isfinite(state).all():
                        raise ValueError(
                            f"the prefix of training dialogue {row} is not finite in {self.dtype} (it overflows); "
                            "set training.prefix_cache_dtype: float32 or bfloat16"
                        )
                    self.states[row] = state.clone()
            self.dirty = True
        weight = model.get_input_embeddings().weight
        out = torch.zeros(*input_ids.shape, weight.shape[-1], dtype=weight.dtype, device=weight.device)
        for position, (row, length) in enumerate(zip(rows, lengths)):
            out[position, :length] = self.states[row].to(device=weight.device, dtype=weight.dtype)
        return out


def use_prefix_cache(mode: str, model, world_size: int) -> bool:
    """Whether a run trains on a cached prefix.

    ``auto``: yes for a gated model with ``gate_layer > 0`` trained by one process without CUDA
    (the CPU default); ``on``: yes, or an error naming why it cannot; ``off``: no.

    Args:
        mode: ``training.prefix_cache``.
        model: the model to train (a gated model or a peft baseline).
        world_size: processes of the run.
    """
    if mode not in PREFIX_CACHE_MODES:
        raise ValueError(f"training.prefix_cache: {mode!r} is not one of {PREFIX_CACHE_MODES}")
    if mode == "off":
        return False
    gated = isinstance(model, MoeEmpathyForCausalLM)
    if mode == "auto":
        return gated and model.config.gate_layer > 0 and world_size == 1 and not torch.cuda.is_available()
    if not gated:
        raise ValueError("training.prefix_cache: on needs a gated model (method gated or gated_from_experts); set it to off or auto")
    if world_size > 1:
        raise ValueError(
            f"training.prefix_cache: on runs the top layers outside the distributed wrapper, which {world_size} "
            "processes need for their gradient exchange; set training.prefix_cache: off (or auto) for several processes"
        )
    return True
