"""The shared pipeline: one base model plus the personalization parts applied to it.

Every method plugs in as a `Part` (`pimg.inference.parts` states the contract). Every generation in
pimg goes through `PersonalizedPipeline.generate` (the CLI, the demo, training samples, class images,
the toy evaluations and the bench), so whatever a part does at generation time is applied everywhere.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from pimg.errors import InputError
from pimg.inference.parts import (
    GenerationCall,
    NoisePredictionHook,
    Part,
    chain_step_callbacks,
    merge_call_arguments,
    noise_prediction_chain,
)


@dataclass
class GeneratedImage:
    """One generated image and the exact settings that reproduce it."""

    image: Image.Image
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write a PNG carrying the settings as text chunks (`pimg` JSON, A1111-style `parameters`)."""
        path = Path(path)
        info = PngImagePlugin.PngInfo()
        info.add_text("pimg", json.dumps(self.settings, sort_keys=True))
        info.add_text("parameters", _a1111_parameters(self.settings))
        self.image.save(path, pnginfo=info)
        return path


def _a1111_parameters(s: dict[str, Any]) -> str:
    text = s["prompt"]
    if s.get("negative_prompt"):
        text += f"\nNegative prompt: {s['negative_prompt']}"
    return text + (
        f"\nSteps: {s['num_inference_steps']}, Sampler: {s['scheduler']}, CFG scale: {s['guidance_scale']}, "
        f"Seed: {s['seed']}, Size: {s['width']}x{s['height']}, Model: {s['base']}"
    )


def read_png_settings(path: str | Path) -> dict[str, Any]:
    """The settings pimg wrote into a PNG's text chunks."""
    with Image.open(path) as im:
        text = im.text.get("pimg") if hasattr(im, "text") else None
    if text is None:
        raise InputError(f"{path} carries no pimg settings (was it written by pimg generate?).")
    return json.loads(text)


