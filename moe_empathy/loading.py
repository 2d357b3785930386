"""Finding and loading a gated model with its tokenizer (the shipped checkpoint by default)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .base import load_base_tokenizer, load_default_base
from .modeling_moe_empathy import MoeEmpathyForCausalLM

SHIPPED_CHECKPOINT = "moe-empathy-smollm2"


def shipped_checkpoint() -> Path | None:
    """The default checkpoint shipped in the source tree's ``checkpoints/``, if present."""
    path = Path(__file__).resolve().parent.parent / "checkpoints" / SHIPPED_CHECKPOINT
    return path if (path / "config.json").is_file() else None


def load_model_and_tokenizer(path: str | Path | None = None) -> tuple[MoeEmpathyForCausalLM, PreTrainedTokenizerBase, str]:
    """Loads a gated model folder, or the shipped default, with its tokenizer.

    Args:
        path: a folder written by ``save_pretrained`` (full or compact); None for the shipped
            checkpoint, or, when none ships, the default base wrapped with fresh experts.

    Returns:
        ``(model, tokenizer, description)`` with the model in eval mode.
    """
    if path is None:
        path = shipped_checkpoint()
        if path is None:
            base, tokenizer = load_default_base()
            model = MoeEmpathyForCausalLM.from_base(base, tokenizer=tokenizer)
            return model.eval(), tokenizer, "default base with fresh (untrained) experts"
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json); pass a folder written by save_pretrained")
    model = MoeEmpathyForCausalLM.from_pretrained(path)
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif model.config.base_model_name_or_path:
        tokenizer = load_base_tokenizer(model.config.base_model_name_or_path)
    else:
        raise FileNotFoundError(f"{path} has no tokenizer and its config names no base model; save the tokenizer beside the model")
    return model.eval(), tokenizer, str(path)
