"""How YAML values become the training config's dataclasses (:mod:`.config`), with errors that
name the key and the fix.

* :func:`copied_fields`: ``make_dataclass`` fields copied from another dataclass (the sections
  that are ``MoeEmpathyConfig``'s or ``TrainingArguments``' keyword arguments).
* :func:`build`: a dataclass from nested mappings: types checked (nested dataclasses built),
  unknown keys refused with the closest known ones.
* :func:`read_values`: a YAML file's mapping with its ``extends`` chain merged
  (:func:`merge_config_values`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import field
from pathlib import Path

import torch
import yaml


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key and the fix."""


def type_hints(cls: type) -> dict[str, object]:
    """The resolved type hints of a dataclass's fields (``TrainingArguments`` names ``torch`` types)."""
    return typing.get_type_hints(cls, localns={"torch": torch})


def copied_fields(cls: type, names: list[str], defaults: dict) -> list[tuple[str, object, dataclasses.Field]]:
    """``make_dataclass`` fields copying the fields ``names`` of the dataclass ``cls``: their types,
    defaults (``defaults`` replaces some; a None there makes the type optional) and help texts.

    Args:
        cls: a dataclass (``MoeEmpathyConfig`` or ``TrainingArguments``).
        names: the fields to copy.
        defaults: our defaults by name.
    """
    hints = type_hints(cls)
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
        return build(hint, value, key)
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


def build(cls: type, values: dict, prefix: str = ""):
    """An instance of the dataclass ``cls`` from ``values``, its nested sections built too.

    A class may refine the errors through two attributes: ``refused_keys`` (name -> what to set
    instead, for fields the trainer sets itself) and ``allowed_keys`` (what the unknown-key error
    names as allowed, when the fields are too many to list).

    Args:
        cls: the dataclass.
        values: its values (a parsed YAML mapping).
        prefix: the dotted key of ``values`` in the whole config ("" at the top).
    """
    hints = type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    refused = getattr(cls, "refused_keys", {})
    for name in sorted(set(values) & set(refused)):
        raise ConfigError(f"{prefix}.{name} is set by the trainer: {refused[name]}")
    unknown = sorted(set(values) - known)
    if unknown:
        where = f"in {prefix}" if prefix else "at the top level"
        close = sorted({m for name in unknown for m in difflib.get_close_matches(name, known, n=3)})
        hint = f"did you mean {close}? " if close else ""
        allowed = getattr(cls, "allowed_keys", None) or sorted(known)
        raise ConfigError(f"unknown key(s) {unknown} {where}; {hint}allowed: {allowed}")
    kwargs = {name: _coerce(v, hints[name], f"{prefix}.{name}" if prefix else name) for name, v in values.items()}
    return cls(**kwargs)


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


def read_values(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The YAML mapping of ``path``, with its ``extends`` chain resolved (a path relative to the file,
    whose values the file's own override key by key).

    Args:
        path: the YAML file.
        seen: the files already read on the chain (to refuse a loop).
    """
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
    return merge_config_values(read_values(path.parent / str(parent), seen + (path.resolve(),)), values)
