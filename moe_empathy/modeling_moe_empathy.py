"""A Hugging Face causal LM with empathy-level LoRA experts behind a learned per-turn gate.

One forward pass: the gate reads the hidden states entering decoder layer ``gate_layer``
(through a forward pre-hook on that layer), decides a mixture of experts for every turn,
and the experts, which live only in layers ``>= gate_layer``, apply the mixture of each
token's turn. The decision travels to the decoder layers as a keyword argument, so
gradient checkpointing recomputes with the very same gate, and it is carried across
forwards (:class:`GateState`) so ``generate`` keeps its KV cache.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Cache, GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .base import load_base
from .cache import attach_gate_state, gate_state_of
from .configuration_moe_empathy import MoeEmpathyConfig
from .gate import GateOutput, GateState, TurnGate
from .layers import ROUTING_KWARG, MultiLoraLinear, decoder_layers, inject_experts
from .losses import gate_losses, lm_loss
from .peft_io import adapters_span, export_expert, import_expert
from .routing import RoutingPlan, RoutingSlot
from .utils import atomic_write_text, make_temp_dir
from .turns import derive_turn_ids, find_turn_markers, validate_turn_ids

COMPACT_WEIGHTS = "experts.safetensors"
COMPACT_FORMAT = "moe_empathy-compact-v1"


@dataclass
class MoeEmpathyCausalLMOutputWithPast(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the gate's decision and losses.

    Args:
        gate_weights: ``[batch, turns, experts]`` mixture of each turn (zero rows for absent turns).
        gate_logits: ``[batch, turns, experts]`` logits of the turns decided in this forward.
        turn_mask: ``[batch, turns]`` True for turns present in (or carried into) this forward.
        aux_loss: weighted sum of the gate's losses (added to ``loss`` when ``labels`` are given).
        lm_loss: the language-modelling loss alone.
        gate_label_loss, load_balancing_loss, z_loss: the gate's losses, unweighted.
        gate_state: the gate's state after this forward (also carried on ``cache``).
    """

    gate_weights: torch.FloatTensor | None = None
    gate_logits: torch.FloatTensor | None = None
    turn_mask: torch.BoolTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    gate_label_loss: torch.FloatTensor | None = None
    load_balancing_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    gate_state: GateState | None = None


@dataclass
class _GateCall:
    """One forward's routing inputs, handed to the decoder layers as a keyword argument.

    ``plan`` is set when the forward continues a decided turn; otherwise the gate layer's
    pre-hook decides the gate (``output``) and builds the plan from it.
    """

    turn_ids: torch.Tensor | None  # [batch, seq]
    gate_mask: torch.Tensor | None  # [batch, seq]
    state: GateState | None
    forced: torch.Tensor | None  # [E], or [batch, E] one mixture per row
    output: GateOutput | None = None
    plan: RoutingPlan | None = None


@dataclass
class RoutingRecord:
    """One turn's gate decision, as kept by the routing log."""

    call: int
    dialogue: int
    turn: int
    weights: dict[str, float]
    expert: str
    forced: bool = False


# from_pretrained's download options; a compact checkpoint is a local folder, so they change nothing.
_HUB_KWARGS = (
    "cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "trust_remote_code", "proxies",
    "code_revision", "_commit_hash", "adapter_kwargs", "_from_auto",
)


def _single_device(device_map) -> torch.device | None:
    """The one device of a ``device_map`` (``"cpu"``, ``"cuda:0"``, ``{"": 0}``...), or None without one.

    Args:
        device_map: what ``from_pretrained`` was given.
    """
    if device_map is None:
        return None
    if isinstance(device_map, Mapping):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(
                f"a compact checkpoint loads onto one device, got device_map={device_map!r}; give one device "
                "(e.g. device_map='cuda:0'), or save the model in full to shard it"
            )
        device_map = devices.pop()
    if device_map in ("auto", "balanced", "sequential"):
        device_map = "cuda:0" if torch.cuda.is_available() else "cpu"
    return torch.device(f"cuda:{device_map}" if isinstance(device_map, int) else device_map)


