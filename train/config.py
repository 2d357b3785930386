"""Training configuration read from YAML, validated by the classes that use it.

A config file has four sections and one top-level key::

    method: gated      # gated | single_lora | per_level | gated_from_experts
    model: {...}       # MoeEmpathyConfig keyword arguments, plus the base (BaseSection)
    data: {...}        # DataSection
    training: {...}    # TrainingArguments keyword arguments, plus our extras (TrainingExtras)

The ``model`` and ``training`` sections mirror nothing by hand: their fields are generated
from ``MoeEmpathyConfig`` and ``transformers.TrainingArguments`` (names, types, defaults),
and :meth:`TrainConfig.validate` builds both to check the values. Our defaults differ from
those classes' only where :data:`MODEL_DEFAULTS` and :data:`TRAINING_DEFAULTS` say so.

``extends: OTHER.yaml`` (a path relative to the file) starts from another config and
overrides only the keys given, section by section.

Unknown keys, values of the wrong type, values those classes refuse and a data path that
neither exists nor can be synthesised are errors (:class:`ConfigError`) whose message names
the key and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, LlamaConfig, PretrainedConfig, TrainingArguments

from moe_empathy.base import DEFAULT_BASE_ID
from moe_empathy.base import default_cache_dir as default_base_dir
from moe_empathy.configuration_moe_empathy import DEFAULT_EXPERT_NAMES, DEFAULT_TARGET_MODULES, MoeEmpathyConfig

METHODS = ("gated", "single_lora", "per_level", "gated_from_experts")
TINY_BASE = "tiny"
# Keys of the step budget: the only ones a resumed run may change (the config has no epochs key).
BUDGET_KEYS = ("training.max_steps",)
BATCHING = ("bucket", "pad")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
PREFIX_CACHE_MODES = ("auto", "on", "off")
PREFIX_CACHE_DTYPES = ("float32", "bfloat16", "float16")
GATED_METHODS = ("gated", "gated_from_experts")

# MoeEmpathyConfig fields that come from the base and its tokenizer, not from the YAML.
MODEL_FROM_BASE = ("text_config", "user_turn_marker", "assistant_turn_marker", "base_model_name_or_path", "tie_word_embeddings")
# Defaults of the model section where MoeEmpathyConfig's field default is None and filled in later.
MODEL_DEFAULTS = {"expert_names": DEFAULT_EXPERT_NAMES, "target_modules": DEFAULT_TARGET_MODULES}
# TrainingArguments that the pipeline sets itself, and what to set instead.
SET_BY_TRAINER = {
    "bf16": "set training.mixed_precision instead",
    "fp16": "set training.mixed_precision instead",
    "use_cpu": "a run uses CUDA when there is a device, else the CPU",
    "disable_tqdm": "set training.progress_bar instead",
    "remove_unused_columns": "every column of the collated batches is a model input",
}
# Our defaults of TrainingArguments fields (the rest keep TrainingArguments' own).
TRAINING_DEFAULTS = {
    "output_dir": "runs/moe-empathy",
    "seed": 0,
    "max_steps": 100,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "learning_rate": 1e-3,
    "warmup_steps": 0.05,  # below 1: a share of max_steps
    "lr_scheduler_type": "cosine",
    "logging_steps": 10,
    "eval_strategy": "steps",
    "eval_steps": 50,
    "save_strategy": "steps",
    "save_steps": None,  # None: eval_steps, so that the best checkpoint can be kept
    "save_total_limit": 2,
    "metric_for_best_model": "eval_loss",
    "greater_is_better": False,
    "average_tokens_across_devices": True,
    "ddp_find_unused_parameters": False,
    "report_to": "none",
}


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

    def llama_config(self, vocab_size: int = 49152) -> LlamaConfig:
        """The Llama configuration of this shape (tied embeddings, like SmolLM2).

        Args:
            vocab_size: the tokenizer's vocabulary size.
        """
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            vocab_size=vocab_size,
            tie_word_embeddings=True,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=2,
            max_position_embeddings=2048,
        )


@dataclass
class BaseSection:
    """The keys of the ``model`` section that are not ``MoeEmpathyConfig``'s: the base and where experts start."""

    base: str = field(
        default=DEFAULT_BASE_ID,
        metadata={"help": "the embedded default base's id, a local model folder, or 'tiny' (random Llama)"},
    )
    tokenizer: str | None = field(
        default=None, metadata={"help": "tokenizer folder; default: the base's (the default base's for 'tiny')"}
    )
    tiny: TinyBaseSection = field(default_factory=TinyBaseSection, metadata={"help": "shape of the 'tiny' base"})
    init_from_experts: str | None = field(
        default=None,
        metadata={"help": "gated_from_experts: folder with one peft adapter sub-folder per expert name"},
    )


