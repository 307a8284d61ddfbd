"""Several subjects in one image, each confined to its region, in one UNet pass per step.

`Composition` is one pipeline part holding k `RegionalSubject`s (a LoRA, pivotal or Textual
Inversion result, each with a region and optionally its own prompt). At attach it loads every
subject's LoRA through diffusers, hands its factors to the routing of `pimg.fusion.routing` (which
computes all subjects in one low-rank product per layer) and drops the peft adapter; at each
generation it encodes every region's prompt with its own subject's text-side parts (learned words,
text-encoder LoRA) and the global prompt with none, then lets the UNet run once per step with
classifier-free guidance batched as usual.

Two subjects may share a word (`sks`): each subject's learned embedding is loaded under a private
word, and only its own region's prompt is rewritten to use it, so routing, not vocabulary, keeps
them apart.

Example:
    >>> from pimg.fusion import Composition, regional_subject
    >>> pp.add(Composition([
    ...     regional_subject("out/dog", "left", prompt="a sks dog on a beach"),
    ...     regional_subject("out/cat", "right"),
    ... ]))
    >>> pp.generate("a sks dog at the left and a sks cat at the right on a beach", seed=0)
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pimg.errors import InputError, ModelLoadError
from pimg.fusion.regions import Region, parse_region, region_weights, resize_weights
from pimg.fusion.routing import FusedLoraRouter, RegionalCrossAttention, Routing
from pimg.inference.parts import (
    EmbeddingPart,
    GenerationCall,
    LoraPart,
    NoisePrediction,
    Part,
    safe_adapter_name,
)

logger = logging.getLogger(__name__)


@dataclass
class RegionalSubject:
    """One subject of a composition.

    Attributes:
        name: the subject's name (its adapter's name; unique in the composition).
        parts: its LoRA and/or learned embedding (`LoraPart`, `EmbeddingPart`).
        region: where it goes.
        prompt: its region's prompt; None: the image's global prompt.
    """

    name: str
    parts: list[Part]
    region: Region
    prompt: str | None = None

    def __post_init__(self):
        for part in self.parts:
            if not isinstance(part, LoraPart | EmbeddingPart):
                raise InputError(
                    f"subject {self.name!r}: a region holds LoRAs and learned words only, not a {part.kind} part."
                )
        if not self.parts:
            raise InputError(f"subject {self.name!r} has nothing to apply (no LoRA, no learned word).")
        if self.prompt is not None and not (isinstance(self.prompt, str) and self.prompt.strip()):
            raise InputError(f"subject {self.name!r}: its region prompt must be non-empty text, or None.")

    @property
    def lora(self) -> LoraPart | None:
        return next((p for p in self.parts if isinstance(p, LoraPart)), None)

    @property
    def embeddings(self) -> list[EmbeddingPart]:
        return [p for p in self.parts if isinstance(p, EmbeddingPart)]

    def region_prompt(self, prompt: str) -> str:
        """This region's prompt for an image whose global prompt is `prompt`, its learned words made private."""
        text = self.prompt or prompt
        for embedding, private in zip(self.embeddings, self._private_words(), strict=True):
            pattern = rf"(?<![\w<>]){re.escape(embedding.token)}(?![\w<>])"
            if not re.search(pattern, text):
                raise InputError(
                    f"subject {self.name!r} is the learned word {embedding.token!r}, which its region prompt "
                    f"{text!r} does not contain; put {embedding.token!r} in the prompt."
                )
            text = re.sub(pattern, private, text)
        return text

    def _private_words(self) -> list[str]:
        return [f"<pimg-{self.name}-{i}>" for i in range(len(self.embeddings))]


def regional_subject(
    result: str | Path,
    region: str | Region,
    *,
    prompt: str | None = None,
    scale: float = 1.0,
    name: str | None = None,
    feather: float = 0.0,
) -> RegionalSubject:
    """A trained result folder (LoRA, pivotal or Textual Inversion) placed in a region.

    Args:
        result: the result folder (or its weights file).
        region: a region name, a box `x0,y0,x1,y1`, a mask image path, or a `Region`.
        prompt: the region's prompt (None: the global prompt).
        scale: the subject's LoRA scale.
        name: the subject's name (default: the folder's name).
        feather: soft edges, as a share of the image side (names and boxes given as text).
    """
    from pimg.methods import load_result

    path = Path(result)
    folder = path if path.is_dir() else path.parent
    name = safe_adapter_name(name or folder.name) or "subject"
    loaded = load_result(path, scale=scale, name=name)
    if loaded.method.whole_model:
        raise InputError(
            f"{folder} is a {loaded.method.label} result (a whole model), which cannot be confined to a region; "
            "compose LoRA, pivotal or Textual Inversion results."
        )
    if isinstance(region, str | Path):
        region = parse_region(region, feather=feather)
    return RegionalSubject(name, loaded.parts, region, prompt)


