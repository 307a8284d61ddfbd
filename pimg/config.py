"""YAML files and CLI flags -> typed, validated config dataclasses.

Config files are short diffs from the dataclass defaults. Unknown keys are errors that name the
nearest valid key, so a typo never silently trains with a default. A bad value is blamed on where it
came from: the YAML file, or the override and the flag that gave it (`sources`), never the file for a
value the command line gave.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pimg.errors import InputError, did_you_mean

T = TypeVar("T")

#: The seed that asks for a random one (`pimg train --seed -1`, `pimg generate --seed -1`).
RANDOM_SEED = -1


def resolve_seed(seed: int) -> int:
    """`seed`, or a fresh random non-negative one for `RANDOM_SEED` (-1), to record and reuse.

    Example:
        >>> resolve_seed(7), 0 <= resolve_seed(-1) < 2**31
        (7, True)
    """
    import os
    import secrets

    if seed != RANDOM_SEED:
        return seed
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Each process would draw its own seed, and so its own batches and noise: one run needs one seed.
        raise InputError(
            "--seed -1 cannot be used under a launcher with several processes (each would draw its own "
            "seed); give the seed itself, e.g. --seed 1234."
        )
    return secrets.randbelow(2**31)


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
    if origin in (tuple, list):
        return origin(_string_list(value, where) if isinstance(value, str) else value)
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


def _string_list(text: str, where: str) -> list:
    """A list given as one string (`--set`): `a,b` or YAML's `[a, b]`, which users copy from a preset."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        try:
            items = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"{where}: {text!r} is not a YAML list ({exc}); or write a,b,c.") from exc
        return [str(item) for item in items]
    return [v.strip() for v in text.split(",") if v.strip()]


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from a (possibly nested) dict; unknown keys raise with the nearest match.

    Example:
        >>> from_dict(LoopConfig, {"steps": 10})
    """
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        key = unknown[0]
        hint = did_you_mean(key, types_)
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


def load_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    sources: dict[str, str] | None = None,
) -> T:
    """Defaults <- YAML file <- dotted overrides (CLI flags), validated into `cls`.

    An error names where the bad value came from: the YAML file, or the override itself (its key and,
    with `sources`, the flag that gave it), never the file for a value the command line gave.

    Args:
        cls: the config dataclass.
        path: optional YAML file (a short diff from the defaults).
        overrides: dotted keys from the command line; None values mean "not given".
        sources: how each override was given, for messages, e.g. {"loop.steps": "--set loop.steps=abc",
            "rank": "--rank 4"}; keys left out are called "the override KEY=VALUE".

    Example:
        >>> load_config(LoraTrainConfig, "configs/lora_tiny.yaml", {"rank": "x"}, {"rank": "--set rank=x"})
        InputError: --set rank=x: rank must be int, got 'x'.
    """
    data = read_yaml(path)
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    labels = {k: (sources or {}).get(k) or f"the override {k}={v!r}" for k, v in given.items()}
    for key, value in given.items():
        check_override(cls, key, value, labels[key])
    where = Path(path).name if path else "config"
    # Nested dataclass fields that the file leaves out keep their defaults, merged field by field.
    defaults = dataclasses.asdict(cls())
    try:
        return from_dict(cls, merge(defaults, merge(data, dotted_to_nested(given))), where=where)
    except InputError as exc:
        raise _blame(cls, merge(defaults, data), given, labels, where, exc) from None


def read_yaml(path: str | Path | None) -> dict:
    """The mapping a YAML config file holds ({} for no file); an InputError naming the file otherwise."""
    if path is None:
        return {}
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
    return data


def check_override(cls: type, key: str, value: Any, label: str) -> Any:
    """`value` coerced to the type of dotted `key` in `cls`; an InputError that starts with `label`
    (how the value was given, e.g. "--set loop.steps=abc") for an unknown key or a value of the wrong type.

    Example:
        >>> check_override(LoraTrainConfig, "loop.steps", "12", "--set loop.steps=12")
        12
    """
    node, parts = cls, key.split(".")
    for depth, part in enumerate(parts):
        types_ = _field_types(node)
        if part not in types_:
            hint = did_you_mean(part, types_, prefix="".join(f"{p}." for p in parts[:depth]))
            scope = f" in {'.'.join(parts[:depth])}" if depth else ""
            raise InputError(
                f"{label}: unknown key {part!r}{scope}.{hint} Valid keys{scope}: {', '.join(types_)}."
            )
        annotation = types_[part]
        if depth < len(parts) - 1:
            if not dataclasses.is_dataclass(annotation):
                raise InputError(
                    f"{label}: {'.'.join(parts[: depth + 1])} is one setting, not a group of settings."
                )
            node = annotation
    return _coerce(value, annotation, f"{label}: {key}")


def _blame(cls: type, base: dict, given: dict, labels: dict, where: str, error: InputError) -> InputError:
    """The error of a config that failed a check across fields (`__post_init__`), blamed on its source:
    the YAML when it fails without the overrides, else the first override that fails on its own."""
    try:
        from_dict(cls, base, where=where)
    except InputError:
        return error
    for key, value in given.items():
        try:
            from_dict(cls, merge(base, dotted_to_nested({key: value})), where=where)
        except InputError as alone:
            return InputError(f"{labels[key]}: {alone}")
    return InputError(f"{error} (with {', '.join(labels.values())} on top of {where})")
