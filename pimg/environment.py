"""`pimg env`: the versions and hardware a bug report needs."""

from __future__ import annotations

import platform
from importlib import metadata

PACKAGES = (
    "pimg",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "open-clip-torch",
    "gradio",
    "insightface",
    "onnxruntime",
    "xformers",
    "bitsandbytes",
)


def environment_report() -> str:
    """A plain-text report of Python, packages, and the accelerator torch sees."""
    import torch

    lines = [f"python       {platform.python_version()} ({platform.platform()})"]
    for name in PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "not installed"
        lines.append(f"{name:12s} {version}")
    if torch.cuda.is_available():
        lines.append(
            f"cuda         {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): "
            + ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        )
    else:
        lines.append(f"cuda         none visible (cpu threads: {torch.get_num_threads()})")
    return "\n".join(lines)
