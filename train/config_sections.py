"""The sections of a training config (:mod:`.config`): their fields, defaults and help texts.

The ``model`` and ``training`` sections mirror nothing by hand: :class:`ModelSection`'s fields
are generated from ``MoeEmpathyConfig``'s and :class:`TrainingSection`'s from
``transformers.TrainingArguments``' (names, types, defaults, help), plus our own keys
(:class:`BaseSection`, :class:`TrainingExtras`). Our defaults differ from those classes' only
where :data:`MODEL_DEFAULTS` and :data:`TRAINING_DEFAULTS` say so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import LlamaConfig, TrainingArguments

from moe_empathy.base import DEFAULT_BASE_ID
from moe_empathy.configuration_moe_empathy import DEFAULT_EXPERT_NAMES, DEFAULT_TARGET_MODULES, MoeEmpathyConfig

from .config_yaml import copied_fields

METHODS = ("gated", "single_lora", "per_level", "gated_from_experts")
TINY_BASE = "tiny"
BATCHING = ("bucket", "pad")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
SYNTH_BACKENDS = ("template", "grounded")  # data.synthesize.backend (the llm backend is the `synth` command's alone)
PREFIX_CACHE_MODES = ("auto", "on", "off")
PREFIX_CACHE_DTYPES = ("float32", "bfloat16", "float16")
GATED_METHODS = ("gated", "gated_from_experts")
CONTEXT_REPLIES = ("scripted", "shuffled")  # gate_warmup.context_replies

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
    label_routing: float = field(
        default=0.0,
        metadata={
            "help": "gated models: each labelled turn is routed label_routing x its labelled expert + the rest x "
            "the gate's mixture (1 = hard routing by label, which trains the experts apart; 0 = the gate's own)"
        },
    )
    freeze_gate: bool = field(
        default=False, metadata={"help": "gated models: keep the gate as it starts (e.g. after gate_warmup) and train the experts only"}
    )


ModelSection = dataclasses.make_dataclass(
    "ModelSection",
    copied_fields(MoeEmpathyConfig, [n for n in MoeEmpathyConfig.__annotations__ if n not in MODEL_FROM_BASE], MODEL_DEFAULTS),
    bases=(BaseSection,),
)
ModelSection.__doc__ = """The ``model`` section: the base (:class:`BaseSection`) and the ``MoeEmpathyConfig`` keyword
arguments of the experts and gate put into it (all its own fields but :data:`MODEL_FROM_BASE`)."""

TrainingSection = dataclasses.make_dataclass(
    "TrainingSection",
    copied_fields(
        TrainingArguments,
        [f.name for f in dataclasses.fields(TrainingArguments) if f.init and not f.name.startswith("_") and f.name not in SET_BY_TRAINER],
        TRAINING_DEFAULTS,
    ),
    bases=(TrainingExtras,),
)
TrainingSection.__doc__ = """The ``training`` section: :class:`TrainingExtras` and the ``TrainingArguments`` keyword
arguments (all but :data:`SET_BY_TRAINER`; defaults as :data:`TRAINING_DEFAULTS` says)."""
# How :func:`.config_yaml.build` words its errors for this section (too many keys to list).
TrainingSection.refused_keys = SET_BY_TRAINER
TrainingSection.allowed_keys = (
    f"the keyword arguments of transformers.TrainingArguments and {sorted(f.name for f in dataclasses.fields(TrainingExtras))}"
)


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
    off_level_rate: float = field(
        default=0.0,
        metadata={"help": "chance that a reply is written and labelled at another level than the user's state calls "
                  "for, so that each expert learns its level after every kind of message; an expert corpus only "
                  "(the gate must be frozen, and the gate warm-up's corpus keeps 0)"},
    )
    backend: str = field(
        default="template",
        metadata={"help": "'template' (phrase data, seconds) or 'grounded' (the phrase data's empathy around the base "
                  "model's own helpful content: the base answers every turn once, slow on a CPU; resumable)"},
    )


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
    balance_levels: bool = field(
        default=False,
        metadata={"help": "training split: cap each (task, level)'s LM-labelled turns at the median task's count for "
                  "that level, so that no task's content dominates an expert (the turns over the cap stay in the context)"},
    )
    max_eval_dialogues: int | None = field(default=None, metadata={"help": "validation dialogues used per evaluation"})
    batching: str = field(
        default="bucket", metadata={"help": "'bucket' (similar lengths batched together) or 'pad' (random order)"}
    )
    bucket_size: int = field(
        default=32, metadata={"help": "global batches per bucket when sorting by length ('bucket' batching)"}
    )


@dataclass
class GateWarmupSection:
    """Training the gate alone before the joint run (:mod:`.gate_warmup`): on its pooled turn
    features of a corpus of long dialogues, computed once through the frozen layers below
    ``gate_layer``."""

    data: DataSection = field(
        default_factory=DataSection, metadata={"help": "the warm-up corpus: path, synthesize, max_length, dialogue limits"}
    )
    epochs: int = field(default=40, metadata={"help": "passes over the warm-up corpus's training dialogues"})
    batch_size: int = field(default=32, metadata={"help": "dialogues per optimizer step"})
    learning_rate: float = field(default=3e-3, metadata={"help": "AdamW learning rate (cosine decay to 0)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    context_replies: str = field(
        default="scripted",
        metadata={"help": "'scripted': the corpus's replies stay in the context the gate reads; 'shuffled': each "
                  "reply is swapped for one drawn at random from the same split, so the gate learns the level from "
                  "the user's messages rather than from its earlier replies (in generation these are the model's own "
                  "and need not carry the right level)"},
    )
