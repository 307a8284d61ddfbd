"""The one rule for classifier-free guidance when the user gives none.

Given a value, it is used. Otherwise the lowest guidance that the loaded subjects' trainings recorded
for their results (and the base's, when the base is itself a trained result such as a DreamBooth
folder), else the base's own recommendation (`pimg.models.recommended_guidance`). Every front end
(`pimg generate`, the demo, the bench, the toy evaluations) calls `choose_guidance`, so a subject is
sampled alike from any of them.

Why the lowest: a subject loses fidelity above its own recommendation (on `tiny`, a LoRA measured
0.78 at guidance 1 and 0.61 at 5), so the lowest keeps every subject at or below its own.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

from pimg.errors import InputError

#: Keys of the `config.json` a pimg subject training writes beside its result.
_SUBJECT_RECORD_KEYS = {"token", "class_noun", "guidance_scale"}


def recorded_guidance(path: str | Path) -> float | None:
    """The guidance a pimg subject training recorded for its result, or None.

    `path` is a training output folder or a file inside one; the value is `guidance_scale` of the
    `config.json` training wrote beside it. Files from elsewhere (no such config) give None.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    try:
        record = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    # Only a subject training's config: a diffusers model folder has its own config.json.
    if not isinstance(record, dict) or not _SUBJECT_RECORD_KEYS <= record.keys():
        return None
    value = record["guidance_scale"]
    return float(value) if isinstance(value, int | float) else None


def choose_guidance(
    base: str, subjects: Iterable[str | Path] = (), given: float | None = None
) -> tuple[float, str]:
    """(guidance, where it comes from) for a generation on `base` with `subjects` loaded.

    Args:
        base: the base model as given to `load_base`.
        subjects: the loaded subjects' result folders or files.
        given: the user's value, or None.

    Example:
        >>> choose_guidance("tiny", ["out/sks"])
        (1.0, 'recorded by out/sks')
    """
    from pimg.models import BUILTIN_MODELS, is_toy_model_folder, recommended_guidance

    if given is not None:
        if not isinstance(given, int | float) or not math.isfinite(given) or given < 0:
            raise InputError(f"guidance must be a finite number >= 0, got {given!r}.")
        return float(given), "given"
    sources = list(subjects) + ([base] if Path(base).is_dir() else [])
    recorded = [(value, str(path)) for path in sources if (value := recorded_guidance(path)) is not None]
    if recorded:
        value, path = min(recorded)
        return value, f"recorded by {path}"
    value = recommended_guidance(base)
    if base in BUILTIN_MODELS:
        return value, f"{base}'s recommendation"
    if is_toy_model_folder(base):
        return value, "tiny's recommendation, for a toy-world model folder"
    return value, "the Stable Diffusion default"
