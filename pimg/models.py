"""Base models: built-in names, local diffusers folders, single checkpoint files and hub ids.

One entry point, `load_base`, for the SD 1.x/2.x and SDXL families. The library default is CPU and
fp32; callers (the CLI, the demo) pick CUDA and half precision explicitly via `pick_device`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from pimg.errors import InputError, ModelLoadError

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    folder: Path
    description: str
    guidance_scale: float = 7.5  # recommended classifier-free guidance


#: Models shipped inside the package, loaded with the ordinary `from_pretrained` path.
BUILTIN_MODELS = {
    "tiny": BuiltinModel(
        "tiny",
        ASSETS / "tiny",
        "64x64 toy-world text-to-image model in the SD 1.x architecture (CPU-friendly default).",
        # `pimg eval toybase --prompts 200` at 3 against 5, held-out: two-object 81.2 vs 75.9, colour 93.8
        # vs 91.4, shape 94.5 vs 91.5, size 99.7 vs 99.1, position 100 both; seen better too. Two-object
        # (benchmarks/toybase_guidance.py, 50 other prompts): 83.8 at 2, 87.0 at 3, 84.5 at 5, 78.8 at 7.5.
        guidance_scale=3.0,
    ),
}

FAMILIES = ("sd", "sdxl")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def list_models() -> list[BuiltinModel]:
    """Built-in models, by name."""
    return list(BUILTIN_MODELS.values())


def pick_device(prefer: str | None = None) -> tuple[str, torch.dtype, str]:
    """Choose device and dtype for a front end: CUDA with bf16 (fp16 on older GPUs) when present, else CPU fp32.

    Returns:
        (device, dtype, a sentence saying what was picked and why).
    """
    if prefer not in (None, "auto"):
        if prefer.startswith("cuda") and not torch.cuda.is_available():
            raise InputError(f"--device {prefer} was asked for but no CUDA GPU is visible; use --device cpu.")
        dtype = torch.float32 if prefer == "cpu" else _cuda_dtype()
        return prefer, dtype, f"using {prefer} with {str(dtype).replace('torch.', '')} (as asked)"
    if torch.cuda.is_available():
        dtype = _cuda_dtype()
        name = torch.cuda.get_device_name(0)
        return "cuda", dtype, f"using cuda ({name}) with {str(dtype).replace('torch.', '')}"
    return "cpu", torch.float32, "using cpu with float32 (no CUDA GPU found)"


def _cuda_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def describe_base(base: str) -> tuple[str, str]:
    """Classify `base` as ("builtin" | "folder" | "file" | "hub", resolved location), or raise InputError."""
    if base in BUILTIN_MODELS:
        return "builtin", str(BUILTIN_MODELS[base].folder)
    path = Path(base).expanduser()
    if path.is_dir():
        return "folder", str(path)
    if path.suffix in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise InputError(f"checkpoint file {path} does not exist; check the path.")
        return "file", str(path)
    if _HUB_ID.match(base) and not path.exists():
        return "hub", base
    raise InputError(
        f"unknown base model {base!r}. Pass a built-in name ({', '.join(BUILTIN_MODELS)}), a local diffusers "
        "folder (with model_index.json), a single .safetensors/.ckpt checkpoint file, or a hub id like "
        "'stable-diffusion-v1-5/stable-diffusion-v1-5'."
    )


def detect_family(kind: str, location: str) -> str:
    """ "sd" or "sdxl" from a folder's model_index.json or a checkpoint's keys (hub ids: by the hub's index)."""
    if kind in ("builtin", "folder"):
        index = Path(location) / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(
                f"{location} has no model_index.json, so it is not a diffusers pipeline folder. Point --base at "
                "the folder that holds model_index.json, or at a single .safetensors checkpoint file."
            )
        class_name = json.loads(index.read_text()).get("_class_name", "")
        return "sdxl" if "XL" in class_name else "sd"
    if kind == "file":
        from pimg.formats.lora import read_safetensors

        if location.endswith(".safetensors"):
            keys = read_safetensors(location).keys()
        else:
            state = torch.load(location, map_location="cpu", weights_only=True)
            keys = state.get("state_dict", state).keys()
        return "sdxl" if any(k.startswith("conditioner.embedders.1") for k in keys) else "sd"
    return "auto"


def load_base(
    base: str,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str | None = None,
    config_folder: str | None = None,
):
    """Load a base text-to-image pipeline.

    Args:
        base: a built-in name (`tiny`), a local diffusers folder, a single `.safetensors`/`.ckpt`
            file (SD 1.x/2.x or SDXL), or a hub id.
        device: torch device; the library default is CPU.
        dtype: torch dtype; the library default is float32.
        scheduler: a name from `pimg.inference.schedulers.list_schedulers()`, or None for the model's own.
        config_folder: for single files, a local diffusers folder of the same family whose configs
            describe the checkpoint (needed offline, where diffusers cannot fetch them).
    Returns:
        A diffusers `StableDiffusionPipeline` or `StableDiffusionXLPipeline`.

    Example:
        >>> pipe = load_base("tiny")
    """
    from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    kind, location = describe_base(base)
    family = detect_family(kind, location)
    cls = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "auto": DiffusionPipeline}[
        family
    ]
    extra = {"safety_checker": None, "requires_safety_checker": False} if family == "sd" else {}
    try:
        if kind == "file":
            pipe = cls.from_single_file(location, dtype=dtype, config=config_folder, **extra)
        else:
            pipe = cls.from_pretrained(location, dtype=dtype, **extra)
    except (OSError, ValueError) as exc:
        raise _load_error(base, kind, exc) from exc
    if scheduler is not None:
        from pimg.inference.schedulers import make_scheduler

        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(device)