class PersonalizedPipeline:
    """A base diffusion pipeline and the personalization parts applied to it.

    Example:
        >>> pp = PersonalizedPipeline.from_base("tiny")
        >>> pp.add(LoraPart("out/sks/pytorch_lora_weights.safetensors", scale=0.8))
        >>> images = pp.generate("a sks star on a green background", num_images=4, seed=0)
        >>> images[0].save("star.png")
    """

    def __init__(self, pipe, base_name: str, scheduler_name: str | None = None):
        self.pipe = pipe
        self.base_name = base_name
        self.scheduler_name = scheduler_name or type(pipe.scheduler).__name__
        self.parts: dict[str, Part] = {}

    @classmethod
    def from_base(
        cls,
        base: str,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        scheduler: str | None = None,
        config_folder: str | None = None,
    ) -> PersonalizedPipeline:
        """Load `base` (see `pimg.models.load_base`) and wrap it."""
        from pimg.models import load_base

        pipe = load_base(base, device=device, dtype=dtype, scheduler=scheduler, config_folder=config_folder)
        return cls(pipe, base, scheduler)

    def set_scheduler(self, name: str) -> None:
        from pimg.inference.schedulers import make_scheduler

        self.pipe.scheduler = make_scheduler(name, self.pipe.scheduler.config)
        self.scheduler_name = name

    def add(self, part: Part) -> Part:
        """Attach `part`; its name, and the names of the adapters it owns, must be new."""
        if part.name in self.parts:
            raise InputError(f"a part named {part.name!r} is already attached; give it another name.")
        part.attach(self.pipe)
        try:
            self.parts[part.name] = part
            self._activate_adapters()
        except BaseException:
            self.parts.pop(part.name, None)
            part.detach(self.pipe)
            raise
        return part

    def remove(self, name: str) -> None:
        if name not in self.parts:
            raise InputError(f"no part named {name!r}; attached: {', '.join(self.parts) or 'none'}.")
        self.parts.pop(name).detach(self.pipe)
        self._activate_adapters()

    def clear(self) -> None:
        """Remove every part, newest first."""
        for name in reversed(list(self.parts)):
            self.remove(name)

    def _activate_adapters(self) -> None:
        """Make the union of the parts' peft adapters the active set, each at its part's weight."""
        weights: dict[str, float] = {}
        owners: dict[str, str] = {}
        for part in self.parts.values():
            for adapter, weight in part.adapters().items():
                if adapter in owners:
                    raise InputError(
                        f"parts {owners[adapter]!r} and {part.name!r} both claim the peft adapter {adapter!r}; "
                        "give one of them another name."
                    )
                owners[adapter], weights[adapter] = part.name, float(weight)
        if weights:
            self.pipe.set_adapters(list(weights), adapter_weights=list(weights.values()))

    def check_inputs(
        self,
        prompts: list[str],
        height: int,
        width: int,
        num_images: int,
        num_inference_steps: int,
        guidance_scale: float,
        part_prompts: dict[str, str],
    ) -> None:
        if not prompts:
            raise InputError("no prompt given: pass a non-empty string (or a list of them).")
        for prompt in prompts:
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"prompt must be a non-empty string, got {prompt!r}.")
        for name, value in (("height", height), ("width", width)):
            if value % 8 != 0 or value <= 0:
                raise InputError(
                    f"{name} must be a positive multiple of 8, got {value}; try {max(8, value // 8 * 8)}."
                )
        if num_images < 1:
            raise InputError(f"num_images must be >= 1, got {num_images}.")
        if num_inference_steps < 1:
            raise InputError(f"num_inference_steps must be >= 1, got {num_inference_steps}.")
        if (
            not isinstance(guidance_scale, int | float)
            or not math.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise InputError(
                f"guidance_scale must be a finite number >= 0, got {guidance_scale!r} (1 turns guidance off; "
                "tiny samples best at 3, Stable Diffusion at about 7.5)."
            )
        for name, text in part_prompts.items():
            part = self.parts.get(name)
            if part is None or not part.takes_prompt:
                takers = [n for n, p in self.parts.items() if p.takes_prompt]
                raise InputError(
                    f"a prompt was given for part {name!r}, which {'is not attached' if part is None else 'takes none'}; "
                    f"parts that take their own prompt: {', '.join(takers) or 'none attached'}."
                )
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"the prompt of part {name!r} must be a non-empty string, got {text!r}.")

    def default_size(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | None = None,
        num_images: int = 1,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        part_prompts: dict[str, str] | None = None,
        callback=None,
    ) -> list[GeneratedImage]:
        """Generate `num_images` images per prompt; image k of a prompt uses seed `seed + k`, so each
        is reproducible alone.

        Args:
            prompt: a prompt, or a list of prompts generated in one batch.
            negative_prompt, num_inference_steps, guidance_scale: as in diffusers.
            num_images: images per prompt.
            seed: seed of each prompt's first image.
            seeds: one seed per image instead (len(prompts) * num_images of them, in output order).
            height, width: pixels, multiples of 8 (default: the model's native size).
            part_prompts: prompts of parts that take their own (part name -> prompt).
            callback: `callback(step, total)` after each denoising step, for progress display.
        Returns:
            The images with their settings, prompt by prompt.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        height = self.default_size() if height is None else height
        width = self.default_size() if width is None else width
        part_prompts = dict(part_prompts or {})
        self.check_inputs(
            prompts, height, width, num_images, num_inference_steps, guidance_scale, part_prompts
        )
        if seeds is None:
            seeds = [seed + k for _ in prompts for k in range(num_images)]
        elif len(seeds) != len(prompts) * num_images:
            raise InputError(
                f"seeds: {len(seeds)} given for {len(prompts) * num_images} images; give one per image."
            )
        call = GenerationCall(
            prompts=[p for p in prompts for _ in range(num_images)],
            negative_prompt=negative_prompt or None,
            seeds=list(seeds),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            part_prompts=part_prompts,
            images_per_prompt=num_images,
        )
        # CPU generators: the same seed gives the same image on CPU and GPU.
        kwargs: dict[str, Any] = dict(
            prompt=prompt if isinstance(prompt, str) else prompts,
            negative_prompt=call.negative_prompt,
            num_images_per_prompt=num_images,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        )
        parts = list(self.parts.values())
        kwargs = merge_call_arguments(kwargs, [(p.name, p.call_arguments(call)) for p in parts])
        callbacks = [c for c in (p.step_callback(call) for p in parts) if c is not None]
        if callback is not None:

            def progress(pipe, step: int, timestep, tensors: dict) -> dict:
                callback(step + 1, num_inference_steps)
                return tensors

            callbacks.append(progress)
        if (chained := chain_step_callbacks(callbacks)) is not None:
            kwargs["callback_on_step_end"] = chained
        with self._noise_prediction_hook([p for p in parts if p.changes_noise_prediction()], call):
            images = self.pipe(**kwargs).images
        common = {
            "base": self.base_name,
            "negative_prompt": negative_prompt or "",
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "scheduler": self.scheduler_name,
            "parts": [p.describe() for p in parts],
        }
        if part_prompts:
            common["part_prompts"] = part_prompts
        return [
            GeneratedImage(im, {**common, "prompt": text, "seed": s})
            for im, text, s in zip(images, call.prompts, seeds, strict=True)
        ]

    @contextmanager
    def _noise_prediction_hook(self, parts: list[Part], call: GenerationCall):
        """Route the pipeline's UNet calls through `parts`' wrappers for one call (nothing when none wraps)."""
        if not parts:
            yield
            return
        unet = self.pipe.unet
        hook = NoisePredictionHook(unet, noise_prediction_chain(unet, parts, call))
        # object.__setattr__: DiffusionPipeline.__setattr__ would record the stand-in in model_index.
        object.__setattr__(self.pipe, "unet", hook)
        try:
            yield
        finally:
            object.__setattr__(self.pipe, "unet", unet)
