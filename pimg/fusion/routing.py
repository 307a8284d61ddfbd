"""Routing several subjects' LoRAs by region inside one UNet pass.

Two mechanisms, both installed through public APIs (torch forward hooks on peft's own `lora_B`
modules, and a diffusers attention processor), so peft keeps computing every LoRA as it always does:

1. **Pixel-side layers** (convolutions, self-attention q/k/v/out, feed-forward, proj_in/proj_out,
   cross-attention q and out): each subject's LoRA delta is multiplied by its region's weights at
   that layer's resolution, `y = W x + sum_i m_i * s_i * B_i A_i x`. A hook on `lora_B[adapter]`
   multiplies its output (`B_i A_i x`, before peft's scale) by `m_i`.
2. **Cross-attention keys and values** have no pixel axis. `RegionalCrossAttention` computes one
   attention per context (the global prompt, then each region's prompt encoded with its own
   subject's text-side parts), keys and values of context i projected with subject i's K/V LoRA
   only (the same hook, now choosing rows instead of pixels), and combines the outputs with the
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


class DeltaRouter:
    """Forward hooks on the `lora_B` modules of a composition's adapters, scaling each delta by its routing.

    Args:
        owner: an object with a `routing` attribute (a `Routing` or None), read at every call.
        adapters: peft adapter name -> the subject's index (0-based) in the routing.
    """

    def __init__(self, owner, adapters: dict[str, int]):
        self.owner = owner
        self.adapters = adapters
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.text_side: set[int] = set()
        self.encoding_subject: int | None = None  # the subject whose prompt the text encoder encodes now

    def install_unet(self, unet: torch.nn.Module) -> int:
        """Hook every LoRA layer of the UNet; returns how many deltas are routed."""
        from diffusers.models.attention_processor import Attention

        for module in unet.modules():
            if isinstance(module, Attention) and module.is_cross_attention:
                self.text_side.update((id(module.to_k), id(module.to_v)))
        return self._install(unet, self._unet_hook)

    def install_text_encoder(self, encoder: torch.nn.Module) -> int:
        """Hook a text encoder's LoRA layers: subject i's delta acts only while region i's prompt is encoded."""
        return self._install(encoder, self._text_encoder_hook)

    def _install(self, model: torch.nn.Module, make_hook) -> int:
        count = 0
        for module in model.modules():
            deltas = getattr(module, "lora_B", None)
            if not isinstance(deltas, torch.nn.ModuleDict):
                continue
            for adapter, index in self.adapters.items():
                if adapter in deltas:
                    hook = make_hook(index, id(module) in self.text_side)
                    self.handles.append(deltas[adapter].register_forward_hook(hook))
                    count += 1
        return count

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.text_side.clear()

    def _unet_hook(self, index: int, text_side: bool):
        def scale_delta(module, inputs, delta: torch.Tensor) -> torch.Tensor:
            routing: Routing | None = self.owner.routing
            if routing is None:
                return delta * 0
            if text_side:
                # RegionalCrossAttention projects [rows * (k + 1), tokens, dim]: context c of every row
                # is at c mod (k + 1); subject `index` owns context index + 1.
                contexts = routing.count + 1
                rows = torch.arange(delta.shape[0], device=delta.device) % contexts == index + 1
                return delta * rows.to(delta.dtype).view(-1, *([1] * (delta.ndim - 1)))
            if delta.ndim == 4:  # convolution: [batch, channels, h, w]
                weights = routing.pixel_weights(delta.shape[2], delta.shape[3], delta)[index + 1]
                return delta * weights
            if delta.ndim == 3:  # linear layer over pixels: [batch, h * w, channels]
                height, width = routing.layer_size(delta.shape[1])
                weights = routing.pixel_weights(height, width, delta)[index + 1]
                return delta * weights.reshape(1, -1, 1)
            # No pixel axis (a time-embedding projection): the subject acts in proportion to its area.
            return delta * routing.weights[index].mean().to(delta.dtype)

        return scale_delta

    def _text_encoder_hook(self, index: int, text_side: bool):
        def scale_delta(module, inputs, delta: torch.Tensor) -> torch.Tensor:
            return delta if self.encoding_subject == index else delta * 0

        return scale_delta


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
        mixed = F.scaled_dot_product_attention(query.expand(-1, count, -1, -1, -1), key, value)
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
