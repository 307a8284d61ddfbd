"""The Part contract: how a personalization method plugs into `PersonalizedPipeline`.

A part is one thing applied to a base pipeline: a LoRA, a learned token, and later a predicted
LoRA, an ID adapter or a set of regional subjects. As with peft's `LoraVariant`, the core calls each
part at fixed points and never asks what kind it is:

1. `attach(pipe)` / `detach(pipe)`: load into / remove from the diffusers pipeline. Attaching then
   detaching leaves the pipeline generating exactly what it did before (the contract test checks
   this bit for bit for every part type).
2. `adapters()`: the peft adapters the part owns, with their weights. The pipeline activates the
   union of every part's adapters, so a part that owns an adapter without being a LoRA (an ID
   adapter's companion LoRA) stays active when a `LoraPart` is added next to it.
3. `call_arguments(call)`: keyword arguments for the diffusers call (image embeddings, attention
   kwargs). Several parts' arguments are merged; two parts giving one argument different values is
   an error naming both.
4. `step_callback(call)`: a function run after every denoising step; the pipeline chains them (the
   progress display is one of them).
5. `wrap_noise_prediction(predict, call)`: the denoising hook. The pipeline passes the UNet call
   through every part's wrapper, so a part can mix predictions (guidance across models) or batch
   extra rows; attention processors a part installs at `attach` read per-call data (regions) that
   the part stores in `call_arguments` or keeps on itself for the call.
6. `describe()`: what went into an image, as JSON, for its metadata.

Parts that take a prompt of their own (a regional subject) set `takes_prompt = True` and receive it
as `call.part_prompts[part.name]`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pimg.errors import InputError, ModelLoadError
from pimg.hub_files import local_file

#: `predict(sample, timestep, encoder_hidden_states, **unet_kwargs) -> noise prediction` (one tensor).
NoisePrediction = Callable[..., torch.Tensor]
#: `callback(pipe, step_index, timestep, tensors) -> tensors`, diffusers' `callback_on_step_end` form.
StepCallback = Callable[[Any, int, Any, dict], dict]


@dataclass
class GenerationCall:
    """What one `PersonalizedPipeline.generate` call asks for, as every part sees it.

    Attributes:
        prompts: one prompt per image, in batch order (classifier-free guidance adds the
            unconditional rows in front, as diffusers does).
        negative_prompt: the negative prompt, or None.
        part_prompts: per-part prompts, by part name (only parts with `takes_prompt`).
        seeds: one seed per image.
        num_inference_steps, guidance_scale, height, width: as in diffusers.
        images_per_prompt: diffusers' `num_images_per_prompt` of the call (`prompts` holds each
            prompt that many times in a row).
    """

    prompts: list[str]
    negative_prompt: str | None
    seeds: list[int]
    num_inference_steps: int
    guidance_scale: float
    height: int
    width: int
    part_prompts: dict[str, str] = field(default_factory=dict)
    images_per_prompt: int = 1


class Part:
    """A personalization component applied to a base pipeline (see the module docstring).

    Subclasses override `attach` and `detach`, and whichever of the other hooks they need.
    """

    kind = "part"
    #: Whether the part takes a prompt of its own (`generate(part_prompts={name: ...})`).
    takes_prompt = False

    def __init__(self, name: str):
        self.name = name

    def attach(self, pipe) -> None:
        """Apply this part to the diffusers pipeline."""
        raise NotImplementedError

    def detach(self, pipe) -> None:
        """Undo `attach`."""
        raise NotImplementedError

    def adapters(self) -> dict[str, float]:
        """peft adapter name -> weight, for the adapters this part loaded (default: none)."""
        return {}

    def call_arguments(self, call: GenerationCall) -> dict[str, Any]:
        """Keyword arguments this part adds to the diffusers call (default: none)."""
        return {}

    def step_callback(self, call: GenerationCall) -> StepCallback | None:
        """A function to run after each denoising step of this call, or None."""
        return None

    def wrap_noise_prediction(self, predict: NoisePrediction, call: GenerationCall) -> NoisePrediction:
        """Return `predict` changed for this call (default: unchanged, and no wrapper is installed)."""
        return predict

    def changes_noise_prediction(self) -> bool:
        """True when the class overrides `wrap_noise_prediction` (only then is the UNet wrapped)."""
        return type(self).wrap_noise_prediction is not Part.wrap_noise_prediction

    def describe(self) -> dict[str, Any]:
        """What went into an image, for its metadata (JSON values only)."""
        return {"kind": self.kind, "name": self.name}


# ------------------------------------------------------------------------------------ composing parts


def merge_call_arguments(base: dict[str, Any], contributions: list[tuple[str, Mapping[str, Any]]]) -> dict:
    """The diffusers call arguments with every part's contribution merged in.

    Dict values (`cross_attention_kwargs`) merge key by key; any other value may be given by one
    source only, or by several with the same value. A conflict names both sources and the key.

    Example:
        >>> merge_call_arguments({"prompt": "a"}, [("fusion", {"cross_attention_kwargs": {"regions": r}})])
    """
    merged = dict(base)
    owner = dict.fromkeys(base, "the pipeline")
    for source, arguments in contributions:
        for key, value in arguments.items():
            if key not in merged:
                merged[key], owner[key] = value, source
            elif isinstance(merged[key], Mapping) and isinstance(value, Mapping):
                merged[key] = _merge_mappings(merged[key], value, key, owner[key], source)
                owner[key] = f"{owner[key]} and {source}"
            elif not _same(merged[key], value):
                raise InputError(
                    f"parts {owner[key]!r} and {source!r} both set the pipeline argument {key!r} to different "
                    "values; they cannot be used together in one generation. Remove one of them."
                )
    return merged


def _merge_mappings(a: Mapping, b: Mapping, key: str, first: str, second: str) -> dict:
    out = dict(a)
    for name, value in b.items():
        if name in out and not _same(out[name], value):
            raise InputError(
                f"parts {first!r} and {second!r} both set {key}[{name!r}] to different values; they cannot be "
                "used together in one generation. Remove one of them."
            )
        out[name] = value
    return out


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):
        return False


def chain_step_callbacks(callbacks: list[StepCallback]) -> StepCallback | None:
    """One `callback_on_step_end` that runs `callbacks` in order, each seeing the tensors the last returned."""
    if not callbacks:
        return None

    def run(pipe, step: int, timestep, tensors: dict) -> dict:
        for callback in callbacks:
            returned = callback(pipe, step, timestep, tensors)
            tensors = returned if isinstance(returned, dict) else tensors
        return tensors

    return run


class NoisePredictionHook(torch.nn.Module):
    """Stands in for the UNet during one call, sending each UNet evaluation through the parts' wrappers.

    Why a stand-in for the UNet rather than a pimg-owned denoising loop: diffusers' pipelines keep
    their schedulers, classifier-free guidance, SDXL conditioning and IP-Adapter handling in one
    place, and a hook at the UNet call reaches every one of them; plain generation never installs it,
    so it stays exactly diffusers' loop. Attribute reads (`config`, `dtype`, `add_embedding`, ...)
    go to the real UNet.
    """

    def __init__(self, unet: torch.nn.Module, predict: NoisePrediction):
        super().__init__()
        self.unet = unet
        self._predict = predict

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def forward(
        self, sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **kwargs
    ):
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        prediction = self._predict(sample, timestep, encoder_hidden_states, *args, **kwargs)
        return UNet2DConditionOutput(sample=prediction) if return_dict else (prediction,)


def noise_prediction_chain(unet, parts: list[Part], call: GenerationCall) -> NoisePrediction:
    """The UNet's prediction passed through the wrappers of `parts` (the first part's wrapper is innermost)."""

    def predict(sample, timestep, encoder_hidden_states=None, *args, **kwargs):
        kwargs["return_dict"] = False
        return unet(sample, timestep, encoder_hidden_states, *args, **kwargs)[0]

    for part in parts:
        predict = part.wrap_noise_prediction(predict, call)
    return predict


# ------------------------------------------------------------------------------------ the parts pimg ships


def pipeline_components(pipe) -> dict[str, torch.nn.Module]:
    """The UNet and text encoder(s) of a diffusers pipeline, by name: what LoRA files name and load into."""
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
    """LoRA weights applied with a scale, as a named peft adapter.

    Args:
        source: a LoRA file or folder (diffusers or kohya layout), or the weights themselves as a
            state dict in either layout (a hypernetwork's prediction).
        scale: the adapter's weight (0 = off, 1 = as trained).
        name: the adapter's name; needed for in-memory weights, else taken from the file.

    Example:
        >>> pp.add(LoraPart("out/sks", scale=0.8))
        >>> pp.add(LoraPart(predicted_state_dict, name="predicted"))
    """

    kind = "lora"

    def __init__(
        self, source: str | Path | Mapping[str, torch.Tensor], scale: float = 1.0, name: str | None = None
    ):
        if isinstance(source, Mapping):
            if name is None:
                raise InputError(
                    "LoraPart from in-memory weights needs a name=, e.g. LoraPart(sd, name='pred')."
                )
            self.path, self.state_dict = None, dict(source)
        else:
            self.path, self.state_dict = local_file(source), None
        super().__init__(name or _adapter_name(self.path))
        self.scale = float(scale)
        # peft adds each adapter as a submodule under its name, so a name torch modules already use
        # (a LoRA in `out/train` is "train", the default training folder) would clash with the method.
        self.adapter_name = f"{self.name}_lora" if hasattr(torch.nn.Module, self.name) else self.name

    def attach(self, pipe) -> None:
        from pimg.formats.lora import load_lora_state_dict, prepare_lora_state_dict

        components = pipeline_components(pipe)
        if self.state_dict is not None:
            state_dict = prepare_lora_state_dict(self.state_dict, components, what=f"LoRA {self.name!r}")
        else:
            state_dict = load_lora_state_dict(self.path, components)
        if any(key.startswith("text_encoder") for key in state_dict):
            pipe.load_lora_weights(state_dict, adapter_name=self.adapter_name)
            return
        # diffusers warns, at length, that a UNet-only LoRA holds no text-encoder keys: expected here.
        with _diffusers_log_level(logging.ERROR):
            pipe.load_lora_weights(state_dict, adapter_name=self.adapter_name)

    def detach(self, pipe) -> None:
        pipe.delete_adapters(self.adapter_name)

    def adapters(self) -> dict[str, float]:
        return {self.adapter_name: self.scale}

    def describe(self) -> dict[str, Any]:
        if self.path is None:
            return {
                **super().describe(),
                "source": f"in memory ({len(self.state_dict)} tensors)",
                "scale": self.scale,
            }
        return {**super().describe(), "path": str(self.path), "scale": self.scale}


class EmbeddingPart(Part):
    """A Textual Inversion embedding (diffusers, A1111 or SDXL file), bound to a token of the prompt."""

    kind = "embedding"

    def __init__(self, path: str | Path, token: str | None = None):
        from pimg.formats.embeddings import read_embedding_vectors

        self.path = local_file(path)
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
    return safe_adapter_name(stem or "adapter")


def safe_adapter_name(text: str) -> str:
    """`text` with every character but letters, digits and `_` made `_`: a valid peft adapter name."""
    return "".join(c if c.isalnum() or c == "_" else "_" for c in text)
