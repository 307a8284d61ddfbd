"""The shared pipeline: one base model plus the personalization parts applied to it.

Every method plugs in as a `Part`. A part attaches itself to the diffusers pipeline (loads LoRA
weights, adds token embeddings, installs attention processors), may adjust the arguments of each
generation call (`prepare_call`: an ID adapter adds image embeddings, mask-routed multi-subject
fusion adds its masks), and describes itself for the images' metadata. LoRA adapters and Textual
Inversion embeddings ship here; the hypernetwork, ID adapter and multi-subject fusion subclass
`Part` in their own modules.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from pimg.errors import InputError, ModelLoadError


class Part:
    """A personalization component applied to a base pipeline (the extension point).

    Subclasses override `attach` and `detach`, optionally `prepare_call`, and `describe`.
    """

    kind = "part"

    def __init__(self, name: str):
        self.name = name

    def attach(self, pipe) -> None:
        """Apply this part to the diffusers pipeline."""
        raise NotImplementedError

    def detach(self, pipe) -> None:
        """Undo `attach`."""
        raise NotImplementedError

    def prepare_call(self, call_kwargs: dict[str, Any]) -> dict[str, Any]:
        """Adjust the keyword arguments of one pipeline call (default: unchanged)."""
        return call_kwargs

    def describe(self) -> dict[str, Any]:
        """What went into an image, for its metadata."""
        return {"kind": self.kind, "name": self.name}


def _components(pipe) -> dict[str, torch.nn.Module]:
    return {
        name: getattr(pipe, name)
        for name in ("unet", "text_encoder", "text_encoder_2")
        if getattr(pipe, name, None) is not None
    }


@contextmanager
def _diffusers_log_level(level: int):
    from diffusers.utils import logging as diffusers_logging

    before = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(level)
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(before)


class LoraPart(Part):
    """A LoRA file (diffusers or kohya layout) applied with a scale, as a named peft adapter."""

    kind = "lora"

    def __init__(self, path: str | Path, scale: float = 1.0, name: str | None = None):
        self.path = Path(path)
        super().__init__(name or _adapter_name(self.path))
        self.scale = float(scale)

    def attach(self, pipe) -> None:
        from pimg.formats.lora import load_lora_state_dict

        state_dict = load_lora_state_dict(self.path, _components(pipe))
        if any(key.startswith("text_encoder") for key in state_dict):
            pipe.load_lora_weights(state_dict, adapter_name=self.name)
            return
        # diffusers warns, at length, that a UNet-only LoRA holds no text-encoder keys: expected here.
        with _diffusers_log_level(logging.ERROR):
            pipe.load_lora_weights(state_dict, adapter_name=self.name)

    def detach(self, pipe) -> None:
        pipe.delete_adapters(self.name)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path), "scale": self.scale}


class EmbeddingPart(Part):
    """A Textual Inversion embedding (diffusers, A1111 or SDXL file), bound to a token of the prompt."""

    kind = "embedding"

    def __init__(self, path: str | Path, token: str | None = None):
        from pimg.formats.embeddings import read_embedding_vectors

        self.path = Path(path)
        self.token, self.per_encoder = read_embedding_vectors(self.path, token=token)
        super().__init__(self.token)

    def _encoders(self, pipe) -> list[tuple[Any, Any]]:
        """(tokenizer, text encoder) pairs, one per part of the file; refuses a file of the other family."""
        pairs = [(pipe.tokenizer, pipe.text_encoder)]
        if getattr(pipe, "text_encoder_2", None) is not None:
            pairs.append((pipe.tokenizer_2, pipe.text_encoder_2))
        if len(pairs) != len(self.per_encoder):
            family = "an SDXL" if len(self.per_encoder) == 2 else "an SD 1.x/2.x"
            raise ModelLoadError(
                f"{self.path} is {family} embedding ({len(self.per_encoder)} text encoder part(s)), but this base "
                f"has {len(pairs)} text encoder(s). Load it on a base of the family it was trained for."
            )
        return pairs

    def attach(self, pipe) -> None:
        from pimg.formats.embeddings import check_embedding

        pairs = self._encoders(pipe)
        for (tokenizer, encoder), vectors in zip(pairs, self.per_encoder, strict=True):
            check_embedding(tokenizer, encoder, self.token, vectors)
        for (tokenizer, encoder), vectors in zip(pairs, self.per_encoder, strict=True):
            pipe.load_textual_inversion(
                {self.token: vectors}, token=self.token, tokenizer=tokenizer, text_encoder=encoder
            )

    def detach(self, pipe) -> None:
        from pimg.formats.embeddings import multi_vector_tokens

        # diffusers unloads only the tokens it is given: an n-vector embedding added `<t>_1`, ... too,
        # and leaving them would refuse the same file when it is attached again.
        names = multi_vector_tokens(self.token, int(self.per_encoder[0].shape[0]))
        for tokenizer, encoder in self._encoders(pipe):
            pipe.unload_textual_inversion(names, tokenizer=tokenizer, text_encoder=encoder)

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "path": str(self.path),
            "token": self.token,
            "vectors": int(self.per_encoder[0].shape[0]),
        }


def _adapter_name(path: Path) -> str:
    stem = path.parent.name if path.name.startswith("pytorch_lora_weights") else path.stem
    return "".join(c if c.isalnum() or c == "_" else "_" for c in (stem or "lora"))


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
        """Attach `part`; its name must be new."""
        if part.name in self.parts:
            raise InputError(f"a part named {part.name!r} is already attached; give it another name.")
        part.attach(self.pipe)
        self.parts[part.name] = part
        self._sync_lora_scales()
        return part

    def remove(self, name: str) -> None:
        if name not in self.parts:
            raise InputError(f"no part named {name!r}; attached: {', '.join(self.parts) or 'none'}.")
        self.parts.pop(name).detach(self.pipe)
        self._sync_lora_scales()

    def _sync_lora_scales(self) -> None:
        loras = [p for p in self.parts.values() if isinstance(p, LoraPart)]
        if loras:
            self.pipe.set_adapters([p.name for p in loras], adapter_weights=[p.scale for p in loras])

    def check_inputs(
        self, prompt: str, height: int, width: int, num_images: int, num_inference_steps: int
    ) -> None:
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

    def default_size(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        num_images: int = 1,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int = 0,
        height: int | None = None,
        width: int | None = None,
        callback=None,
    ) -> list[GeneratedImage]:
        """Generate `num_images` images; image k uses seed `seed + k`, so each is reproducible alone.

        Args:
            prompt, negative_prompt, num_inference_steps, guidance_scale: as in diffusers.
            num_images: images for this prompt.
            seed: seed of the first image.
            height, width: pixels, multiples of 8 (default: the model's native size).
            callback: `callback(step, total)` after each denoising step, for progress display.
        Returns:
            The images with their settings.
        """
        height = self.default_size() if height is None else height
        width = self.default_size() if width is None else width
        self.check_inputs(prompt, height, width, num_images, num_inference_steps)
        # CPU generators: the same seed gives the same image on CPU and GPU.
        generators = [torch.Generator("cpu").manual_seed(seed + k) for k in range(num_images)]
        kwargs: dict[str, Any] = dict(
            prompt=prompt,
            negative_prompt=negative_prompt or None,
            num_images_per_prompt=num_images,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generators,
        )
        if callback is not None:
            kwargs["callback_on_step_end"] = lambda pipe, i, t, kw: (
                callback(i + 1, num_inference_steps),
                kw,
            )[1]
        for part in self.parts.values():
            kwargs = part.prepare_call(kwargs)
        images = self.pipe(**kwargs).images
        common = {
            "base": self.base_name,
            "prompt": prompt,
            "negative_prompt": negative_prompt or "",
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "scheduler": self.scheduler_name,
            "parts": [p.describe() for p in self.parts.values()],
        }
        return [GeneratedImage(im, {**common, "seed": seed + k}) for k, im in enumerate(images)]
