"""`pimg train METHOD`: one entry point over the registered subject methods (`pimg.methods`).

Config = the method's dataclass defaults <- YAML file (a path, or an installed preset's name; with
none, the base's preset when it is a built-in with one) <- command-line flags, validated into the
method's own config class (unknown keys fail with the nearest valid key).

Example:
    >>> config = load_train_config("lora", None, {"photos": "photos/", "class_noun": "star"})
    >>> train("lora", config)
    PosixPath('out/train')
"""

from __future__ import annotations

from pathlib import Path

from pimg.config import load_config
from pimg.errors import InputError
from pimg.methods import builtin_preset, get_method, preset_path


def resolve_preset(method: str, path: str | Path | None, base: str | None) -> Path | None:
    """The YAML to start from: `path` as given (a file, or an installed preset's name); with none,
    the preset of `base` when it is a built-in model that has one (`builtin_preset`)."""
    if path is not None:
        given = Path(path)
        if given.is_file():
            return given
        if given.parent == Path(".") and not given.exists():
            return preset_path(str(given))  # a preset's name: "lora_tiny" or "lora_tiny.yaml"
        raise InputError(f"--config {path} does not exist; pass a YAML file or a preset name.")
    return builtin_preset(method, base or _default_base(method))


def _default_base(method: str) -> str:
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(get_method(method).config_class())}
    return fields["base"].default if "base" in fields else ""


def load_train_config(method: str, path: str | Path | None = None, overrides: dict | None = None):
    """The method's config: defaults <- YAML (see `resolve_preset`) <- dotted `overrides` (None: not given).

    With no `path`, a built-in base's preset is used (see `resolve_preset`), so `pimg train lora
    --base tiny` trains with the settings `pimg eval toysubject` measured, not the bare defaults.
    """
    overrides = overrides or {}
    preset = resolve_preset(method, path, overrides.get("base"))
    return load_config(get_method(method).config_class(), preset, overrides)


def train(method: str, config, *, resume: bool = False, progress: bool = True) -> Path:
    """Train `method` with `config` on the shared loop; returns the output folder.

    Args:
        method: a registered method's name (`pimg.methods.list_methods()`).
        config: that method's config (see `load_train_config`).
        resume: continue from the newest checkpoint in `config.out_dir`.
        progress: show the progress bar.

    Returns:
        `config.out_dir`, holding the result, README.md, config.json, samples/, checkpoints/ and logs/.
    """
    from pimg.trainers.loop import latest_checkpoint, run_training

    entry = get_method(method)
    config_cls = entry.config_class()
    if not isinstance(config, config_cls):
        raise InputError(f"train({method!r}) needs a {config_cls.__name__}, got {type(config).__name__}.")
    out = Path(config.out_dir)
    if not resume and latest_checkpoint(out) is not None:
        raise InputError(
            f"{out} already holds a training run (checkpoints/); pass --resume to continue it, or choose "
            "another --out."
        )
    run_training(
        entry.trainer_class()(config),
        config.loop,
        out,
        resume=resume,
        resolved_config=result_record(entry.name, config),
        progress=progress,
    )
    return out


def result_record(method: str, config) -> dict:
    """What `config.json` beside a result holds: the method's name (so `pimg.methods.load_result`
    knows what wrote the folder) and the full resolved config."""
    from pimg.trainers.subject_training import config_record

    return {"method": method, **config_record(config)}
