"""Finding and loading a gated model with its tokenizer (the shipped checkpoint by default).

Without an explicit folder, the model is looked for, in this order:

1. ``$MOE_EMPATHY_CHECKPOINT`` (when set, it must name a model folder);
2. the checkpoint installed with the package (a wheel carries ``checkpoints/`` as
   ``moe_empathy/checkpoints``);
3. the source tree's ``checkpoints/`` (a checkout, or an editable install).

When none holds a model, the error lists the places looked; untrained experts are never
built silently.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .base import load_base_tokenizer
from .modeling_moe_empathy import MoeEmpathyForCausalLM

SHIPPED_CHECKPOINT = "moe-empathy-smollm2"
CHECKPOINT_ENV = "MOE_EMPATHY_CHECKPOINT"


def _is_model_folder(path: Path) -> bool:
    return (path / "config.json").is_file()


def shipped_checkpoint_places() -> list[Path]:
    """Where the shipped checkpoint may lie: installed with the package, then in the source tree."""
    package = Path(__file__).resolve().parent
    return [package / "checkpoints" / SHIPPED_CHECKPOINT, package.parent / "checkpoints" / SHIPPED_CHECKPOINT]


def shipped_checkpoint() -> Path | None:
    """The shipped checkpoint's folder (the first of :func:`shipped_checkpoint_places` holding a
    model), or None."""
    return next((path for path in shipped_checkpoint_places() if _is_model_folder(path)), None)


def default_checkpoint() -> Path:
    """The model folder used when none is given: ``$MOE_EMPATHY_CHECKPOINT``, else the shipped one.

    Raises:
        FileNotFoundError: ``$MOE_EMPATHY_CHECKPOINT`` names no model folder, or it is unset and
            no shipped checkpoint is found (the message lists where it looked).
    """
    chosen = os.environ.get(CHECKPOINT_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not _is_model_folder(path):
            raise FileNotFoundError(
                f"{CHECKPOINT_ENV}={chosen} is not a model folder (no config.json); "
                "point it at a folder written by save_pretrained or `moe-empathy train`, or unset it"
            )
        return path
    path = shipped_checkpoint()
    if path is None:
        looked = ", ".join(str(place) for place in shipped_checkpoint_places())
        raise FileNotFoundError(
            f"no model given and no shipped checkpoint found (looked in ${CHECKPOINT_ENV}, unset, then {looked}); "
            f"pass --model DIR (a folder written by save_pretrained or `moe-empathy train`) or set {CHECKPOINT_ENV}=DIR"
        )
    return path


def load_model_and_tokenizer(path: str | Path | None = None) -> tuple[MoeEmpathyForCausalLM, PreTrainedTokenizerBase, str]:
    """Loads a gated model folder, or the default one, with its tokenizer.

    Args:
        path: a folder written by ``save_pretrained`` (full or compact); None for
            :func:`default_checkpoint`.

    Returns:
        ``(model, tokenizer, description)`` with the model in eval mode.
    """
    path = default_checkpoint() if path is None else Path(path)
    if not _is_model_folder(path):
        raise FileNotFoundError(f"{path} is not a model folder (no config.json); pass a folder written by save_pretrained")
    model = MoeEmpathyForCausalLM.from_pretrained(path)
    if (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(path)
    elif model.config.base_model_name_or_path:
        tokenizer = load_base_tokenizer(model.config.base_model_name_or_path)
    else:
        raise FileNotFoundError(f"{path} has no tokenizer and its config names no base model; save the tokenizer beside the model")
    return model.eval(), tokenizer, str(path)