def _load_error(base: str, kind: str, exc: Exception) -> ModelLoadError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if kind == "hub":
        return ModelLoadError(
            f"could not get {base!r} from the model hub ({text}). This machine may have no access to the hub. "
            "Download the model where there is access (e.g. `hf download` or `git clone`) and pass its local "
            "folder with --base /path/to/folder, or a single .safetensors file."
        )
    if kind == "file":
        return ModelLoadError(
            f"could not load the checkpoint file {base!r} ({text}). diffusers needs the model's configs to read "
            "a single file; offline, pass a local diffusers folder of the same family with --config-folder."
        )
    return ModelLoadError(f"could not load the base model from {base!r} ({text}). Is the folder complete?")


@torch.no_grad()
def weights_fingerprint(*modules: torch.nn.Module, samples: int = 16) -> str:
    """A short hash of what these modules' weights are, to key caches made with a base.

    A base's name alone is not enough: retraining `tiny`, or replacing a local folder, keeps the name
    but changes what the base generates. Each parameter contributes its name, shape, sum and a few
    evenly spaced values, so the cost stays at a few reductions even for an SDXL UNet.
    """
    import hashlib

    digest = hashlib.sha256()
    for module in modules:
        for name, param in module.state_dict().items():
            flat = param.detach().reshape(-1)
            picks = flat[torch.linspace(0, flat.numel() - 1, min(samples, flat.numel())).long()]
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(flat.double().sum().cpu().numpy().tobytes())
            digest.update(picks.double().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def recommended_guidance(base: str) -> float:
    """The classifier-free guidance `base` is best sampled at: a built-in's own; `tiny`'s for a toy-world
    model folder (one holding `clip/`, as `pimg toyworld train-base` writes: the same domain and
    training, where SD's usual 7.5 would overshoot); else SD's usual 7.5.

    The base's half of the guidance rule; `pimg.inference.guidance.choose_guidance` is the whole rule.
    """
    if base in BUILTIN_MODELS:
        return BUILTIN_MODELS[base].guidance_scale
    if is_toy_model_folder(base):
        return BUILTIN_MODELS["tiny"].guidance_scale
    return 7.5


def is_toy_model_folder(base: str) -> bool:
    """Is `base` a toy-world model folder (a pipeline with its `clip/`, as `pimg toyworld train-base` writes)?"""
    return (Path(base) / "clip" / "config.json").is_file()


def toy_clip_folder() -> Path:
    """The toy CLIP beside `tiny` (its vision tower encodes photos for the toy ID adapter and hypernetwork)."""
    return BUILTIN_MODELS["tiny"].folder / "clip"
