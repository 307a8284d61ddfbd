"""`pimg train {dreambooth,lora,ti}`: one entry point over the subject methods.

The registry is a plain dict of method name -> (module, config class, method class), imported only
when that method is used. Config = dataclass defaults <- YAML file <- command-line flags, validated
into the method's own config class (unknown keys fail with the nearest valid key).

Example:
    >>> config = load_train_config("lora", "configs/lora_tiny.yaml", {"photos": "photos/", "class_noun": "star"})
    >>> train("lora", config)
    PosixPath('out/train')
"""

from __future__ import annotations

import importlib
from pathlib import Path

from pimg.config import load_config
from pimg.errors import InputError
from pimg.trainers.subject_training import config_record

#: Method name -> (module under pimg.trainers, config class, method class).
METHODS: dict[str, tuple[str, str, str]] = {
    "dreambooth": ("dreambooth", "DreamBoothConfig", "DreamBoothMethod"),
    "lora": ("lora", "LoraTrainConfig", "LoraMethod"),
    "ti": ("ti", "TiTrainConfig", "TextualInversionMethod"),
}

#: The method presets; `configs/<method>_<built-in base>.yaml` is the tuned preset of a built-in base.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def list_methods() -> list[str]:
    """The names `train` accepts."""
    return list(METHODS)


def method_classes(method: str) -> tuple[type, type]:
    """(config class, method class) of a registered method."""
    if method not in METHODS:
        raise InputError(f"unknown training method {method!r}; the methods are {', '.join(METHODS)}.")
    module_name, config_name, method_name = METHODS[method]
    module = importlib.import_module(f"pimg.trainers.{module_name}")
    return getattr(module, config_name), getattr(module, method_name)


def builtin_preset(method: str, base: str) -> Path | None:
    """`configs/<method>_<base>.yaml` when `base` is a built-in model with a preset for `method`.

    Front ends that train without asking for a YAML (the demo) start from it, so a subject trained
    there gets the settings the toy evaluation measured, not the dataclass defaults. Presets sit
    beside the code in a source checkout; an installed wheel has none and gets None.
    """
    from pimg.models import BUILTIN_MODELS

    path = CONFIGS / f"{method}_{base}.yaml"
    return path if base in BUILTIN_MODELS and path.is_file() else None


def load_train_config(method: str, path: str | Path | None = None, overrides: dict | None = None):
    """The method's config: defaults <- YAML `path` <- dotted `overrides` (None values: not given)."""
    config_cls, _ = method_classes(method)
    return load_config(config_cls, path, overrides)


def train(method: str, config, *, resume: bool = False, progress: bool = True) -> Path:
    """Train `method` with `config` on the shared loop; returns the output folder.

    Args:
        method: one of `list_methods()`.
        config: that method's config (see `load_train_config`).
        resume: continue from the newest checkpoint in `config.out_dir`.
        progress: show the progress bar.

    Returns:
        `config.out_dir`, holding the result, README.md, config.json, samples/, checkpoints/ and logs/.
    """
    from pimg.trainers.loop import latest_checkpoint, run_training

    config_cls, method_cls = method_classes(method)
    if not isinstance(config, config_cls):
        raise InputError(f"train({method!r}) needs a {config_cls.__name__}, got {type(config).__name__}.")
    out = Path(config.out_dir)
    if not resume and latest_checkpoint(out) is not None:
        raise InputError(
            f"{out} already holds a training run (checkpoints/); pass --resume to continue it, or choose "
            "another --out."
        )
    run_training(
        method_cls(config),
        config.loop,
        out,
        resume=resume,
        resolved_config=config_record(config),
        progress=progress,
    )
    return out
