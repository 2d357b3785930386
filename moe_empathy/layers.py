"""Multi-expert LoRA linear layers and their injection into a base causal LM.

Layer contract (in the spirit of peft's ``LoraLayer``):

* ``base_layer`` is the frozen original ``nn.Linear``; its output is always computed.
* ``lora_A [E, r, in]`` and ``lora_B [E, out, r]`` hold the ``E`` experts; ``B`` starts at
  zero, so a fresh layer equals its base exactly.
* The per-token gate comes from the :class:`~moe_empathy.routing.RoutingPlan` in the
  model's shared :class:`~moe_empathy.routing.RoutingSlot` (``routing_slot``), set by the
  gate layer's pre-hook (and, under activation checkpointing, again by a pre-hook of each
  expert layer, so that the recomputation sees the very same plan; see
  :mod:`moe_empathy.dispatch`). The plan was built and checked once per forward.
* Forward dispatch, in order: no plan (experts disabled, or a call outside the gated
  model) or a mixture merged into the base weight (:meth:`MultiLoraLinear.merge`) -> base;
  inference with one mixture shared by every token -> one GEMM with the folded weight (a
  copy of the base weight plus the mixture's update, built once per turn); inference on the
  torch backend -> base GEMM plus the experts' two GEMMs on
  cached concatenated experts and the plan's per-token factors; otherwise base GEMM plus
  :func:`moe_empathy.kernels.multi_lora` (Triton or torch, differentiable) accumulated into its output.
"""

from __future__ import annotations

import math
import torch
from torch import nn

from .kernels import multi_lora
from .kernels.reference import concatenate_experts
from .routing import RoutingPlan, RoutingSlot

ROUTING_KWARG = "moe_routing"


class MultiLoraLinear(nn.Module):
    """``y = W x + (alpha / r) * sum_e g[t, e] * B_e A_e x`` over ``E`` stacked LoRA experts.

    Args:
        base_layer: the frozen linear layer to wrap.
        num_experts: number of experts ``E``.
        rank: LoRA rank ``r``.
        alpha: LoRA alpha.
        dropout: dropout probability on the experts' input.
        kernel_backend: backend passed to :func:`moe_empathy.kernels.multi_lora`.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        num_experts: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        kernel_backend: str = "auto",
    ):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.num_experts = num_experts
        self.rank = rank
        self.scaling = alpha / rank
        self.kernel_backend = kernel_backend
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.empty(num_experts, self.out_features, rank, dtype=weight.dtype, device=weight.device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.routing_slot: RoutingSlot | None = None  # shared with the model's other expert linears
        self.merged_mixture: torch.Tensor | None = None  # [E], while merged into base_layer.weight
        # Inference caches, valid while the parameters' versions are unchanged.
        self._fold: tuple[RoutingPlan, tuple, torch.Tensor] | None = None  # (plan, versions, folded weight)
        self._concatenated: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (versions, a_cat_t, b_cat_t)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A like a fresh ``nn.Linear`` (Kaiming-uniform), B zero: the layer equals its base."""
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        self.drop_merged_weight()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, seq, in]
        plan = self.routing_slot.plan if self.routing_slot is not None else None
        if plan is None or self.merged:
            return self.base_layer(x)
        inference = not torch.is_grad_enabled() and not self.training
        if inference and plan.fold_key is not None:
            return nn.functional.linear(x, self._folded_weight(plan), self.base_layer.bias)
        result = self.base_layer(x)  # [batch, seq, out]
        if inference and (self.kernel_backend == "torch" or (self.kernel_backend == "auto" and not x.is_cuda)):
            a_cat_t, b_cat_t = self._concatenated_experts()  # dropout is off in inference
            shrunk = (x.reshape(-1, self.in_features) @ a_cat_t) * plan.row_scale(self.rank, self.scaling, x.dtype)  # [tokens, E*r]
            result.reshape(-1, self.out_features).addmm_(shrunk, b_cat_t)
            return result
        flat_x = self.lora_dropout(x).reshape(-1, self.in_features)  # [tokens, in]
        flat_out = result.reshape(-1, self.out_features)  # [tokens, out]
        if plan.expert_ids is not None:
            gate = plan.topk_weights.reshape(-1, plan.topk_weights.shape[-1])  # [tokens, k]
            expert_ids = plan.expert_ids.reshape(-1, plan.expert_ids.shape[-1])  # [tokens, k]
        else:
            gate = plan.weights.reshape(-1, self.num_experts)  # [tokens, E]
            expert_ids = None
        flat_out = multi_lora(
            flat_x, self.lora_A, self.lora_B, gate.to(x.dtype), self.scaling,
            expert_ids=expert_ids, out=flat_out, backend=self.kernel_backend, validate=False,
        )
        return flat_out.view_as(result)

    # ----------------------------------------------------------------- folding and merging

    def delta_weight(self, mixture: torch.Tensor) -> torch.Tensor:
        """``scaling * B_cat diag(g) A_cat``: the ``[out, in]`` update of one mixture ``g``.

        Args:
            mixture: ``[E]`` expert weights.
        """
        a_cat, b_cat_t = concatenate_experts(self.lora_A, self.lora_B)  # [E*r, in], [E*r, out]
        scale = (mixture.to(a_cat) * self.scaling).repeat_interleave(self.rank)  # [E*r]
        return (b_cat_t * scale.unsqueeze(1)).t() @ a_cat  # [out, in]

    @property
    def merged(self) -> bool:
        """Whether a mixture is merged into ``base_layer.weight`` (see :meth:`merge`)."""
        return self.merged_mixture is not None

    @torch.no_grad()
    def checked_merged_weight(self, mixture: torch.Tensor) -> torch.Tensor:
        """``W + delta_weight(mixture)`` in a new tensor, refused with a ValueError if not finite.

        Args:
            mixture: ``[E]`` expert weights.
        """
        merged = self.base_layer.weight + self.delta_weight(mixture).to(self.base_layer.weight.dtype)  # [out, in]
        if not torch.isfinite(merged).all():
            raise ValueError(
                f"merging mixture {mixture.tolist()} gives non-finite weights in a {self.out_features}x"
                f"{self.in_features} layer: its experts hold NaN or inf values; check the checkpoint"
            )
        return merged

    @torch.no_grad()
    def merge(self, mixture: torch.Tensor, safe_merge: bool = False) -> None:
        """Adds one mixture of the experts to the base weight in place; the layer then runs
        its base only, until :meth:`unmerge`.

        Args:
            mixture: ``[E]`` expert weights.
            safe_merge: build the merged weight in a copy and refuse it if it is not finite.
        """
        if self.merged:
            raise RuntimeError("this layer already has a merged mixture; call unmerge() before merging another")
        if safe_merge:
            self.base_layer.weight.copy_(self.checked_merged_weight(mixture))
        else:
            self.base_layer.weight.add_(self.delta_weight(mixture).to(self.base_layer.weight.dtype))
        self.merged_mixture = mixture.detach().clone()
        self.drop_merged_weight()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtracts the merged mixture from the base weight again (equal up to rounding)."""
        if not self.merged:
            raise RuntimeError("this layer has no merged mixture to unmerge")
        self.base_layer.weight.sub_(self.delta_weight(self.merged_mixture).to(self.base_layer.weight.dtype))
        self.merged_mixture = None
        self.drop_merged_weight()

    def _versions(self) -> tuple[int, int, int]:
        """The parameters' versions: optimiser steps and loads bump them.

        Read from the parameter dictionaries (which also sees a parameter replaced by another):
        ``nn.Module.__getattr__`` is a slow path, and this runs in every expert linear at every
        decode step.
        """
        own, base = self._parameters, self._modules["base_layer"]._parameters
        return own["lora_A"]._version, own["lora_B"]._version, base["weight"]._version

    def _folded_weight(self, plan: RoutingPlan) -> torch.Tensor:
        """``W + delta_weight(plan.fold)`` for inference on a turn-constant mixture, kept per mixture.

        The decode steps of one turn share its plan and find its weight by identity plus three
        integer version reads (a fraction of a microsecond); a new plan compares its mixture.
        An optimiser step or a load between two calls rebuilds the weight, so a fold is never stale.
        """
        versions, fold = self._versions(), self._fold
        if fold is not None and fold[1] == versions:
            if fold[0] is plan:  # a decode step of the turn: nothing to write
                return fold[2]
            if fold[0].fold_key == plan.fold_key:
                self._fold = (plan, versions, fold[2])
                return fold[2]
        weight = self.base_layer.weight + self.delta_weight(plan.fold)  # [out, in]
        self._fold = (plan, versions, weight)
        return weight

    def _concatenated_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``a_cat_t [in, E*r]`` and ``b_cat_t [E*r, out]``, kept until the experts change."""
        versions, cat = self._versions(), self._concatenated
        if cat is None or cat[0] != versions:
            a_cat, b_cat_t = concatenate_experts(self.lora_A, self.lora_B)
            cat = self._concatenated = (versions, a_cat.t(), b_cat_t)
        return cat[1], cat[2]

    def drop_merged_weight(self) -> None:
        """Frees the folded weight and the concatenated experts (when generation ends)."""
        self._fold = None
        self._concatenated = None

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank={self.rank}, scaling={self.scaling:g}, backend={self.kernel_backend!r}"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of a Hugging Face causal LM (``model.model.layers`` etc.).

    Args:
        model: a causal LM such as ``LlamaForCausalLM``.
    """
    inner = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"cannot find the decoder layers of {type(model).__name__}: expected `model.get_decoder().layers` "
            "to be an nn.ModuleList, as in Llama, Mistral, Qwen2 and similar decoder-only models."
        )
    return layers


def inject_experts(
    model: nn.Module,
    target_modules: list[str],
    first_layer: int,
    num_experts: int,
    rank: int,
    alpha: float,
    dropout: float,
    kernel_backend: str,
    routing_slot: RoutingSlot | None = None,
) -> dict[str, MultiLoraLinear]:
    """Replaces each targeted ``nn.Linear`` in decoder layers ``>= first_layer`` by a
    :class:`MultiLoraLinear` wrapping it.

    Args:
        model: the base causal LM, changed in place.
        target_modules: last path components of the linears to wrap, e.g. ``["q_proj", "v_proj"]``.
        first_layer: index of the first decoder layer that gets experts.
        num_experts, rank, alpha, dropout, kernel_backend: see :class:`MultiLoraLinear`.
        routing_slot: the slot every new layer reads its routing plan from.

    Returns:
        The new layers by their path inside ``model``.
    """
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    found: dict[str, MultiLoraLinear] = {}
    for index in range(first_layer, len(layers)):
        for name, module in list(layers[index].named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in target_modules or not isinstance(module, nn.Linear):
                continue
            parent = layers[index].get_submodule(name.rsplit(".", 1)[0]) if "." in name else layers[index]
            wrapped = MultiLoraLinear(module, num_experts, rank, alpha, dropout, kernel_backend)
            wrapped.routing_slot = routing_slot
            setattr(parent, leaf, wrapped)
            found[f"{prefix}.{index}.{name}"] = wrapped
    missing = set(target_modules) - {path.rsplit(".", 1)[-1] for path in found}
    if missing:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in layers[first_layer].named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"target_modules {sorted(missing)} match no nn.Linear in decoder layers >= {first_layer} of "
            f"{type(model).__name__}; linear layers there are named {available}."
        )
    return found
