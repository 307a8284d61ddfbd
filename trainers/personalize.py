"""`pimg train METHOD`: one entry point over the registered subject methods (`pimg.methods`).

Config = the method's dataclass defaults <- YAML file (a path, or an installed preset's name; with
none, the base's preset when it is a built-in with one) <- command-line flags, validated into the
method's own config class (unknown keys fail with the nearest valid key).

A resumed run (`resume_config`) starts from the config its folder saved instead, and the flags given
again must agree with it, except for `RESUMABLE_KEYS`.

Example:
    >>> config = load_train_config("lora", None, {"photos": "photos/", "class_noun": "star"})
    >>> train("lora", config)
    PosixPath('out/train')
    >>> train("lora", resume_config("lora", "out/train", {"loop.steps": 800}), resume=True)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pimg.config import (
    check_override,
    dotted_to_nested,
    from_dict,
    load_config,
    merge,
    read_yaml,
    resolve_seed,
)
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


def load_train_config(
    method: str,
    path: str | Path | None = None,
    overrides: dict | None = None,
    sources: dict[str, str] | None = None,
):
    """The method's config: defaults <- YAML (see `resolve_preset`) <- dotted `overrides` (None: not given).

    With no `path`, a built-in base's preset is used (see `resolve_preset`), so `pimg train lora
    --base tiny` trains with the settings `pimg eval toysubject` measured, not the bare defaults.
    A seed of -1 (`loop.seed`) is replaced by a random one here, so the saved config.json records the
    seed the run used. `sources` names the flag behind each override in messages (see `load_config`).
    """
    overrides = overrides or {}
    preset = resolve_preset(method, path, overrides.get("base"))
    config = load_config(get_method(method).config_class(), preset, overrides, sources)
    config.loop.seed = resolve_seed(config.loop.seed)
    return config


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


#: What a resumed run may change: how long it trains and what it writes on the way. Everything else
#: shaped the checkpoint (its weights' shapes, the data and noise of each step, the optimizer), so it
#: must match the saved config. More `loop.steps` trains longer; under a decaying `lr_schedule` the
#: steps still to run follow the new total. `out_dir` is where the run is now (a moved folder resumes).
RESUMABLE_KEYS = (
    "out_dir",
    "loop.steps",
    "loop.checkpoint_every",
    "loop.keep_checkpoints",
    "loop.sample_every",
    "loop.log_every",
    "sample_images",
    "sample_prompts",
)
_PATH_KEYS = ("base", "photos", "class_images_dir")


def resume_config(
    method: str,
    out_dir: str | Path | None,
    overrides: dict[str, Any] | None = None,
    sources: dict[str, str] | None = None,
    config_path: str | Path | None = None,
):
    """The config to continue the run in `out_dir` with: its saved `config.json`, where `overrides`
    (and the keys of `config_path`, a YAML given again) may change only `RESUMABLE_KEYS`.

    Args:
        method: the method being resumed; must be the one that wrote `out_dir`.
        out_dir: the run's folder (`--out`).
        overrides: dotted keys given again (None values: not given); each must equal the saved value,
            except for `RESUMABLE_KEYS`, which replace it.
        sources: how each override was given (e.g. {"rank": "--rank 4"}), for messages.
        config_path: a YAML file or preset name given again; the keys it sets must agree too, except
            `RESUMABLE_KEYS`, which it does not change (flags do).

    Returns:
        The method's config, with `out_dir` set to `out_dir`.

    Example:
        >>> config = resume_config("lora", "out/sks", {"loop.steps": 800})  # train on to step 800
        >>> resume_config("lora", "out/sks", {"rank": 4}, {"rank": "--rank 4"})
        InputError: --resume: what was given again disagrees with the run's saved config
        (out/sks/config.json): rank is 8 there, 4 from --rank 4. ...
    """
    if not out_dir:
        raise InputError(
            "--resume needs --out, the folder of the run to continue: e.g. "
            f"`pimg train {method} --resume --out out/sks`."
        )
    out = Path(out_dir)
    entry = get_method(method)
    cls = entry.config_class()
    saved, record = _saved_config(entry.name, out)
    # key -> (value, how it was given). A YAML given again is checked, but its length and bookkeeping
    # keys do not apply: the first run's flags may have overridden them, and only flags change them now.
    given = {k: v for k, v in _yaml_keys(config_path, method, overrides or {}) if k not in RESUMABLE_KEYS}
    for key, value in (overrides or {}).items():
        if value is not None:
            given[key] = (value, (sources or {}).get(key) or f"{key}={value!r}")

    changes, conflicts = {"out_dir": str(out)}, []
    for key, (value, label) in given.items():
        value = check_override(cls, key, value, label)
        if key in RESUMABLE_KEYS:
            changes[key] = value
        elif not _same(key, _get(saved, key), value):
            conflicts.append((key, _get(saved, key), label, value))
    if conflicts:
        raise InputError(_conflict_message(record, conflicts))
    config = from_dict(cls, merge(dataclasses.asdict(saved), dotted_to_nested(changes)), where=str(record))
    _check_steps(out, config.loop.steps, given.get("loop.steps", (None, "its config.json"))[1])
    return config


def _saved_config(method: str, out: Path):
    """The config `out/config.json` records, checked to be `method`'s; (config, the file)."""
    record = out / "config.json"
    if not record.is_file():
        raise InputError(
            f"--resume: {out} holds no config.json, so no pimg training run to continue; check --out, "
            "or start without --resume."
        )
    try:
        data = json.loads(record.read_text())
    except ValueError as exc:
        raise InputError(f"--resume: {record} is not valid JSON ({exc}); start without --resume.") from exc
    if not isinstance(data, dict):
        raise InputError(f"--resume: {record} holds no config mapping; start without --resume.")
    recorded = data.pop("method", None)
    if recorded != method:
        hint = f"resume it with `pimg train {recorded} --resume --out {out}`" if recorded else "check --out"
        raise InputError(f"--resume: {out} holds a {recorded or 'unnamed'} run, not a {method} one; {hint}.")
    cls = get_method(method).config_class()
    return from_dict(cls, merge(dataclasses.asdict(cls()), data), where=str(record)), record


def _yaml_keys(config_path, method: str, overrides: dict):
    """(dotted key, (value, label)) for every setting of a YAML given again on resume."""
    if config_path is None:
        return
    path = resolve_preset(method, config_path, overrides.get("base"))

    def walk(node: dict, prefix: str):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                yield from walk(value, f"{dotted}.")
            else:
                yield dotted, (value, path.name)

    yield from walk(read_yaml(path), "")


def _get(config, key: str):
    for part in key.split("."):
        config = getattr(config, part)
    return config


def _same(key: str, saved, given) -> bool:
    if key in _PATH_KEYS and isinstance(saved, str) and isinstance(given, str):
        return Path(saved) == Path(given)  # "photos/" and "photos" are one folder
    return saved == given


def _conflict_message(record: Path, conflicts: list) -> str:
    each = "; ".join(
        f"{key} is {saved!r} there, {value!r} from {label}" for key, saved, label, value in conflicts
    )
    return (
        f"--resume: what was given again disagrees with the run's saved config ({record}): {each}. A "
        "resumed run continues with the settings its checkpoint was trained with: leave these out (the "
        "saved values are used), or start a new run with another --out. Only these may change on resume: "
        f"{', '.join(RESUMABLE_KEYS)}."
    )


def _check_steps(out: Path, steps: int, source: str) -> None:
    from pimg.trainers.loop import latest_checkpoint

    checkpoint = latest_checkpoint(out)
    done = int(checkpoint.name.split("_")[1]) if checkpoint is not None else 0
    if steps < done:
        raise InputError(
            f"--resume: {out} has trained {done} steps already ({checkpoint}), more than the "
            f"loop.steps={steps} of {source}; pass --steps {done} or more."
        )
