"""A subject from its photos with the hypernetwork: predict its LoRA, optionally fine-tune it, write the folder.

The result folder is what `pimg train lora` writes (`pytorch_lora_weights.safetensors` in the diffusers
layout, `lora_kohya.safetensors`, a model card and `config.json`), so the subject works everywhere a LoRA
does: `pimg generate --lora`, the demo's subject store, `pimg compose`, `pimg eval`. With
`finetune_steps`, the prediction is the starting point of a short `pimg train lora` run (HyperDreamBooth's
"rank-relaxed fast fine-tuning": the LoRA trainer's rank is higher than the prediction's; the predicted
rank-r factors fill the first r ranks and the rest start at zero).

Example:
    >>> personalize("my_photos/", "out/subject", base="tiny")           # about a second on tiny
    >>> personalize("my_photos/", "out/subject", base="tiny", finetune_steps=40)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pimg.errors import InputError, ModelLoadError
from pimg.methods import LORA_FILE


def default_hypernet(base: str) -> Path:
    """The hypernetwork shipped for a built-in base (`tiny`'s is `pimg/assets/tiny_hypernet`)."""
    from pimg.models import BUILTIN_MODELS

    if base not in BUILTIN_MODELS:
        raise InputError(
            f"no hypernetwork ships for {base!r}; train one (`pimg train hypernet --base {base} --config "
            "configs/hypernet_sd15.yaml`) and pass its folder."
        )
    folder = BUILTIN_MODELS[base].folder.parent / f"{base}_hypernet"
    if not folder.is_dir():
        raise ModelLoadError(f"the hypernetwork shipped for {base} is missing at {folder}; reinstall pimg.")
    return folder


def personalize(
    photos,
    out_dir: str | Path,
    *,
    base: str = "tiny",
    model: str | Path | None = None,
    finetune_steps: int = 0,
    class_noun: str = "",
    pipe=None,
) -> Path:
    """Predict a subject's LoRA from its photos and write it as a LoRA result folder.

    Args:
        photos: the subject's photos (a folder, paths, or uint8 arrays); 1 to N.
        out_dir: the result folder.
        base: the base the hypernetwork is for.
        model: the hypernetwork folder; None: the one shipped for `base`.
        finetune_steps: continue from the prediction with this many LoRA training steps (0: none).
        class_noun: the subject's class noun, for the fine-tune's captions and the model card.
        pipe: a loaded diffusers pipeline of `base` to reuse (None: loaded here).

    Returns:
        `out_dir`; its `config.json` records the prediction and fine-tune times.
    """
    from pimg.hypernets.lidb import save_lidb_lora
    from pimg.hypernets.model import Hypernetwork
    from pimg.inference.parts import pipeline_components
    from pimg.photos import photo_inputs

    if finetune_steps < 0:
        raise InputError(f"finetune_steps must be >= 0, got {finetune_steps}.")
    photos, names = photo_inputs(photos)
    began = time.perf_counter()
    if pipe is None:
        from pimg.models import load_base

        pipe = load_base(base)
    folder = Path(model) if model is not None else default_hypernet(base)
    hypernet = Hypernetwork.load(folder, pipe.unet)
    loaded = time.perf_counter()
    factors = hypernet.predict(photos)
    predicted = time.perf_counter()
    record = hypernet.record
    token = record.get("token", "sks")
    out = Path(out_dir)
    save_lidb_lora(
        out,
        hypernet.space,
        factors,
        pipeline_components(pipe),
        {"pimg.method": "hypernet", "pimg.base": base, "pimg.token": token, "pimg.hypernet": str(folder)},
    )
    summary = {
        "method": "hypernet",
        "base": base,
        "hypernet": str(folder.resolve()),
        "photos": len(names),
        # what `pimg.inference.guidance` reads: the word the LoRA is bound to and its guidance
        "token": token,
        "class_noun": class_noun,
        "guidance_scale": record.get("guidance_scale", 1.0),
        "load_seconds": loaded - began,
        "predict_seconds": predicted - loaded,
        "finetune_steps": int(finetune_steps),
    }
    if finetune_steps:
        summary["finetune_seconds"] = finetune(out, photos, base, token, class_noun, finetune_steps)
    _write_card(out, summary)
    (out / "config.json").write_text(json.dumps(summary, indent=2))
    return out


def finetune(out: Path, photos, base: str, token: str, class_noun: str, steps: int) -> float:
    """`pimg train lora` for `steps` steps from the LoRA in `out` (rank relaxed); returns its seconds."""
    import shutil
    import tempfile

    import numpy as np

    from pimg.embedders import pil_images
    from pimg.methods import builtin_preset
    from pimg.photos import save_photos
    from pimg.trainers.personalize import load_train_config, train

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pimg-finetune-") as scratch:
        scratch = Path(scratch)
        save_photos(scratch / "photos", [np.asarray(p) for p in pil_images(photos)], None)
        config = load_train_config(
            "lora",
            builtin_preset("lora", base),
            {
                "base": base,
                "photos": str(scratch / "photos"),
                "class_noun": class_noun or "subject",
                "token": token,
                # The hypernetwork learned under captions naming the background; a fine-tune on bare
                # "a sks star" would teach the word the photos' backgrounds (fidelity falls below the
                # prediction's, docs/experiments/hypernet_tiny.md).
                "auto_caption": True,
                "init_lora": str(out / LORA_FILE),
                "out_dir": str(scratch / "result"),
                "loop.steps": steps,
                "loop.sample_every": 0,
                "sample_prompts": [],
            },
        )
        train("lora", config, progress=False)
        for name in (LORA_FILE, "lora_kohya.safetensors"):
            shutil.copyfile(scratch / "result" / name, out / name)
    return time.perf_counter() - began


def _write_card(out: Path, summary: dict) -> None:
    token, base = summary["token"], summary["base"]
    noun = summary["class_noun"] or "<class noun>"
    tuned = f", then fine-tuned {summary['finetune_steps']} steps" if summary["finetune_steps"] else ""
    (out / "README.md").write_text(
        f"# Subject predicted by a hypernetwork\n\nFrom {summary['photos']} photo(s) with `{summary['hypernet']}`{tuned}, "
        f"for `{base}`. An ordinary LoRA:\n\n```python\n"
        f'pipe.load_lora_weights("{out}", adapter_name="subject")\n'
        f'image = pipe("a {token} {noun} on a green background").images[0]\n```\n\n'
        f'pimg: `pimg generate --base {base} --lora {out} --prompt "a {token} {noun} on a green background"`; '
        f"kohya/ComfyUI: `lora_kohya.safetensors`.\n"
    )


def hypernet_parts(folder: Path, *, scale: float = 1.0, name: str | None = None, token: str | None = None):
    """A folder `personalize` wrote -> its LoRA part; a hypernetwork folder -> a clear error."""
    from pimg.inference.parts import LoraPart

    folder = Path(folder)
    if not (folder / LORA_FILE).is_file():
        raise InputError(
            f"{folder} is a hypernetwork, not a subject: predict one first, e.g. `pimg hypernet predict "
            f"--hypernet {folder} --photos my_photos/ --out out/subject`."
        )
    return [LoraPart(folder / LORA_FILE, scale=scale, name=name)]
