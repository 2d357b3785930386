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
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Cache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from .base import load_base
from .cache import attach_gate_state, gate_state_of
from .checkpoint import COMPACT_WEIGHTS, is_expert_key, read_compact, write_compact
from .configuration_moe_empathy import MoeEmpathyConfig
from .dispatch import RoutingHooks, continuing_call, deciding_call, gate_fields
from .gate import GateState, TurnGate
from .gate_control import GateControlMixin, RoutingLog
from .layers import ROUTING_KWARG, MultiLoraLinear, decoder_layers, inject_experts
from .losses import lm_loss
from .peft_io import adapters_span, export_expert, import_expert
from .routing import RoutingSlot
from .turn_generation import MoeEmpathyGenerationMixin
from .turns import find_turn_markers
from .utils import make_temp_dir


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
        elif isinstance(module, nn.GRUCell):
            module.reset_parameters()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class MoeEmpathyForCausalLM(MoeEmpathyPreTrainedModel, GateControlMixin, MoeEmpathyGenerationMixin):
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
            config.gate_memory_size,
        )
        self._forced: torch.Tensor | None = None
        self._label_share = 0.0
        self._experts_disabled = False
        self._routing_log: RoutingLog | None = None
        self._routing_hooks = RoutingHooks(decoder_layers(self.model), config.gate_layer, self._routing_slot)
        self._merged = False
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
        if self.training:  # activation checkpointing (on only in training) needs the hand-over hooks
            self._routing_hooks.follow_checkpointing()
        call = None
        if not self._experts_disabled and not self._merged:
            if continues_turn:
                width = (input_ids if input_ids is not None else inputs_embeds).shape[1]
                call = continuing_call(self.gate, self.config, gate_state, width, self._forced)
            else:
                call = deciding_call(
                    self.gate, self.config, input_ids, inputs_embeds, attention_mask, turn_ids, gate_mask, gate_state, self._forced,
                    gate_labels, self._label_share,
                )
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
        loss, fields = lm, {}
        if call is not None and call.output is None:  # a decided turn continues: no new decision, no gate loss
            fields = {"gate_weights": gate_state.turn_weights, "gate_state": gate_state}
        elif call is not None:
            fields, losses = gate_fields(call.output, gate_labels, self.config)
            if labels is not None:
                loss = lm + losses.aux
            elif gate_labels is not None:
                loss = losses.aux
        if call is not None:
            # The gate's state travels with the KV cache it belongs to (generate, multi-turn rollouts).
            attach_gate_state(outputs.cache, fields["gate_state"])
            if self._routing_log is not None:
                self._routing_log.add(call.output, forced=call.forced is not None)
        # One constructor call: a ModelOutput's attribute writes cost microseconds each, per decode step.
        return MoeEmpathyCausalLMOutputWithPast(
            loss=loss,
            lm_loss=lm,
            logits=outputs.logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **fields,
        )

    # ----------------------------------------------------------------- embeddings and checkpointing

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
        if any(getattr(layer, "self_attn", None) is None for layer in layers[self.config.gate_layer :]):
            raise ValueError(
                "activation checkpointing needs a `self_attn` module in every decoder layer to re-route the experts "
                f"during recomputation; {type(layers[self.config.gate_layer]).__name__} has none"
            )
        super().activation_checkpointing_enable(kwargs, every_n_layers=every_n_layers, offload=offload)
        self._routing_hooks.follow_checkpointing()

    def activation_checkpointing_disable(self) -> None:
        """Turns activation checkpointing off, and with it the per-layer routing hooks it needed."""
        super().activation_checkpointing_disable()
        self._routing_hooks.follow_checkpointing()

    # ----------------------------------------------------------------- introspection

    @property
    def expert_names(self) -> list[str]:
        return list(self.config.expert_names)

    # ----------------------------------------------------------------- saving and loading

    def expert_state_dict(self, state_dict: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The trainable part only: every expert's ``lora_A``/``lora_B`` and the gate.

        Args:
            state_dict: a full state dict of this model to take them from (one gathered from
                FSDP shards); None takes them from the model itself.
        """
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {k: v for k, v in state_dict.items() if is_expert_key(k)}

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
        if self._merged:
            raise ValueError(
                "a mixture is merged into the base weights, which would be saved twice (merged and as experts); "
                "call unmerge_adapter() first, or save the plain model that merge_and_unload() returns"
            )
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
                write_compact(self, staging, kwargs.get("state_dict"))
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
            return read_compact(cls, path, saved, base_model, model_args, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


def register() -> None:
    """Registers the model with ``AutoConfig`` and ``AutoModelForCausalLM`` (done at import)."""
    AutoConfig.register(MoeEmpathyConfig.model_type, MoeEmpathyConfig, exist_ok=True)
    AutoModelForCausalLM.register(MoeEmpathyConfig, MoeEmpathyForCausalLM, exist_ok=True)


register()
