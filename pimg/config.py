"""YAML files and CLI flags -> typed, validated config dataclasses.

Config files are short diffs from the dataclass defaults. Unknown keys are errors that name the
nearest valid key, so a typo never silently trains with a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pimg.errors import InputError

T = TypeVar("T")


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a YAML/CLI value into `annotation`'s type, recursing into nested dataclasses."""
    origin = typing.get_origin(annotation)
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise InputError(f"{where} must be a mapping of {annotation.__name__} fields, got {value!r}.")
        return from_dict(annotation, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where) if len(args) == 1 else value
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        return tuple(value)
    if origin is list:
        return list(value) if not isinstance(value, str) else [v.strip() for v in value.split(",")]
    if annotation is bool and isinstance(value, str):
        lowered = value.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise InputError(f"{where} must be true or false, got {value!r}.")
        return lowered in ("true", "1", "yes")
    if annotation in (int, float, str) and value is not None:
        try:
            return annotation(value)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{where} must be {annotation.__name__}, got {value!r}.") from exc
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (possibly nested) dict; unknown keys raise with the nearest match.

    Example:
        >>> from_dict(LoopConfig, {"steps": 10})
    """
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(key, list(types_), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise InputError(f"unknown key {key!r} in {where}.{hint} Valid keys: {', '.join(types_)}.")
    values = {k: _coerce(v, types_[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**values)


def merge(base: dict, override: dict) -> dict:
    """Deep-merge `override` into a copy of `base`."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def dotted_to_nested(flat: dict[str, Any]) -> dict:
    """{"unet.loop.steps": 10} -> {"unet": {"loop": {"steps": 10}}}; None values are dropped."""
    nested: dict = {}
    for key, value in flat.items():
        if value is None:
            continue
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> T:
    """Defaults <- YAML file <- dotted overrides (CLI flags), validated into `cls`.

    Args:
        cls: the config dataclass.
        path: optional YAML file (a short diff from the defaults).
        overrides: dotted keys from the command line; None values mean "not given".
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputError(
                f"config file {p} does not exist; pass a YAML file from configs/ or leave --config out."
            )
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise InputError(f"config file {p} must hold a mapping of settings, got {type(data).__name__}.")
    data = merge(data, dotted_to_nested(overrides or {}))
    # Nested dataclass fields that the file leaves out keep their defaults, merged field by field.
    defaults = dataclasses.asdict(cls())
    return from_dict(cls, merge(defaults, data), where=Path(path).name if path else "config")
