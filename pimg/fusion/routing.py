"""Routing several subjects' LoRAs by region inside one UNet pass.

Two mechanisms, both installed through public APIs (torch forward hooks on the layers peft wrapped
when diffusers loaded the subjects' files, and a diffusers attention processor):

1. **Pixel-side layers** (convolutions, self-attention q/k/v/out, feed-forward, proj_in/proj_out,
   cross-attention q and out): each subject's LoRA delta is multiplied by its region's weights at
   that layer's resolution, `y = W x + sum_i m_i * s_i * B_i A_i x`. `FusedLoraRouter` computes the
   sum as one low-rank product, the weights applied on the rank axis (`B_i (m_i A_i x)`).
2. **Cross-attention keys and values** have no pixel axis. `RegionalCrossAttention` computes one
   attention per context (the global prompt, then each region's prompt encoded with its own
   subject's text-side parts), keys and values of context i projected with subject i's K/V LoRA
   only (the same router, now choosing rows instead of pixels), and combines the outputs with the
   region weights; pixels outside every region attend to the global prompt.

A `Routing` says, for one UNet call, how heavily each subject acts at each latent pixel and which
contexts the cross-attention reads; with no routing set (a UNet call from outside a composed
generation), every subject's LoRA is off.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pimg.errors import InputError
from pimg.fusion.regions import resize_weights


@dataclass
class Routing:
    """Where each of k subjects acts during one UNet call.

    Attributes:
        weights: [k, h, w] region weights at the latent resolution (overlaps already shared out).
        contexts: [rows, k + 1, tokens, dim] text encodings per UNet batch row: the global
            prompt's, then each region's (classifier-free guidance's unconditional rows included).
    """

    weights: torch.Tensor
    contexts: torch.Tensor
    _pixel_cache: dict = field(default_factory=dict, repr=False)
    _sizes: dict = field(default_factory=dict, repr=False)
    _rank_cache: dict = field(default_factory=dict, repr=False)
    #: Cross-attention keys and values by layer: the contexts do not change over the denoising
    #: steps, so each layer projects them once per generation, not once per step.
    key_values: dict = field(default_factory=dict, repr=False)

    @property
    def count(self) -> int:
        return int(self.weights.shape[0])

    def pixel_weights(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """[k + 1, height, width]: the global prompt's share (1 - the regions'), then each region's."""
        key = (height, width, like.device, like.dtype)
        if key not in self._pixel_cache:
            regions = resize_weights(self.weights, height, width)
            outside = (1 - regions.sum(0, keepdim=True)).clamp(min=0)
            self._pixel_cache[key] = torch.cat([outside, regions]).to(like.device, like.dtype)
        return self._pixel_cache[key]

    def layer_size(self, tokens: int) -> tuple[int, int]:
        """The (height, width) of a UNet layer with `tokens` pixels (each down-sampling halves, rounding up)."""
        if tokens in self._sizes:
            return self._sizes[tokens]
        height, width = self.weights.shape[-2:]
        factor = 1
        while factor <= max(height, width):
            h, w = -(-height // factor), -(-width // factor)
            if h * w == tokens:
                self._sizes[tokens] = (h, w)
                return h, w
            factor *= 2
        raise InputError(
            f"a UNet layer has {tokens} pixels, which is no down-sampling of the {width}x{height} latent; "
            "this UNet's layout is not one regional LoRA supports."
        )


@dataclass
class _RoutedLayer:
    """All subjects' LoRA factors at one layer, concatenated along the rank axis.

    `down` is [R, in] (or a convolution's [R, in, kh, kw]) and `up` [out, R] with each subject's
    scale folded in; `owner[j]` is the subject (0-based) whose factors rank channel j holds.
    """

    down: torch.Tensor
    up: torch.Tensor
    owner: torch.Tensor
    owner_key: tuple[int, ...]  # `owner` as a tuple: layers laid out alike share rank-axis weights
    conv: dict | None  # stride, padding, dilation of a convolution's down projection; None for linear
    text_side: bool  # a cross-attention key/value projection: routed by context row, not by pixel


class FusedLoraRouter:
    """Every subject's LoRA in one low-rank product per layer, routed on the rank axis.

    peft computes each adapter with its own two matmuls and scale; with k subjects that is 2k
    products a layer, each over the layer's full output width. Here the subjects' down projections
    are concatenated (one product to R = sum of ranks channels), each rank channel is multiplied by
    its subject's region weight at that pixel (m_i B_i A_i x = B_i (m_i A_i x), the weight is a
    per-pixel scalar), and one product with the concatenated, pre-scaled up projections adds all
    subjects' deltas: about the cost of a single LoRA of rank R.

    The factors are read from peft's layers after diffusers loaded each subject's file (any layout
    pimg reads), then the peft adapters are deleted, so peft does not compute them again.

    Args:
        owner: an object with a `routing` attribute (a `Routing` or None), read at every call.
    """

    def __init__(self, owner):
        self.owner = owner
        # (model, module name) -> per subject (down, scaled up, subject index, convolution settings)
        self._factors: dict[tuple[str, str], list[tuple]] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.encoding_subject: int | None = None  # the subject whose prompt the text encoder encodes now

    def collect(self, models: dict[str, torch.nn.Module], adapter: str, subject: int, scale: float) -> int:
        """Read peft adapter `adapter`'s factors as subject `subject`'s; returns how many UNet layers it has."""
        count = 0
        for model_name, model in models.items():
            for module_name, module in model.named_modules():
                downs = getattr(module, "lora_A", None)
                if isinstance(downs, torch.nn.ModuleDict) and adapter in downs:
                    self._factors.setdefault((model_name, module_name), []).append(
                        _factors(module, adapter, subject, scale)
                    )
                    count += model_name == "unet"
        return count

    def install(self, models: dict[str, torch.nn.Module]) -> None:
        """Hook every collected layer (looked up by name: peft's wrappers outlive their adapters)."""
        cross_kv = _cross_attention_key_values(models["unet"])
        for (model_name, module_name), factors in self._factors.items():
            layer = _concatenate(factors, model_name == "unet" and module_name in cross_kv)
            module = models[model_name].get_submodule(module_name)
            make = self._unet_hook if model_name == "unet" else self._text_encoder_hook
            self.handles.append(module.register_forward_hook(make(layer)))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self._factors.clear()

    def _unet_hook(self, layer: _RoutedLayer):
        def add_routed_deltas(module, inputs, output: torch.Tensor) -> torch.Tensor:
            routing: Routing | None = self.owner.routing
            if routing is None:  # a UNet call outside a composed generation: every subject is off
                return output
            x = inputs[0]
            hidden = _down(layer, x)
            return output + _up(layer, hidden * _rank_weights(layer, routing, hidden)).to(output.dtype)

        return add_routed_deltas

    def _text_encoder_hook(self, layer: _RoutedLayer):
        def add_encoding_subjects_delta(module, inputs, output: torch.Tensor) -> torch.Tensor:
            if self.encoding_subject not in layer.owner_key:  # None, or a subject without factors here
                return output
            hidden = _down(layer, inputs[0]) * (layer.owner == self.encoding_subject).to(layer.down.dtype)
            return output + _up(layer, hidden).to(output.dtype)

        return add_encoding_subjects_delta


def _cross_attention_key_values(unet: torch.nn.Module) -> set[str]:
    from diffusers.models.attention_processor import Attention

    names = set()
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            names.update((f"{name}.to_k", f"{name}.to_v"))
    return names


def _factors(module, adapter: str, subject: int, scale: float) -> tuple:
    if adapter in getattr(module, "lora_variant", {}):
        raise InputError(
            f"subject LoRA {adapter!r} uses a LoRA variant (DoRA or similar) that regional "
            "composition does not route; compose subjects trained as plain LoRA."
        )
    down, up = module.lora_A[adapter], module.lora_B[adapter]
    if getattr(up, "bias", None) is not None:
        raise InputError(f"subject LoRA {adapter!r} has a bias on its up projection, which is not routed.")
    conv = None
    if isinstance(down, torch.nn.Conv2d):
        if down.groups != 1:
            raise InputError(f"subject LoRA {adapter!r} has a grouped convolution, which is not routed.")
        conv = {"stride": down.stride, "padding": down.padding, "dilation": down.dilation}
    elif not isinstance(down, torch.nn.Linear):
        raise InputError(
            f"subject LoRA {adapter!r} adapts a {type(down).__name__} layer; regional composition "
            "routes linear and 2-D convolution layers."
        )
    scaled_up = up.weight.detach().flatten(1) * (module.scaling[adapter] * scale)
    return down.weight.detach().clone(), scaled_up, subject, conv


def _concatenate(factors: list[tuple], text_side: bool) -> _RoutedLayer:
    owner = [subject for down, _, subject, _ in factors for _ in range(down.shape[0])]
    up = torch.cat([scaled_up for _, scaled_up, _, _ in factors], dim=1)
    return _RoutedLayer(
        down=torch.cat([down for down, _, _, _ in factors]),
        up=up,
        owner=torch.tensor(owner, device=up.device),
        owner_key=tuple(owner),
        conv=factors[0][3],
        text_side=text_side,
    )


def _down(layer: _RoutedLayer, x: torch.Tensor) -> torch.Tensor:
    x = x.to(layer.down.dtype)
    if layer.conv is not None:
        return F.conv2d(x, layer.down, **layer.conv)  # [b, R, h, w]
    return F.linear(x, layer.down)  # [..., R]


def _up(layer: _RoutedLayer, hidden: torch.Tensor) -> torch.Tensor:
    if layer.conv is not None:
        return torch.einsum("or,brhw->bohw", layer.up, hidden)
    return F.linear(hidden, layer.up)


def _rank_weights(layer: _RoutedLayer, routing: Routing, hidden: torch.Tensor) -> torch.Tensor:
    """How much each rank channel acts at each position of `hidden`, shaped to broadcast against it."""
    shape = tuple(hidden.shape) if layer.text_side else tuple(hidden.shape[1:])
    key = (layer.owner_key, layer.text_side, layer.conv is not None, shape, hidden.dtype, hidden.device)
    if key in routing._rank_cache:
        return routing._rank_cache[key]
    owner = layer.owner.to(hidden.device)
    if layer.text_side:
        # RegionalCrossAttention projects [rows * (k + 1), tokens, dim]: context c of every row is at
        # c mod (k + 1); subject i owns context i + 1.
        contexts = torch.arange(hidden.shape[0], device=hidden.device) % (routing.count + 1)
        weights = (contexts[:, None] == owner[None, :] + 1).to(hidden.dtype).unsqueeze(1)  # [rows, 1, R]
    elif layer.conv is not None:  # [b, R, h, w]
        weights = routing.pixel_weights(hidden.shape[2], hidden.shape[3], hidden)[owner + 1]
    elif hidden.ndim == 3:  # linear layer over pixels: [b, h * w, R]
        height, width = routing.layer_size(hidden.shape[1])
        weights = routing.pixel_weights(height, width, hidden)[owner + 1].flatten(1).T
    else:  # no pixel axis (a time-embedding projection): each subject in proportion to its area
        weights = routing.weights.mean((1, 2)).to(hidden.device, hidden.dtype)[owner]
    routing._rank_cache[key] = weights
    return weights


class RegionalCrossAttention:
    """A diffusers attention processor for cross-attention: one attention per context, mixed by region.

    Same arithmetic as diffusers' `AttnProcessor2_0` (scaled dot-product attention), run once for
    the global prompt and once per region (batched as one call), then `out = sum_c m_c * attention_c`
    with `m_0 = 1 - sum of the region weights` at this layer's resolution.
    """

    def __init__(self, owner, fallback):
        self.owner = owner
        self.fallback = fallback  # the processor it replaced, used when no composed call is running

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs
    ):
        routing: Routing | None = self.owner.routing
        if routing is None or encoder_hidden_states is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)
        if attention_mask is not None:
            raise InputError(
                "regional composition does not take a cross-attention mask; generate without one."
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial = hidden_states.ndim == 4
        if spatial:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch, tokens, _ = hidden_states.shape
        if not spatial:
            height, width = routing.layer_size(tokens)
        contexts = routing.contexts
        if contexts.shape[0] != batch:
            raise InputError(
                f"the UNet was called with {batch} rows but the composition encoded {contexts.shape[0]}; "
                "another part changes the batch, which regional composition does not support together."
            )
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)

        count = contexts.shape[1]
        if id(attn) not in routing.key_values:
            flat = contexts.to(query.dtype).flatten(0, 1)  # [batch * (k + 1), text tokens, dim]
            if attn.norm_cross:
                flat = attn.norm_encoder_hidden_states(flat)
            routing.key_values[id(attn)] = (attn.to_k(flat), attn.to_v(flat))
        key, value = routing.key_values[id(attn)]
        heads = attn.heads
        head_dim = key.shape[-1] // heads

        query = query.view(batch, 1, tokens, heads, head_dim).transpose(2, 3)  # [b, 1, heads, n, d]
        key = key.view(batch, count, -1, heads, head_dim).transpose(2, 3)  # [b, k + 1, heads, t, d]
        value = value.view(batch, count, -1, heads, head_dim).transpose(2, 3)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # One 4-D call with the contexts on the batch axis: torch's fused CPU and GPU kernels take 4-D
        # inputs only; a 5-D call falls back to the unfused reference path (on `tiny` that tripled what
        # the regional attention adds to a generation, docs/experiments/fusion_tiny.md).
        mixed = F.scaled_dot_product_attention(
            query.expand(-1, count, -1, -1, -1).reshape(batch * count, heads, tokens, head_dim),
            key.reshape(batch * count, heads, -1, head_dim),
            value.reshape(batch * count, heads, -1, head_dim),
        ).view(batch, count, heads, tokens, head_dim)
        weights = routing.pixel_weights(height, width, mixed).reshape(1, count, 1, tokens, 1)
        hidden_states = (mixed * weights).sum(1)  # [b, heads, n, d]
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, tokens, heads * head_dim).to(query.dtype)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if spatial:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor
