"""Hybrid-Model Classifier-Free Guidance (HM-CFG): the base model's composition, a subject LoRA's identity.

Plain classifier-free guidance with a subject LoRA pushes both the conditional and the unconditional
prediction through the personalised model; a strong guidance then amplifies what the LoRA overfits
(backgrounds, layout of the training photos). HM-CFG (Shrestha et al. 2025, "Finetuning-Free
Personalization of Text to Image Generation via Hypernetworks") guides with the base model and adds
the personalised model's difference on top:

    eps = eps_base(empty) + s_b * (eps_base(c) - eps_base(empty)) + s_p * (eps_pers(c) - eps_base(c))

with `s_b` the call's guidance scale and `s_p` the subject scale of this part. All three predictions
come from one batched UNet call per step: rows [base unconditional, base conditional, personalised
conditional]; the subject's LoRA acts on the last block of rows only (forward hooks on its `lora_B`
layers zero its delta on the other rows). With guidance 1 (no unconditional rows) the call has two
blocks and `eps = eps_base(c) + s_p * (eps_pers(c) - eps_base(c))`.

The result goes back to diffusers' own guidance step, which computes `u + g * (c - u)`; the part
returns `u = eps_base(empty)` and `c = u + (eps - u) / g`, so that step yields `eps` exactly.

Only the UNet's LoRA layers are routed: a LoRA with text-encoder layers is refused (its prompt encoding
would be shared by base and personalised rows).

Example:
    >>> pp.add(HybridGuidance(LoraPart("out/subject"), subject_scale=1.0))
    >>> pp.generate("a sks star on a green background", guidance_scale=3.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from pimg.errors import InputError
from pimg.inference.parts import GenerationCall, LoraPart, NoisePrediction, Part


class HybridGuidance(Part):
    """HM-CFG over one or more subject LoRAs (they form the personalised model together).

    Args:
        loras: the subject LoRA part(s); this part attaches and owns them.
        subject_scale: `s_p`, the weight of the personalised model's difference (0: the base alone).
        name: the part's name.
    """

    kind = "hybrid-guidance"

    def __init__(
        self, loras: LoraPart | Sequence[LoraPart], subject_scale: float = 1.0, name: str = "hm_cfg"
    ):
        super().__init__(name)
        self.loras = [loras] if isinstance(loras, LoraPart) else list(loras)
        if not self.loras:
            raise InputError("HM-CFG needs at least one subject LoRA (e.g. --lora out/subject).")
        if not isinstance(subject_scale, int | float) or not math.isfinite(subject_scale):
            raise InputError(f"the HM-CFG subject scale must be a finite number, got {subject_scale!r}.")
        self.subject_scale = float(subject_scale)
        self._rows: torch.Tensor | None = None  # per UNet row: 1 where the subject LoRA acts
        self._handles: list = []

    def attach(self, pipe) -> None:
        for lora in self.loras:
            lora.attach(pipe)
        adapters = {lora.adapter_name for lora in self.loras}
        text_side = [
            name
            for component in ("text_encoder", "text_encoder_2")
            if getattr(pipe, component, None) is not None
            for name, module in getattr(pipe, component).named_modules()
            if isinstance(getattr(module, "lora_B", None), torch.nn.ModuleDict)
            and adapters & set(module.lora_B)
        ]
        if text_side:
            self.detach(pipe)
            raise InputError(
                f"HM-CFG routes UNet LoRA layers only; {', '.join(sorted(adapters))} also changes the text encoder "
                f"({text_side[0]}, ...). Use plain guidance for this subject."
            )
        for module in pipe.unet.modules():
            deltas = getattr(module, "lora_B", None)
            if isinstance(deltas, torch.nn.ModuleDict):
                for adapter in adapters & set(deltas):
                    self._handles.append(deltas[adapter].register_forward_hook(self._route))

    def detach(self, pipe) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for lora in self.loras:
            lora.detach(pipe)

    def adapters(self) -> dict[str, float]:
        return {k: v for lora in self.loras for k, v in lora.adapters().items()}

    def _route(self, module, inputs, delta: torch.Tensor) -> torch.Tensor:
        if self._rows is None:
            return delta
        if delta.shape[0] != self._rows.shape[0]:
            raise InputError(
                f"HM-CFG expected {self._rows.shape[0]} UNet rows, got {delta.shape[0]}: another part changes the "
                "batch inside this one; use them in separate generations."
            )
        return delta * self._rows.to(delta).view(-1, *([1] * (delta.ndim - 1)))

    def wrap_noise_prediction(self, predict: NoisePrediction, call: GenerationCall) -> NoisePrediction:
        guidance = call.guidance_scale
        guided = guidance > 1.0  # diffusers adds the unconditional rows only then

        def hybrid(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
            rows = sample.shape[0]
            half = rows // 2 if guided else rows
            # rows of the one call: [uncond (base), cond (base), cond (personalised)]; unguided: the last two
            index = torch.arange(rows, device=sample.device)
            if guided:
                index = torch.cat([index, index[half:]])
            else:
                index = torch.cat([index, index])
            mask = torch.zeros(index.shape[0], device=sample.device)
            mask[-half:] = 1.0
            self._rows = mask
            try:
                eps = predict(
                    sample[index],
                    _take_rows(timestep, index, rows),
                    _take_rows(encoder_hidden_states, index, rows),
                    *(_take_rows(a, index, rows) for a in args),
                    **{k: _take_rows(v, index, rows) for k, v in kwargs.items()},
                )
            finally:
                self._rows = None
            personal, base_cond = eps[-half:], eps[-2 * half : -half]
            if not guided:
                return base_cond + self.subject_scale * (personal - base_cond)
            base_uncond = eps[:half]
            mixed = (
                base_uncond
                + guidance * (base_cond - base_uncond)
                + self.subject_scale * (personal - base_cond)
            )
            return torch.cat([base_uncond, base_uncond + (mixed - base_uncond) / guidance])

        return hybrid

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "subject_scale": self.subject_scale,
            "loras": [lora.describe() for lora in self.loras],
        }


def _take_rows(value, index: torch.Tensor, rows: int):
    """`value` with its batch rows re-indexed, for every tensor (in dicts and lists too) that has `rows` rows."""
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)] if value.ndim and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {k: _take_rows(v, index, rows) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_take_rows(v, index, rows) for v in value)
    return value
