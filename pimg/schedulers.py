"""Sampler choice by name: a plain registry over diffusers' schedulers."""

from __future__ import annotations

from pimg.errors import InputError

#: name -> (diffusers class name, extra config)
SCHEDULERS: dict[str, tuple[str, dict]] = {
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpm++-karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def list_schedulers() -> list[str]:
    return list(SCHEDULERS)


def make_scheduler(name: str, base_config):
    """A scheduler of kind `name` carrying over the model's noise schedule (`base_config`).

    Example:
        >>> pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    """
    import diffusers

    if name not in SCHEDULERS:
        raise InputError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}.")
    class_name, extra = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **extra)
