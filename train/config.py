"""Training configuration read from YAML, validated by the classes that use it.

A config file has four sections and one top-level key::

    method: gated      # gated | single_lora | per_level | gated_from_experts
    model: {...}       # MoeEmpathyConfig keyword arguments, plus the base (BaseSection)
    data: {...}        # DataSection
    training: {...}    # TrainingArguments keyword arguments, plus our extras (TrainingExtras)

The sections (:mod:`.config_sections`) mirror nothing by hand: the ``model`` and ``training``
fields are generated from ``MoeEmpathyConfig`` and ``transformers.TrainingArguments``, and
:meth:`TrainConfig.validate` builds both to check the values.

``extends: OTHER.yaml`` (a path relative to the file) starts from another config and
overrides only the keys given, section by section (:mod:`.config_yaml` reads the files).

Unknown keys, values of the wrong type, values those classes refuse and a data path that
neither exists nor can be synthesised are errors (:class:`ConfigError`) whose message names
the key and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, LlamaConfig, PretrainedConfig, TrainingArguments

from moe_empathy.base import DEFAULT_BASE_ID
from moe_empathy.base import default_cache_dir as default_base_dir
from moe_empathy.configuration_moe_empathy import MoeEmpathyConfig

from .config_sections import (
    BATCHING,
    CONTEXT_REPLIES,
    GATED_METHODS,
    METHODS,
    MIXED_PRECISION,
    PREFIX_CACHE_DTYPES,
    PREFIX_CACHE_MODES,
    SYNTH_BACKENDS,
    TINY_BASE,
    DataSection,
    GateWarmupSection,
    ModelSection,
    TrainingExtras,
    TrainingSection,
    model_config_kwargs,
)
from .config_yaml import ConfigError, build, read_values

# Keys of the step budget: the only ones a resumed run may change (the config has no epochs key).
BUDGET_KEYS = ("training.max_steps",)


@dataclass
class TrainConfig:
    """A whole training run."""

    method: str = field(default="gated", metadata={"help": f"one of {METHODS}"})
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    gate_warmup: GateWarmupSection | None = field(
        default=None, metadata={"help": "gated methods: train the gate alone first, on long dialogues (None: no warm-up)"}
    )

    @property
    def trains_gate(self) -> bool:
        """Whether the joint run trains a gate on the corpus's labels (a gated method whose gate
        is not frozen); the gate warm-up always does."""
        return self.method in GATED_METHODS and not self.training.freeze_gate

    def validate(self, check_paths: bool = True) -> None:
        """Raises a :class:`ConfigError` for inconsistent settings.

        Args:
            check_paths: also check that ``data.path`` exists (or can be synthesised).
        """
        if self.method not in METHODS:
            raise ConfigError(f"method: {self.method!r} is not one of {METHODS}")
        if self.data.batching not in BATCHING:
            raise ConfigError(f"data.batching: {self.data.batching!r} is not one of {BATCHING}")
        if self.training.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"training.mixed_precision: {self.training.mixed_precision!r} is not one of {MIXED_PRECISION}")
        sections = {"data": self.data, "gate_warmup.data": self.gate_warmup.data if self.gate_warmup else None}
        for name, section in sections.items():
            backend = section.synthesize.backend if section and section.synthesize else "template"
            if backend not in SYNTH_BACKENDS:
                raise ConfigError(f"{name}.synthesize.backend: {backend!r} is not one of {SYNTH_BACKENDS}")
            if backend == "grounded" and self.model.base == TINY_BASE:
                raise ConfigError(f"{name}.synthesize.backend: 'grounded' needs the base model's own answers, and "
                                  f"model.base is {TINY_BASE!r} (random weights); use 'template' or a real base")
            off_level = section.synthesize.off_level_rate if section and section.synthesize else 0.0
            if off_level and (name == "gate_warmup.data" or self.trains_gate):
                raise ConfigError(
                    f"{name}.synthesize.off_level_rate: {off_level} labels replies with levels the dialogue does not call "
                    "for, and a gate would learn from those labels; use it only in data.synthesize, with "
                    "training.freeze_gate: true and the gate trained in gate_warmup (on a corpus of rate 0)"
                )
        if self.training.prefix_cache not in PREFIX_CACHE_MODES:
            raise ConfigError(f"training.prefix_cache: {self.training.prefix_cache!r} is not one of {PREFIX_CACHE_MODES}")
        if self.training.prefix_cache_dtype not in PREFIX_CACHE_DTYPES:
            raise ConfigError(
                f"training.prefix_cache_dtype: {self.training.prefix_cache_dtype!r} is not one of {PREFIX_CACHE_DTYPES}"
            )
        if self.training.prefix_cache == "on" and self.method not in GATED_METHODS:
            raise ConfigError(
                f"training.prefix_cache: on needs a gated model, but method is {self.method!r} (a peft baseline); "
                "set training.prefix_cache to auto or off"
            )
        positive = {
            "data.max_length": self.data.max_length,
            "data.bucket_size": self.data.bucket_size,
            "training.max_steps": self.training.max_steps,
            "training.per_device_train_batch_size": self.training.per_device_train_batch_size,
            "training.per_device_eval_batch_size": self.training.per_device_eval_batch_size,
            "training.gradient_accumulation_steps": self.training.gradient_accumulation_steps,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        t = self.training
        if t.save_steps is not None and t.eval_steps is not None and t.save_steps % t.eval_steps:
            raise ConfigError(
                f"training.save_steps ({t.save_steps}) must be a multiple of training.eval_steps "
                f"({t.eval_steps}) so that the best checkpoint can be kept"
            )
        if self.method == "gated_from_experts" and not self.model.init_from_experts:
            raise ConfigError(
                "method gated_from_experts needs model.init_from_experts: the output folder of a "
                "`method: per_level` run (one peft adapter per expert name)"
            )
        if self.method != "gated_from_experts" and self.model.init_from_experts:
            raise ConfigError("model.init_from_experts is only used with method: gated_from_experts")
        if not 0.0 <= self.training.label_routing <= 1.0:
            raise ConfigError(f"training.label_routing: must lie in [0, 1] (1 = hard routing by label), got {self.training.label_routing}")
        if self.method not in GATED_METHODS and (self.gate_warmup is not None or self.training.label_routing or self.training.freeze_gate):
            raise ConfigError(
                f"gate_warmup, training.label_routing and training.freeze_gate need a gated model, but method is "
                f"{self.method!r}; remove them (an `extends:` baseline config can set gate_warmup: null)"
            )
        if self.gate_warmup is not None:
            w = self.gate_warmup
            if w.data.path is None:
                raise ConfigError("gate_warmup.data.path is missing: a corpus folder (add gate_warmup.data.synthesize to create it)")
            for key in ("epochs", "batch_size"):
                if getattr(w, key) < 1:
                    raise ConfigError(f"gate_warmup.{key}: must be >= 1, got {getattr(w, key)}")
            if w.context_replies not in CONTEXT_REPLIES:
                raise ConfigError(f"gate_warmup.context_replies: {w.context_replies!r} is not one of {CONTEXT_REPLIES}")
        if self.data.path is None:
            raise ConfigError(
                "data.path is missing: set it to a folder written by `moe-empathy synth --out DIR` "
                "(add data.synthesize to create it on first use)"
            )
        if check_paths:
            self._check_model_paths()
        self._check_model_config()
        try:
            training_arguments(self)
        except ValueError as err:
            raise ConfigError(f"training: {err}") from None
        if check_paths:
            self._check_data_paths()

    def _check_model_config(self) -> None:
        """Builds the ``MoeEmpathyConfig`` of the model section on the base's configuration, as far
        as it can be read without the weights (a stand-in of ``gate_layer + 1`` layers otherwise,
        so the layer's range is checked when the base is loaded)."""
        text_config = base_text_config(self.model)
        if text_config is None:
            layer = self.model.gate_layer
            text_config = LlamaConfig(num_hidden_layers=layer + 1 if isinstance(layer, int) and layer >= 0 else 1)
        try:
            MoeEmpathyConfig(text_config=text_config, **model_config_kwargs(self.model))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model: {err}") from None

    def _check_model_paths(self) -> None:
        """Raises a :class:`ConfigError` unless ``model.base`` and ``model.tokenizer`` can be found."""
        base = self.model.base
        if base not in (TINY_BASE, DEFAULT_BASE_ID) and not (Path(base) / "config.json").is_file():
            raise ConfigError(
                f"model.base: {base!r} is not a local model folder (no config.json there); set model.base to "
                f"a folder with config.json and weights, {DEFAULT_BASE_ID!r} (the embedded default) or {TINY_BASE!r}"
            )
        tokenizer = self.model.tokenizer
        if tokenizer is not None and not (Path(tokenizer) / "tokenizer_config.json").is_file():
            raise ConfigError(
                f"model.tokenizer: {tokenizer!r} is not a tokenizer folder (no tokenizer_config.json there); "
                "set it to one, or remove it to use the base's tokenizer"
            )

    def _check_data_paths(self) -> None:
        """Raises a :class:`ConfigError` unless the corpus (and the experts to start from) can be found."""
        path = Path(self.data.path)
        if not path.exists() and self.data.synthesize is None:
            raise ConfigError(
                f"data.path: {path} does not exist; create it with `moe-empathy synth --out {path}` "
                "or add a data.synthesize section to generate it on first use"
            )
        if path.exists() and not (path / "dataset_dict.json").is_file():
            raise ConfigError(f"data.path: {path} is not a dataset written by `moe-empathy synth` (no dataset_dict.json)")
        if self.model.init_from_experts:
            folder = Path(self.model.init_from_experts)
            missing = [n for n in self.model.expert_names if not (folder / n / "adapter_config.json").is_file()]
            if missing:
                raise ConfigError(
                    f"model.init_from_experts: {folder} lacks peft adapters for {missing}; "
                    "train them with `method: per_level` first"
                )

    def to_dict(self) -> dict:
        """The config as plain YAML-ready data."""
        return dataclasses.asdict(self)


def base_text_config(model: ModelSection) -> PretrainedConfig | None:
    """The base's configuration when it can be read without its weights: the ``tiny`` shape, a
    local folder's ``config.json``, or the default base's converted copy; None otherwise.

    Args:
        model: the model section.
    """
    if model.base == TINY_BASE:
        return model.tiny.llama_config()
    folder = default_base_dir() if model.base == DEFAULT_BASE_ID else Path(model.base)
    return AutoConfig.from_pretrained(folder) if (folder / "config.json").is_file() else None


def training_arguments(config: TrainConfig, output_dir: str | None = None, max_steps: int | None = None) -> TrainingArguments:
    """The ``TrainingArguments`` of a run: the training section's, with mixed precision resolved
    for this machine (``auto``: bf16 on a GPU that has it, fp32 otherwise) and the arguments the
    pipeline sets itself (:data:`SET_BY_TRAINER`).

    Args:
        config: the run's config.
        output_dir: where checkpoints go (default: ``training.output_dir``).
        max_steps: optimizer steps (default: ``training.max_steps``).
    """
    extras = {f.name for f in dataclasses.fields(TrainingExtras)}
    kwargs = {k: v for k, v in dataclasses.asdict(config.training).items() if k not in extras}
    if output_dir is not None:
        kwargs["output_dir"] = output_dir
    if max_steps is not None:
        kwargs["max_steps"] = max_steps
    if kwargs["save_steps"] is None:
        kwargs["save_steps"] = kwargs["eval_steps"]
    precision = config.training.mixed_precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return TrainingArguments(
        **kwargs,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        disable_tqdm=True,  # the rich progress bar replaces tqdm's
        remove_unused_columns=False,
        # Without CUDA, processes started by `accelerate launch` / torchrun join a gloo group on the CPU.
        use_cpu=not torch.cuda.is_available(),
    )


def changed_keys(recorded: dict, given: dict, ignore: tuple[str, ...] = BUDGET_KEYS) -> list[str]:
    """The dotted keys whose values differ between two configs' :meth:`TrainConfig.to_dict`.

    Args:
        recorded: the config a run was started with.
        given: the config now given.
        ignore: keys allowed to differ (the step budget).
    """

    def flat(values: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in values.items():
            name = f"{prefix}{key}"
            out.update(flat(value, name + ".") if isinstance(value, dict) else {name: value})
        return out

    old, new = flat(recorded), flat(given)
    return sorted(k for k in old.keys() | new.keys() if k not in ignore and old.get(k) != new.get(k))


def config_from_dict(values: dict, check_paths: bool = True) -> TrainConfig:
    """Builds and validates a :class:`TrainConfig` from nested dicts.

    Args:
        values: the parsed YAML.
        check_paths: also check that the data exists (or can be synthesised).
    """
    if not isinstance(values, dict):
        raise ConfigError(f"a training config must be a mapping of sections, got {type(values).__name__}")
    config = build(TrainConfig, values)
    config.validate(check_paths=check_paths)
    return config


def load_config(path: str | Path, check_paths: bool = True) -> TrainConfig:
    """Reads a YAML training config (and the configs it ``extends``).

    Args:
        path: the YAML file.
        check_paths: also check that the data exists (or can be synthesised).
    """
    path = Path(path)
    values = read_values(path)
    try:
        return config_from_dict(values, check_paths=check_paths)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
