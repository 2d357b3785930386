"""Configuration of a causal LM with empathy-level LoRA experts behind a per-turn gate."""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig
from transformers.configuration_utils import SubConfigSpec

DEFAULT_EXPERT_NAMES = ["low", "medium", "high"]
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
GATE_TYPES = ("soft", "top_k")
GATE_MEMORIES = ("none", "ema", "gru")
KERNEL_BACKENDS = ("auto", "triton", "torch")


def _fail(field: str, value, allowed: str) -> None:
    raise ValueError(f"MoeEmpathyConfig.{field}={value!r} is invalid: {allowed}.")


class MoeEmpathyConfig(PretrainedConfig):
    r"""Configuration of [`MoeEmpathyForCausalLM`].

    The wrapped causal LM is described by ``text_config`` (any ``AutoConfig``); everything
    else describes the experts and the gate.

    Args:
        text_config: configuration of the base causal LM (nested; a dict or a config).
        expert_names: one name per expert, e.g. the empathy levels ``["low", "medium", "high"]``.
        lora_rank: rank ``r`` of every expert.
        lora_alpha: LoRA ``alpha``; the delta is scaled by ``alpha / r``.
        lora_dropout: dropout on the experts' input during training.
        target_modules: names of the linear layers (last path component) that get experts.
        gate_layer: the gate reads the hidden states entering decoder layer ``gate_layer``
            (0 = the embeddings); experts sit only in layers ``>= gate_layer``, so one forward
            pass suffices. ``None`` picks a third of the depth.
        gate_type: ``"soft"`` (softmax over all experts) or ``"top_k"`` (keep ``gate_top_k`` experts,
            renormalised).
        gate_top_k: experts kept per turn when ``gate_type="top_k"``.
        gate_temperature: softmax temperature of the gate logits.
        gate_hidden_size: width of the gate's hidden layer; 0 makes the gate one linear layer.
        gate_memory: ``"none"`` (each turn's gate reads its own user message), ``"ema"`` (an
            exponential moving average of the pooled turns carries context across turns) or
            ``"gru"`` (a recurrent cell over the turns' pools and the previous decisions).
        gate_memory_decay: weight of the past in the ``"ema"`` memory, in ``[0, 1)``.
        gate_memory_size: width of the ``"gru"`` memory's state.
        gate_label_loss_weight: weight of the supervised gate loss against per-turn labels.
        load_balancing_loss_weight: weight of the load-balancing loss over experts.
        z_loss_weight: weight of the router z-loss on the gate logits.
        kernel_backend: ``"auto"`` (Triton on CUDA, torch otherwise), ``"triton"`` or ``"torch"``.
        user_turn_marker: token ids that open a user message in the chat template; used to
            derive ``turn_ids`` when none are passed (``None``: the whole input is one turn).
        assistant_turn_marker: token ids that open an assistant reply in the chat template.
        base_model_name_or_path: where the base model comes from, for compact checkpoints.
    """

    model_type = "moe_empathy"
    sub_configs_defaults = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PretrainedConfig | None = None
    expert_names: list[str] | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None
    gate_layer: int | None = None
    gate_type: str = "soft"
    gate_top_k: int = 1
    gate_temperature: float = 1.0
    gate_hidden_size: int = 128
    gate_memory: str = "none"
    gate_memory_decay: float = 0.5
    gate_memory_size: int = 64
    gate_label_loss_weight: float = 1.0
    load_balancing_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    kernel_backend: str = "auto"
    user_turn_marker: list[int] | None = None
    assistant_turn_marker: list[int] | None = None
    base_model_name_or_path: str | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.expert_names is None:
            self.expert_names = list(DEFAULT_EXPERT_NAMES)
        if self.target_modules is None:
            self.target_modules = list(DEFAULT_TARGET_MODULES)
        self.expert_names = list(self.expert_names)
        self.target_modules = list(self.target_modules)
        num_layers = self.text_config.num_hidden_layers
        if self.gate_layer is None:
            self.gate_layer = num_layers // 3
        # The wrapper's tying follows the base (SmolLM2 ties its embeddings).
        self.tie_word_embeddings = bool(getattr(self.text_config, "tie_word_embeddings", False))
        self.validate()

    @property
    def num_experts(self) -> int:
        return len(self.expert_names)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    def validate(self) -> None:
        """Raises a ValueError naming the field and the allowed values for any bad setting."""
        names = self.expert_names
        if not names or not all(isinstance(n, str) and n for n in names):
            _fail("expert_names", names, "give a non-empty list of non-empty strings")
        if len(set(names)) != len(names):
            _fail("expert_names", names, "names must be unique")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            _fail("lora_rank", self.lora_rank, "use an integer >= 1")
        if not self.lora_alpha > 0:
            _fail("lora_alpha", self.lora_alpha, "use a number > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            _fail("lora_dropout", self.lora_dropout, "use a probability in [0, 1)")
        if not self.target_modules or not all(isinstance(m, str) and m for m in self.target_modules):
            _fail("target_modules", self.target_modules, "give a non-empty list of module names such as 'q_proj'")
        num_layers = self.text_config.num_hidden_layers
        if not isinstance(self.gate_layer, int) or not 0 <= self.gate_layer < num_layers:
            _fail("gate_layer", self.gate_layer, f"use an integer in [0, {num_layers - 1}] (the base has {num_layers} layers)")
        if self.gate_type not in GATE_TYPES:
            _fail("gate_type", self.gate_type, f"allowed values are {GATE_TYPES}")
        if self.gate_type == "top_k" and not (isinstance(self.gate_top_k, int) and 1 <= self.gate_top_k <= len(names)):
            _fail("gate_top_k", self.gate_top_k, f"use an integer in [1, {len(names)}] (the number of experts)")
        if not self.gate_temperature > 0:
            _fail("gate_temperature", self.gate_temperature, "use a number > 0")
        if not isinstance(self.gate_hidden_size, int) or self.gate_hidden_size < 0:
            _fail("gate_hidden_size", self.gate_hidden_size, "use an integer >= 0 (0 = a linear gate)")
        if self.gate_memory not in GATE_MEMORIES:
            _fail("gate_memory", self.gate_memory, f"allowed values are {GATE_MEMORIES}")
        if not 0.0 <= self.gate_memory_decay < 1.0:
            _fail("gate_memory_decay", self.gate_memory_decay, "use a number in [0, 1)")
        if not isinstance(self.gate_memory_size, int) or self.gate_memory_size < 1:
            _fail("gate_memory_size", self.gate_memory_size, "use an integer >= 1")
        for field in ("gate_label_loss_weight", "load_balancing_loss_weight", "z_loss_weight"):
            if getattr(self, field) < 0:
                _fail(field, getattr(self, field), "use a weight >= 0")
        if self.kernel_backend not in KERNEL_BACKENDS:
            _fail("kernel_backend", self.kernel_backend, f"allowed values are {KERNEL_BACKENDS}")
        for field in ("user_turn_marker", "assistant_turn_marker"):
            marker = getattr(self, field)
            if marker is not None and (not marker or not all(isinstance(t, int) for t in marker)):
                _fail(field, marker, "give a non-empty list of token ids, or None")
        if (self.user_turn_marker is None) != (self.assistant_turn_marker is None):
            raise ValueError(
                "MoeEmpathyConfig.user_turn_marker and assistant_turn_marker must be set together "
                "(both token-id lists, or both None)."
            )


__all__ = ["MoeEmpathyConfig"]