class Composition(Part):
    """Subjects confined to regions, composed in one UNet pass per step (see the module docstring).

    Args:
        subjects: 1 or more `RegionalSubject`s; their names must differ.
        base_steps: the first denoising steps run the base alone on the global prompt, so that it
            lays out the scene before the subjects' LoRAs paint their regions (OMG's two stages,
            Kong et al. 2024); 0 = subjects from the first step.
        name: the part's name.
    """

    kind = "composition"

    def __init__(self, subjects: list[RegionalSubject], base_steps: int = 0, name: str = "composition"):
        super().__init__(name)
        if not isinstance(base_steps, int) or base_steps < 0:
            raise InputError(f"base_steps must be a whole number >= 0, got {base_steps!r}.")
        self.base_steps = base_steps
        if not subjects:
            raise InputError("a composition needs at least one subject.")
        names = [s.name for s in subjects]
        if len(set(names)) != len(names):
            raise InputError(f"subject names must differ; got {names}. Pass name= to tell them apart.")
        self.subjects = list(subjects)
        self.routing: Routing | None = None
        self.notes: list[str] = []  # what the latest generation changed (resized masks, overlaps)
        self._router: FusedLoraRouter | None = None
        self._processors: dict | None = None
        self._attached: list[Part] = []
        self._pipe = None  # the pipeline attached to: region prompts are encoded with its text encoders

    # -------------------------------------------------------------------------------- attach / detach

    def attach(self, pipe) -> None:
        self._pipe = pipe
        models = {
            name: getattr(pipe, name)
            for name in ("unet", "text_encoder", "text_encoder_2")
            if getattr(pipe, name, None) is not None
        }
        self._router = FusedLoraRouter(self)
        try:
            for index, subject in enumerate(self.subjects):
                for embedding, private in zip(subject.embeddings, subject._private_words(), strict=True):
                    renamed = EmbeddingPart(embedding.path, token=private)
                    renamed.attach(pipe)
                    self._attached.append(renamed)
                if subject.lora is None:
                    continue
                # diffusers reads the file (any layout pimg reads) into peft layers; the router takes
                # the factors, and the adapter goes, so that peft does not compute it a second time.
                subject.lora.attach(pipe)
                try:
                    routed = self._router.collect(
                        models, subject.lora.adapter_name, index, subject.lora.scale
                    )
                finally:
                    subject.lora.detach(pipe)
                if routed == 0:
                    raise ModelLoadError(
                        f"subject {subject.name!r}'s LoRA left no LoRA layer in the UNet to route."
                    )
            self._router.install(models)
            self._processors = dict(pipe.unet.attn_processors)
            pipe.unet.set_attn_processor(
                {
                    key: RegionalCrossAttention(self, processor)
                    if key.endswith("attn2.processor")
                    else processor
                    for key, processor in self._processors.items()
                }
            )
        except BaseException:
            self.detach(pipe)
            raise

    def detach(self, pipe) -> None:
        if self._processors is not None:
            pipe.unet.set_attn_processor(self._processors)
            self._processors = None
        if self._router is not None:
            self._router.remove()
            self._router = None
        for part in reversed(self._attached):
            part.detach(pipe)
        self._attached.clear()
        self._pipe = None

    def adapters(self) -> dict[str, float]:
        return {}  # the subjects' LoRAs run in the router, not as peft adapters

    # -------------------------------------------------------------------------------- generation

    def wrap_noise_prediction(self, predict: NoisePrediction, call: GenerationCall) -> NoisePrediction:
        routing = self.routing_for(call)
        layout = Routing(torch.zeros_like(routing.weights), routing.contexts)
        timesteps: list = []  # distinct timesteps seen: the step index, however often a step calls the UNet

        def routed(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
            value = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
            if value not in timesteps:
                timesteps.append(value)
            self.routing = layout if len(timesteps) <= self.base_steps else routing
            try:
                return predict(sample, timestep, encoder_hidden_states, *args, **kwargs)
            finally:
                self.routing = None

        return routed

    def routing_for(self, call: GenerationCall) -> Routing:
        """The routing of one generation: region weights at latent size and every row's contexts."""
        pipe = self._pipe
        if pipe is None:
            raise InputError(
                "the composition is not attached to a pipeline; add it with PersonalizedPipeline.add."
            )
        weights, self.notes = region_weights([s.region for s in self.subjects], call.height, call.width)
        for note in self.notes:
            logger.warning(note)
        scale = pipe.vae_scale_factor
        latent = resize_weights(weights, call.height // scale, call.width // scale)
        return Routing(latent, self.encode_contexts(pipe, call))

    def encode_contexts(self, pipe, call: GenerationCall) -> torch.Tensor:
        """[rows, k + 1, tokens, dim]: the global prompt's encoding (no subject), then each region's."""
        guided = call.guidance_scale > 1 and getattr(pipe.unet.config, "time_cond_proj_dim", None) is None
        encodings = [self._encode(pipe, call.prompts, None, call.negative_prompt, guided)]
        for index, subject in enumerate(self.subjects):
            prompts = [subject.region_prompt(p) for p in call.prompts]
            encodings.append(self._encode(pipe, prompts, index, call.negative_prompt, guided))
        return torch.stack(encodings, dim=1)

    def _encode(self, pipe, prompts: list[str], subject: int | None, negative: str | None, guided: bool):
        self._router.encoding_subject = subject
        try:
            encoded = pipe.encode_prompt(
                prompt=prompts,
                device=pipe._execution_device,
                num_images_per_prompt=1,
                do_classifier_free_guidance=guided,
                negative_prompt=negative,
            )
        finally:
            self._router.encoding_subject = None
        positive, negative_embeds = encoded[0], encoded[1]
        return torch.cat([negative_embeds, positive]) if guided else positive

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "base_steps": self.base_steps,
            "subjects": [
                {
                    "name": s.name,
                    "region": s.region.describe(),
                    "feather": s.region.feather,
                    "prompt": s.prompt,
                    "parts": [p.describe() for p in s.parts],
                }
                for s in self.subjects
            ],
        }
