"""Sampler choice by name: a plain registry over diffusers' schedulers."""

from __future__ import annotations

import inspect

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
    scheduler_class = getattr(diffusers, class_name)
    if (
        base_config.get("rescale_betas_zero_snr")
        and "rescale_betas_zero_snr" not in inspect.signature(scheduler_class.__init__).parameters
    ):
        # from_config would drop the setting silently and sample on the wrong noise schedule.
        usable = [n for n, (c, _) in SCHEDULERS.items() if c != class_name]
        raise InputError(
            f"the {name} scheduler cannot sample this model: its noise schedule is rescaled to zero terminal "
            f"SNR, which {class_name} does not support; choose one of {', '.join(usable)}."
        )
    return scheduler_class.from_config(base_config, **extra)