@dataclass
class TrainingExtras:
    """The keys of the ``training`` section that are not ``TrainingArguments``'."""

    mixed_precision: str = field(default="auto", metadata={"help": "'auto' (bf16 on GPU, fp32 on CPU), 'no', 'bf16', 'fp16'"})
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


def _fields_of(cls: type, names: list[str], defaults: dict) -> list[tuple[str, object, dataclasses.Field]]:
    """``make_dataclass`` fields copying the fields ``names`` of the dataclass ``cls``: their types,
    defaults (``defaults`` replaces some; a None there makes the type optional) and help texts.

    Args:
        cls: a dataclass (``MoeEmpathyConfig`` or ``TrainingArguments``).
        names: the fields to copy.
        defaults: our defaults by name.
    """
    hints = typing.get_type_hints(cls, localns={"torch": torch})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    copied = []
    for name in names:
        hint, source = hints[name], fields[name]
        if name in defaults:
            default = defaults[name]
            hint = hint | None if default is None else hint
        else:
            default = source.default if source.default is not dataclasses.MISSING else source.default_factory()
        copied.append((name, hint, field(default_factory=functools.partial(copy.deepcopy, default), metadata=source.metadata)))
    return copied


ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    _fields_of(MoeEmpathyConfig, [n for n in MoeEmpathyConfig.__annotations__ if n not in MODEL_FROM_BASE], MODEL_DEFAULTS),
    bases=(BaseSection,),
)
ModelSection.__doc__ = """The ``model`` section: the base (:class:`BaseSection`) and the ``MoeEmpathyConfig`` keyword
arguments of the experts and gate put into it (all its own fields but :data:`MODEL_FROM_BASE`)."""

TrainingSection = dataclasses.make_dataclass(
    "TrainingSection",
    _fields_of(
        TrainingArguments,
        [f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_") and f.name not in SET_BY_TRAINER],
        TRAINING_DEFAULTS,
    ),
    bases=(TrainingExtras,),
)
TrainingSection.__doc__ = """The ``training`` section: :class:`TrainingExtras` and the ``TrainingArguments`` keyword
arguments (all but :data:`SET_BY_TRAINER`; defaults as :data:`TRAINING_DEFAULTS` says)."""


def model_config_kwargs(model: ModelSection) -> dict:
    """The ``MoeEmpathyConfig`` keyword arguments of a model section.

    Args:
        model: the section.
    """
    ours = {f.name for f in dataclasses.fields(BaseSection)}
    return {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.name not in ours}


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
    hints = typing.get_type_hints(cls, localns={"torch": torch})
    known = {f.name for f in dataclasses.fields(cls)}
    if cls is TrainingSection:
        for name in sorted(set(values) & set(SET_BY_TRAINER)):
            raise ConfigError(f"training.{name} is set by the trainer: {SET_BY_TRAINER[name]}")
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"in {prefix}" if prefix else "at the top level"
        close = sorted({m for name in unknown for m in difflib.get_close_matches(name, known, n=3)})
        hint = f"did you mean {close}? " if close else ""
        if cls is TrainingSection:  # too many to list
            extras = sorted(f.name for f in dataclasses.fields(TrainingExtras))
            allowed = f"allowed: the keyword arguments of transformers.TrainingArguments and {extras}"
        else:
            allowed = f"allowed: {sorted(known)}"
        raise ConfigError(f"unknown key(s) {unknown} {where}; {hint}{allowed}")
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