def _extend_with_reply(
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


class MoeEmpathyPreTrainedModel(PreTrainedModel):
    config_class = MoeEmpathyConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, MultiLoraLinear):
            module.reset_lora_parameters()
        elif isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MoeEmpathyForCausalLM(MoeEmpathyPreTrainedModel, GenerationMixin):
    """A causal LM whose targeted linears hold one LoRA expert per empathy level, mixed per turn.

    Args:
        config: the model's configuration.
        base_model: an already built base causal LM to wrap in place (see :meth:`from_base`);
            when None the base is built from ``config.text_config``.
    """

    def __init__(self, config: MoeEmpathyConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if base_model is None:
            base_model = AutoModelForCausalLM.from_config(config.text_config)
        self.model = base_model
        self.model.requires_grad_(False)
        self._routing_slot = RoutingSlot()
        self.experts = inject_experts(
            self.model,
            config.target_modules,
            config.gate_layer,
            config.num_experts,
            config.lora_rank,
            config.lora_alpha,
            config.lora_dropout,
            config.kernel_backend,
            self._routing_slot,
        )
        self.gate = TurnGate(
            config.text_config.hidden_size,
            config.num_experts,
            config.gate_hidden_size,
            config.gate_type,
            config.gate_top_k,
            config.gate_temperature,
            config.gate_memory,
            config.gate_memory_decay,
        )
        self._forced: torch.Tensor | None = None
        self._experts_disabled = False
        self._routing_log: list[RoutingRecord] | None = None
        self._routing_calls = 0
        self._install_hooks()
        self.post_init()

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_base(
        cls,
        base: PreTrainedModel | str | os.PathLike,
        tokenizer: PreTrainedTokenizerBase | None = None,
        **config_overrides,
    ) -> "MoeEmpathyForCausalLM":
        """Wraps a base causal LM with fresh experts and gate; it then equals the base exactly.

        The base model object is changed in place (its targeted linears are wrapped) and shared.

        Args:
            base: a causal LM, a local model folder, or the default base's id.
            tokenizer: its tokenizer; when it has a chat template, the turn markers are taken
                from it so the model can find turns by itself.
            **config_overrides: fields of :class:`MoeEmpathyConfig` (``lora_rank``, ``gate_layer``...).
        """
        if isinstance(base, (str, os.PathLike)):
            base, found_tokenizer = load_base(str(base))
            tokenizer = tokenizer if tokenizer is not None else found_tokenizer
        if tokenizer is not None and getattr(tokenizer, "chat_template", None) and "user_turn_marker" not in config_overrides:
            config_overrides["user_turn_marker"], config_overrides["assistant_turn_marker"] = find_turn_markers(tokenizer)
        config_overrides.setdefault("base_model_name_or_path", base.config.name_or_path or None)
        # A copy: nesting the live base config would let the wrapper reset its attention settings.
        config = MoeEmpathyConfig(
            text_config=copy.deepcopy(base.config),
            attn_implementation=base.config._attn_implementation,
            **config_overrides,
        )
        model = cls(config, base_model=base)
        weight = base.get_input_embeddings().weight
        model.gate.to(device=weight.device, dtype=weight.dtype)
        model.generation_config = copy.deepcopy(base.generation_config)
        return model

    @classmethod
    def from_peft_adapters(
        cls,
        base: PreTrainedModel | str | os.PathLike,
        adapters: Mapping[str, str | os.PathLike],
        tokenizer: PreTrainedTokenizerBase | None = None,
        **config_overrides,
    ) -> "MoeEmpathyForCausalLM":
        """Builds a gated model whose experts are ordinary peft LoRA adapters, one per name.

        The expert names, target modules, rank (the largest) and ``gate_layer`` (the lowest
        adapted layer) follow the adapters unless overridden. The gate starts untrained.

        Args:
            base: the base model the adapters were trained on (model, folder or default id).
            adapters: ``{expert_name: adapter_folder}``, in expert order.
            tokenizer: the base's tokenizer (for turn markers).
            **config_overrides: other :class:`MoeEmpathyConfig` fields.
        """
        targets, rank, lowest = adapters_span(adapters)
        config_overrides.setdefault("expert_names", list(adapters))
        config_overrides.setdefault("target_modules", targets)
        config_overrides.setdefault("lora_rank", rank)
        config_overrides.setdefault("gate_layer", lowest)
        model = cls.from_base(base, tokenizer=tokenizer, **config_overrides)
        for name, folder in adapters.items():
            model.load_peft_expert(name, folder)
        return model

    def load_peft_expert(self, name: str, folder: str | os.PathLike) -> None:
        """Fills the expert ``name`` from a peft LoRA adapter folder."""
        import_expert(self, name, folder)

    def export_peft_expert(self, name: str, folder: str | os.PathLike) -> None:
        """Writes the expert ``name`` as a peft LoRA adapter folder."""
        export_expert(self, name, folder)

    def _install_hooks(self) -> None:
        """Decides the gate at decoder layer ``gate_layer`` and hands its plan to the experts.

        A pre-hook on layer ``gate_layer`` runs the gate on the hidden states entering it and
        builds the forward's routing plan. A pre-hook on each expert layer's ``self_attn`` (the
        layer itself when it has none) puts the plan of the layer's own ``ROUTING_KWARG`` into
        the routing slot: it runs inside transformers' gradient checkpointing (which wraps the
        layer's ``forward``), so the recomputation in backward sees the very same plan.
        """
        layers = decoder_layers(self.model)
        self._expert_layer_ids = range(self.config.gate_layer, len(layers))
        layers[self.config.gate_layer].register_forward_pre_hook(self._gate_pre_hook, with_kwargs=True)
        for index in self._expert_layer_ids:
            target = getattr(layers[index], "self_attn", None) or layers[index]
            target.register_forward_pre_hook(self._plan_pre_hook, with_kwargs=True)

    def _gate_pre_hook(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        """Decides the gate from the states entering ``gate_layer`` and plans the forward."""
        call: _GateCall | None = kwargs.get(ROUTING_KWARG)
        if call is not None and call.plan is None:
            hidden = args[0] if args else kwargs["hidden_states"]  # [batch, seq, hidden]
            call.output = self.gate(hidden, call.turn_ids, call.gate_mask, call.state, call.forced)
            # Looking for a fold reads the weights back: only where a fold can be used (inference).
            call.plan = self._plan(call.output.weights, call.turn_ids, may_fold=not torch.is_grad_enabled() and not self.training)

    def _plan_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        call: _GateCall | None = kwargs.get(ROUTING_KWARG)
        self._routing_slot.plan = call.plan if call is not None else None

    def _plan(self, turn_weights: torch.Tensor, turn_ids: torch.Tensor, may_fold: bool) -> RoutingPlan:
        """Spreads each turn's mixture over its tokens.

        Args:
            turn_weights: ``[batch, turns, E]`` the gate's weights of each turn.
            turn_ids: ``[batch, seq]`` each token's turn, -1 on padding.
            may_fold: look for one mixture shared by all tokens (see :meth:`RoutingPlan.build`).
        """
        index = turn_ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, turn_weights.shape[-1])  # [batch, seq, E]
        valid = turn_ids >= 0  # [batch, seq]
        weights = turn_weights.gather(1, index) * valid.unsqueeze(-1)  # [batch, seq, E]
        top_k = self.config.gate_top_k if self.config.gate_type == "top_k" and self._forced is None else None
        return RoutingPlan.build(weights, valid, top_k, may_fold)

    def _continuing_call(self, state: GateState | None, seq: int) -> _GateCall:
        """The routing of ``seq`` tokens per row that continue the turn open in ``state``: its
        plan is built once per turn and kept on the state, so a decode step derives nothing."""
        if state is None:
            raise ValueError(
                "continues_turn=True continues the turn open at the end of a KV cache, but no gate state came with "
                "it; pass the `cache` returned by an earlier forward of this model (or drop continues_turn)"
            )
        if state.plan is None:  # once per turn, one token per row; the fold is looked for even when grad is on
            state.plan = self._plan(state.turn_weights, state.last_turn.view(-1, 1), may_fold=True)
        return _GateCall(None, None, state, self._forced, plan=state.plan.repeat_tokens(seq))

    # ----------------------------------------------------------------- forward

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        turn_ids: torch.LongTensor | None = None,
        gate_mask: torch.LongTensor | None = None,
        gate_labels: torch.LongTensor | None = None,
        gate_state: GateState | None = None,
        continues_turn: bool = False,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeEmpathyCausalLMOutputWithPast:
        """Runs the base model with the experts mixed per turn.

        Args:
            input_ids, attention_mask, position_ids, cache, inputs_embeds, labels,
            use_cache, logits_to_keep: as for any Hugging Face causal LM (``past_key_values``
            is accepted for ``cache``, as transformers does, with its deprecation warning).
            turn_ids: ``[batch, seq]`` exchange index of each token (-1 on padding); derived
                from the chat template's markers when None.
            gate_mask: ``[batch, seq]`` 1 on the tokens the gate may read (not assistant replies).
            gate_labels: ``[batch, turns]`` expert index expected for each turn (-100 = none).
            gate_state: the gate's state when continuing a KV cache; by default the one this
                model stored on ``cache`` at its previous forward.
            continues_turn: every input token continues the reply of the turn open at the end of
                ``cache`` (how ``generate`` decodes): the turn's routing is reused from the gate's
                state, and neither turns nor gate are derived again (``turn_ids`` is ignored).
        """
        if gate_state is None:
            gate_state = gate_state_of(cache)
        call = None
        if not self._experts_disabled:
            if continues_turn:
                width = (input_ids if input_ids is not None else inputs_embeds).shape[1]
                call = self._continuing_call(gate_state, width)
            else:
                call = self._gate_call(input_ids, inputs_embeds, attention_mask, turn_ids, gate_mask, gate_state)
            kwargs[ROUTING_KWARG] = call
        try:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                logits_to_keep=logits_to_keep,
                **kwargs,
            )
        finally:
            self._routing_slot.plan = None
        lm = lm_loss(outputs.logits, labels, kwargs.get("num_items_in_batch")) if labels is not None else None
        result = MoeEmpathyCausalLMOutputWithPast(
            loss=lm,
            lm_loss=lm,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )
        if call is None:
            return result
        if call.output is None:  # a decided turn continues: no new decision, no gate loss
            result.gate_weights, result.gate_state = gate_state.turn_weights, gate_state
            attach_gate_state(outputs.cache, gate_state)
            if self._routing_log is not None:
                self._routing_calls += 1
            return result
        gate = call.output
        if gate_labels is not None:
            self._check_gate_labels(gate_labels, tuple(gate.logits.shape[:2]))
        losses = gate_losses(gate, gate_labels, self.config)
        result.gate_weights, result.gate_logits, result.turn_mask = gate.weights, gate.logits, gate.turn_mask
        result.aux_loss, result.gate_label_loss = losses.aux, losses.gate_label
        result.load_balancing_loss, result.z_loss = losses.load_balancing, losses.z_loss
        result.gate_state = gate.state
        # The gate's state travels with the KV cache it belongs to (generate, multi-turn rollouts).
        attach_gate_state(outputs.cache, gate.state)
        if labels is not None:
            result.loss = lm + losses.aux
        elif gate_labels is not None:
            result.loss = losses.aux
        if self._routing_log is not None:
            self._log_routing(gate, forced=call.forced is not None)
        return result

    def _gate_call(self, input_ids, inputs_embeds, attention_mask, turn_ids, gate_mask, gate_state) -> _GateCall:
        reference = input_ids if input_ids is not None else inputs_embeds[..., 0]
        shape = tuple(reference.shape)
        last_turn = gate_state.last_turn if gate_state is not None else None
        if attention_mask is not None and attention_mask.dim() == 2:
            attention_mask = attention_mask[:, -shape[1] :]  # the mask also covers cached tokens
        if turn_ids is None:
            # Without token ids (inputs_embeds) there are no markers to read: the input is one turn.
            ids = input_ids if input_ids is not None else reference.new_zeros(shape, dtype=torch.long)
            user, assistant = (self.config.user_turn_marker, self.config.assistant_turn_marker) if input_ids is not None else (None, None)
            turn_ids, derived_mask = derive_turn_ids(ids, user, assistant, attention_mask, last_turn)
            gate_mask = derived_mask if gate_mask is None else gate_mask
        else:
            validate_turn_ids(turn_ids, shape)
        if gate_mask is None:
            gate_mask = (turn_ids >= 0).long()
        elif tuple(gate_mask.shape) != shape:
            raise ValueError(f"gate_mask has shape {tuple(gate_mask.shape)} but input_ids has {shape}")
        forced = self._forced
        return _GateCall(turn_ids.to(reference.device), gate_mask.to(reference.device), gate_state, forced)

    def _check_gate_labels(self, gate_labels: torch.Tensor, shape: tuple[int, int]) -> None:
        """Raises a ValueError unless ``gate_labels`` is ``[batch, turns]`` (``shape``) of expert indices or -100."""
        if tuple(gate_labels.shape) != shape:
            raise ValueError(
                f"gate_labels must have shape [batch, turns] = {list(shape)}, one label per turn of the input, "
                f"got {tuple(gate_labels.shape)}; use -100 for a turn without a label"
            )
        bad = (gate_labels != -100) & ((gate_labels < 0) | (gate_labels >= self.config.num_experts))
        if bad.any():
            raise ValueError(
                f"gate_labels must be expert indices in [0, {self.config.num_experts - 1}] "
                f"({self.config.expert_names}) or -100 to ignore a turn"
            )

    # ----------------------------------------------------------------- generation

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def prepare_inputs_for_generation(self, input_ids, turn_ids=None, gate_mask=None, continues_turn=False, **kwargs):
        inputs = super().prepare_inputs_for_generation(input_ids, **kwargs)
        if continues_turn:  # decoding a reply on the cache: the turn's routing is on its gate state
            inputs["continues_turn"] = True
            return inputs
        width = (inputs.get("input_ids") if inputs.get("input_ids") is not None else inputs["inputs_embeds"]).shape[1]
        # Assisted and prompt-lookup decoding append candidate tokens beyond the kwargs' length.
        turn_ids, gate_mask = _extend_with_reply(turn_ids, gate_mask, input_ids.shape[1])
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
            turn_ids, gate_mask = _extend_with_reply(turn_ids, gate_mask, reference.shape[1] + num_new_tokens)
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

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.model.get_output_embeddings()

    def activation_checkpointing_enable(
        self, activation_checkpointing_kwargs: dict | None = None, every_n_layers: int = 1, offload: bool = False
    ) -> None:
        """Activation (gradient) checkpointing, non-reentrant: the gate enters each layer from
        outside its inputs, which only non-reentrant checkpointing differentiates."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:
            raise ValueError("use_reentrant=True cannot carry the gate's gradient; use use_reentrant=False")
        layers = decoder_layers(self.model)
        if any(getattr(layers[i], "self_attn", None) is None for i in self._expert_layer_ids):
            raise ValueError(
                "activation checkpointing needs a `self_attn` module in every decoder layer to re-route the experts "
                f"during recomputation; {type(layers[self.config.gate_layer]).__name__} has none"
            )
        super().activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)

    # ----------------------------------------------------------------- overrides and introspection

    @property
    def expert_names(self) -> list[str]:
        return list(self.config.expert_names)

    def _forced_weights(self, spec) -> torch.Tensor:
        """``[E]`` weights for every row, or ``[batch, E]`` one mixture per row."""
        names = self.config.expert_names
        one_name = isinstance(spec, str)
        if one_name or (isinstance(spec, Sequence) and len(spec) and all(isinstance(n, str) for n in spec)):
            chosen = [spec] if one_name else list(spec)
            unknown = sorted(set(chosen) - set(names))
            if unknown:
                raise ValueError(f"unknown expert(s) {unknown}; the experts are {names}")
            weights = torch.eye(len(names))[[names.index(n) for n in chosen]]  # [rows, E]
            return weights[0] if one_name else weights
        if isinstance(spec, Sequence) and any(isinstance(n, str) for n in spec):
            raise ValueError(
                f"force_gate got a list mixing expert names and numbers ({list(spec)!r}); give either expert "
                f"names (one per row) or numbers (one weight per expert {names})"
            )
        if isinstance(spec, Mapping):
            unknown = set(spec) - set(names)
            if unknown:
                raise ValueError(f"unknown experts {sorted(unknown)}; the experts are {names}")
            spec = [float(spec.get(name, 0.0)) for name in names]
        weights = torch.as_tensor(spec, dtype=torch.float32)
        if weights.dim() > 2 or weights.shape[-1:] != (len(names),):
            raise ValueError(
                f"force_gate needs {len(names)} weights, one per expert {names}, or a [batch, {len(names)}] tensor "
                f"of one mixture per row; got shape {tuple(weights.shape)}"
            )
        if not torch.isfinite(weights).all() or (weights < 0).any():
            raise ValueError(f"force_gate weights must be finite and >= 0, got {weights.tolist()}")
        if (weights.sum(-1) - 1.0).abs().max() > 1e-4:
            raise ValueError(f"force_gate weights must sum to 1 (per row), got {weights.tolist()}")
        return weights

    @contextmanager
    def force_gate(self, expert: str | Sequence[str] | Sequence[float] | Mapping[str, float] | torch.Tensor) -> Iterator["MoeEmpathyForCausalLM"]:
        """Uses a fixed mixture for every turn: one expert by name (external selection, as in
        the paper) or weights over all experts (a list, a tensor, or ``{name: weight}``); or one
        choice per row of the batch: a list of expert names or a ``[batch, E]`` tensor.

        Args:
            expert: an expert name, mixture weights (>= 0, summing to 1), or one of either per row.
        """
        weights = self._forced_weights(expert)
        previous, self._forced = self._forced, weights
        try:
            yield self
        finally:
            self._forced = previous

    @contextmanager
    def disable_experts(self) -> Iterator["MoeEmpathyForCausalLM"]:
        """Runs exactly the base model (no gate, no expert) inside the block."""
        previous, self._experts_disabled = self._experts_disabled, True
        try:
            yield self
        finally:
            self._experts_disabled = previous

    def enable_routing_log(self) -> None:
        """Starts recording every turn's gate decision (see :attr:`routing_log`)."""
        self._routing_log = []
        self._routing_calls = 0

    def disable_routing_log(self) -> list[RoutingRecord]:
        """Stops recording and returns what was recorded."""
        records, self._routing_log = self._routing_log or [], None
        return records

    @property
    def routing_log(self) -> list[RoutingRecord]:
        if self._routing_log is None:
            raise RuntimeError("the routing log is off; call model.enable_routing_log() first")
        return self._routing_log

    def save_routing_log(self, path: str | os.PathLike) -> None:
        """Writes the routing log as JSON (atomically).

        Args:
            path: the JSON file to write.
        """
        records = [record.__dict__ for record in self.routing_log]
        atomic_write_text(path, json.dumps({"expert_names": self.expert_names, "records": records}, indent=1))

    def _log_routing(self, gate: GateOutput, forced: bool) -> None:
        names = self.config.expert_names
        weights = gate.weights.detach().float().cpu()
        for dialogue, turn in gate.fresh.nonzero().tolist():
            row = weights[dialogue, turn]
            self._routing_log.append(
                RoutingRecord(
                    call=self._routing_calls,
                    dialogue=dialogue,
                    turn=turn,
                    weights={name: float(w) for name, w in zip(names, row)},
                    expert=names[int(row.argmax())],
                    forced=forced,
                )
            )
        self._routing_calls += 1

    # ----------------------------------------------------------------- saving and loading

    def expert_state_dict(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The trainable part only: every expert's ``lora_A``/``lora_B`` and the gate.

        Args:
            state_dict: a full state dict of this model to take them from (one gathered from
                FSDP shards); None takes them from the model itself.
        """
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {k: v for k, v in state_dict.items() if ".lora_A" in k or ".lora_B" in k or k.startswith("gate.")}

    def save_pretrained(self, save_directory: str | os.PathLike, *args, compact: bool = False, **kwargs) -> None:
        """Saves with safetensors; ``compact=True`` saves only experts and gate plus a reference
        to the base model (``config.base_model_name_or_path``), a few MB.

        Files are written to a temporary folder first and moved in only when all are written,
        so a failed save leaves an earlier checkpoint in ``save_directory`` intact.

        Args:
            save_directory: the folder to write.
            compact: save only the experts and the gate (from ``kwargs["state_dict"]`` when given,
                as ``PreTrainedModel.save_pretrained`` does).
            *args, **kwargs: passed to ``PreTrainedModel.save_pretrained`` for full saves.
        """
        target = Path(save_directory)
        if target.exists() and not target.is_dir():
            raise ValueError(f"{target} exists and is not a folder")
        if compact and not self.config.base_model_name_or_path:
            raise ValueError(
                "a compact checkpoint needs `config.base_model_name_or_path` (where to find the base model); "
                "set it to the base's folder, or save with compact=False"
            )
        target.mkdir(parents=True, exist_ok=True)
        staging = make_temp_dir(target, ".saving-")
        try:
            if compact:
                self.config.save_pretrained(staging)
                self.generation_config.save_pretrained(staging)
                metadata = {"format": COMPACT_FORMAT, "expert_names": json.dumps(self.expert_names)}
                tensors = {k: v.detach().contiguous().cpu() for k, v in self.expert_state_dict(kwargs.get("state_dict")).items()}
                save_file(tensors, staging / COMPACT_WEIGHTS, metadata=metadata)
            else:
                super().save_pretrained(staging, *args, **kwargs)
            stale = [p for p in target.glob("model*.safetensors*")] if compact else [target / COMPACT_WEIGHTS]
            for item in staging.iterdir():
                os.replace(item, target / item.name)
            for path in stale:
                path.unlink(missing_ok=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, base_model: PreTrainedModel | None = None, **kwargs):
        """Loads a full or a compact checkpoint.

        Args:
            pretrained_model_name_or_path: a folder written by :meth:`save_pretrained`.
            base_model: for compact checkpoints, the base model to use instead of loading
                ``config.base_model_name_or_path``.
            *model_args, **kwargs: as for ``PreTrainedModel.from_pretrained``.
        """
        path = Path(str(pretrained_model_name_or_path))
        saved = MoeEmpathyConfig.from_pretrained(path) if (path / "config.json").is_file() else None
        requested = kwargs.get("expert_names") or (kwargs["config"].expert_names if isinstance(kwargs.get("config"), MoeEmpathyConfig) else None)
        if saved is not None and requested is not None and list(requested) != list(saved.expert_names):
            raise ValueError(
                f"the checkpoint in {path} has experts {saved.expert_names} but {list(requested)} were asked for; "
                "load it with its own expert names (drop `expert_names`) and rename or add experts afterwards."
            )
        if (path / COMPACT_WEIGHTS).is_file():
            return cls._from_compact(path, saved, base_model, model_args, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)

    @classmethod
    def _from_compact(cls, path: Path, config: MoeEmpathyConfig, base_model: PreTrainedModel | None, model_args: tuple, kwargs: dict):
        """Builds the model of a compact checkpoint: its base, then its experts and gate, in eval mode.

        Args:
            path: the checkpoint folder.
            config: its configuration.
            base_model: the base to use, or None to load ``config.base_model_name_or_path``.
            model_args, kwargs: what ``from_pretrained`` was given; ``dtype`` (or ``torch_dtype``) and a
                one-device ``device_map`` are honoured, anything else that would change the model is refused.
        """
        kwargs = dict(kwargs)
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        device = _single_device(kwargs.pop("device_map", None))
        for harmless in ("config", "expert_names", *_HUB_KWARGS):
            kwargs.pop(harmless, None)
        if model_args or kwargs:
            raise ValueError(
                f"{path} is a compact checkpoint (experts and gate only), which does not take "
                f"{sorted(kwargs) or 'positional arguments'}; load it with `dtype` and a one-device `device_map` only, "
                "or save it in full (save_pretrained(..., compact=False)) to use every from_pretrained option"
            )
        dtype = None if dtype == "auto" else getattr(torch, dtype) if isinstance(dtype, str) else dtype
        weights = path / COMPACT_WEIGHTS
        try:
            with safe_open(str(weights), framework="pt") as handle:
                metadata = handle.metadata() or {}
            state = load_file(str(weights))
        except Exception as error:  # safetensors raises its own error types for damaged files
            raise ValueError(
                f"{weights} cannot be read ({type(error).__name__}: {error}); the file is damaged or incomplete: "
                "save the checkpoint again, or download it again"
            ) from error
        stored_names = json.loads(metadata.get("expert_names", "null"))
        if metadata.get("format") != COMPACT_FORMAT or stored_names != config.expert_names:
            raise ValueError(
                f"{path / COMPACT_WEIGHTS} holds experts {stored_names} but its config.json names "
                f"{config.expert_names}; the two files come from different checkpoints."
            )
        if base_model is None:
            base_model, _ = load_base(config.base_model_name_or_path, dtype=dtype or torch.float32)
        overrides = {k: v for k, v in config.to_diff_dict().items() if k in MoeEmpathyConfig.__dataclass_fields__ and k != "text_config"}
        overrides.pop("tie_word_embeddings", None)
        model = cls.from_base(base_model, **overrides)
        missing, unexpected = model.load_state_dict(state, strict=False)
        expected = set(model.expert_state_dict())
        if unexpected or expected - set(state):
            raise ValueError(
                f"{path / COMPACT_WEIGHTS} does not match the model: missing {sorted(expected - set(state))[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        generation = path / "generation_config.json"
        if generation.is_file():
            model.generation_config = model.generation_config.from_pretrained(path)
        model.to(device=device, dtype=dtype)  # no-op for None
        return model.eval()  # as transformers loads full checkpoints: dropout off until .train()



def register() -> None:
    """Registers the model with ``AutoConfig`` and ``AutoModelForCausalLM`` (done at import)."""
    AutoConfig.register(MoeEmpathyConfig.model_type, MoeEmpathyConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoeEmpathyConfig, MoeEmpathyForCausalLM, exist_ok=True)


register()
