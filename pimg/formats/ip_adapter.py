"""IP-Adapter files: read, check against a UNet, write, and take back from a UNet that has one loaded.

The layout is IP-Adapter's own (Ye et al. 2023; github.com/tencent-ailab/IP-Adapter), which diffusers'
`pipe.load_ip_adapter` reads:

- `image_proj.*`: the projection from an image embedding to N tokens of the UNet's cross-attention
  width. IP-Adapter: `proj` (Linear, embed -> 4 x cross_dim) and `norm` (LayerNorm). IP-Adapter-FaceID:
  `MLPProjModel`, `proj.0` (embed -> 1024), GELU, `proj.2` (1024 -> 4 x cross_dim), `norm`.
  IP-Adapter Plus: a resampler (`latents`, `proj_in`, `layers.{d}.0` attention, `layers.{d}.1` feed-forward,
  `proj_out`, `norm_out`) from the CLIP image encoder's penultimate hidden states to N tokens.
- `ip_adapter.{i}.to_k_ip.weight`, `ip_adapter.{i}.to_v_ip.weight`: the decoupled keys and values of
  cross-attention layer i, where i counts every attention processor of the UNet in order, so the
  cross-attention ones are 1, 3, 5, ... (SD 1.5: 16 layers, 1 to 31).
- FaceID's companion LoRA inside the same file: `ip_adapter.{i}.to_{q,k,v,out}_lora.{down,up}.weight`
  for every attention layer (diffusers applies it as the peft adapter `faceid_0`).

A `.bin` file is a dict `{"image_proj": {...}, "ip_adapter": {...}}` (read with
`torch.load(weights_only=True)`); a `.safetensors` file holds the same tensors under the flat names
above. Both come back as that nested dict.

Example:
    >>> weights = read_ip_adapter("ip-adapter-faceid_sd15.bin")
    >>> describe_ip_adapter(weights).kind, describe_ip_adapter(weights).embed_dim
    ('faceid', 512)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pimg.errors import InputError, ModelLoadError

#: What pimg writes (and looks for first in a folder).
IP_ADAPTER_FILE = "ip_adapter.safetensors"
#: Other names a folder may use (h94/IP-Adapter, h94/IP-Adapter-FaceID).
KNOWN_FILES = (
    IP_ADAPTER_FILE,
    "ip-adapter_sd15.safetensors",
    "ip-adapter_sd15.bin",
    "ip-adapter-faceid_sd15.bin",
    "ip-adapter-faceid_sdxl.bin",
)
SECTIONS = ("image_proj", "ip_adapter")
#: The peft adapter name diffusers' `load_ip_adapter` gives a file's companion (FaceID) LoRA.
COMPANION_LORA = "faceid_0"


@dataclass(frozen=True)
class IpAdapterInfo:
    """What an IP-Adapter file is.

    Attributes:
        kind: "clip" (IP-Adapter's projection of a CLIP image embedding), "plus" (IP-Adapter Plus'
            resampler over the CLIP encoder's penultimate hidden states), "faceid" (FaceID's MLP
            projection of a face-identity embedding) or "faceid-plus" (FaceID Plus / PlusV2: that
            projection, refined by a resampler over the CLIP hidden states of the aligned face).
        embed_dim: the embedding size it takes (CLIP projection dim; the CLIP hidden size for plus;
            512 for ArcFace).
        cross_attention_dim: the UNet cross-attention width it was made for (SD 1.5: 768, SDXL: 2048).
        num_tokens: image tokens it adds to each cross-attention layer.
        num_layers: cross-attention layers it has keys and values for.
        has_lora: it holds FaceID's companion LoRA.
        face_token_dim: for faceid-plus, the CLIP hidden size of the face tokens it takes beside the
            face embedding (ViT-H: 1280); 0 for the other kinds.
    """

    kind: str
    embed_dim: int
    cross_attention_dim: int
    num_tokens: int
    num_layers: int
    has_lora: bool
    face_token_dim: int = 0


def read_ip_adapter(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter `.bin` or `.safetensors` file (or a folder holding one) as `{"image_proj", "ip_adapter"}`."""
    from pimg.formats.safetensors_io import read_safetensors, read_torch_weights

    path = find_ip_adapter_file(path)
    if path.suffix == ".safetensors":
        flat = read_safetensors(path, what="IP-Adapter file")
        weights: dict[str, dict[str, torch.Tensor]] = {section: {} for section in SECTIONS}
        for key, value in flat.items():
            section, _, name = key.partition(".")
            if section in weights:
                weights[section][name] = value
    else:
        weights = read_torch_weights(path, what="IP-Adapter file")
    if not all(isinstance(weights.get(s), dict) and weights[s] for s in SECTIONS):
        raise ModelLoadError(
            f"{path} is not an IP-Adapter file: it lacks the image_proj and ip_adapter weights. Pass an "
            "IP-Adapter or IP-Adapter-FaceID checkpoint (.bin or .safetensors), or one `pimg train id-adapter` wrote."
        )
    return weights


def find_ip_adapter_file(path: str | Path) -> Path:
    """`path` itself, or the IP-Adapter file inside the folder `path`."""
    path = Path(path)
    if path.is_dir():
        found = next((path / n for n in KNOWN_FILES if (path / n).is_file()), None)
        if found is None:
            raise ModelLoadError(f"{path} holds no IP-Adapter file (looked for {', '.join(KNOWN_FILES)}).")
        return found
    if not path.is_file():
        raise ModelLoadError(f"the IP-Adapter file {path} is missing; check the path.")
    if path.suffix not in (".bin", ".safetensors", ".pt", ".pth"):
        raise ModelLoadError(f"{path} is not an IP-Adapter file (.bin or .safetensors expected).")
    return path


def describe_ip_adapter(weights: dict[str, dict[str, torch.Tensor]]) -> IpAdapterInfo:
    """Kind, sizes and layers of an IP-Adapter state dict (see `IpAdapterInfo`)."""
    proj, layers = weights["image_proj"], weights["ip_adapter"]
    face_token_dim = 0
    if "perceiver_resampler.proj_in.weight" in proj:  # FaceID's MLP keys, and a resampler beside them
        embed_dim = proj["proj.0.weight"].shape[1]
        cross = proj["perceiver_resampler.proj_out.weight"].shape[0]
        kind, tokens = "faceid-plus", proj["proj.2.weight"].shape[0] // proj["norm.weight"].shape[0]
        face_token_dim = proj["perceiver_resampler.proj_in.weight"].shape[1]
    elif "proj.weight" in proj:
        embed_dim = proj["proj.weight"].shape[1]
        cross = proj["norm.weight"].shape[0]
        kind, tokens = "clip", proj["proj.weight"].shape[0] // cross
    elif "proj.0.weight" in proj and "proj.2.weight" in proj and "norm.weight" in proj:
        embed_dim = proj["proj.0.weight"].shape[1]
        cross = proj["norm.weight"].shape[0]
        kind, tokens = "faceid", proj["proj.2.weight"].shape[0] // cross
    elif {"latents", "proj_in.weight", "proj_out.weight"} <= set(proj):
        embed_dim = proj["proj_in.weight"].shape[1]
        cross = proj["proj_out.weight"].shape[0]
        kind, tokens = "plus", proj["latents"].shape[1]
    else:
        raise ModelLoadError(
            "this IP-Adapter's image projection is none of IP-Adapter's (proj, norm), IP-Adapter Plus' "
            f"(latents, proj_in, proj_out) or FaceID's (proj.0, proj.2, norm); its keys start {sorted(proj)[:4]}. "
            "pimg loads those three; load others with diffusers' pipe.load_ip_adapter directly."
        )
    num_layers = sum(1 for key in layers if key.endswith(".to_k_ip.weight"))
    has_lora = any(key.endswith("_lora.down.weight") for key in layers)
    return IpAdapterInfo(
        kind, int(embed_dim), int(cross), int(tokens), num_layers, has_lora, int(face_token_dim)
    )


def cross_attention_layers(unet) -> list[str]:
    """Names of the UNet's cross-attention processors, in the order IP-Adapter numbers them."""
    return [name for name in unet.attn_processors if not name.endswith("attn1.processor")]


def check_ip_adapter(info: IpAdapterInfo, unet, source: str = "the IP-Adapter") -> None:
    """Refuse an adapter made for another base family (width or number of cross-attention layers)."""
    width = unet.config.cross_attention_dim
    layers = len(cross_attention_layers(unet))
    if info.cross_attention_dim != width or info.num_layers != layers:
        raise ModelLoadError(
            f"{source} was made for a UNet with cross-attention width {info.cross_attention_dim} and "
            f"{info.num_layers} cross-attention layers; this base has width {width} and {layers} layers "
            "(SD 1.5: 768 and 16; SDXL: 2048 and 70; tiny: 128). Use the adapter made for this base family."
        )


def check_embedding(info: IpAdapterInfo, embedding: torch.Tensor, source: str = "the IP-Adapter") -> None:
    """Refuse an embedding whose size is not the one the adapter takes."""
    if (embedding.ndim == 2) != (info.kind == "plus"):
        wanted = (
            "tokens [T, D], the CLIP encoder's penultimate hidden states"
            if info.kind == "plus"
            else "one vector [D]"
        )
        raise InputError(
            f"the embedding has shape {tuple(embedding.shape)}, but {source} ({info.kind}) takes {wanted}. Make "
            "the embedding with the embedder the adapter was trained with (pimg.inference.id_adapter.embedder_for)."
        )
    if embedding.shape[-1] != info.embed_dim:
        takes = (
            "a 512-d ArcFace face embedding (insightface buffalo_l)"
            if info.kind.startswith("faceid")
            else (f"a {info.embed_dim}-d CLIP image embedding")
        )
        raise InputError(
            f"the embedding has {embedding.shape[-1]} numbers, but {source} takes {takes}. Make the embedding "
            "with the embedder the adapter was trained with."
        )


def check_face_tokens(
    info: IpAdapterInfo, tokens: torch.Tensor | None, source: str = "the IP-Adapter"
) -> None:
    """Refuse FaceID Plus without its face tokens, or with tokens of another CLIP width; others without any."""
    if info.kind != "faceid-plus":
        if tokens is not None:
            raise InputError(
                f"{source} ({info.kind}) takes no face tokens; they are for FaceID Plus adapters."
            )
        return
    if tokens is None or tokens.ndim != 2 or tokens.shape[-1] != info.face_token_dim:
        got = "none" if tokens is None else f"shape {tuple(tokens.shape)}"
        raise InputError(
            f"{source} is FaceID Plus: beside the face embedding it takes the aligned face's CLIP tokens "
            f"[T, {info.face_token_dim}] (the image encoder's penultimate hidden states), got {got}. Give it "
            "the photo (`--id-image`), with the CLIP image encoder it was trained with (ViT-H for h94's)."
        )


def save_ip_adapter(
    path: str | Path, weights: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str] | None = None
) -> Path:
    """Write the nested state dict as flat-named safetensors (`image_proj.*`, `ip_adapter.*`)."""
    from pimg.formats.safetensors_io import check_finite, write_safetensors_atomically

    flat = {f"{section}.{name}": t for section in SECTIONS for name, t in weights[section].items()}
    check_finite(flat, "IP-Adapter weights")
    return write_safetensors_atomically(path, flat, {"format": "pt", **(metadata or {})})


def ip_adapter_from_unet(unet) -> dict[str, dict[str, torch.Tensor]]:
    """The IP-Adapter a UNet has loaded (`unet._load_ip_adapter_weights`), back in IP-Adapter's layout.

    The inverse of diffusers' conversion: `image_embeds` -> `proj` (IP-Adapter), `ff.net.0.proj` ->
    `proj.0` and `ff.net.2` -> `proj.2` (FaceID); each cross-attention processor's `to_k_ip.0` /
    `to_v_ip.0` under its IP-Adapter index (1, 3, 5, ...); the companion LoRA (peft adapter
    `faceid_0`), when loaded, as `{i}.to_{q,k,v,out}_lora.{down,up}`. Used to save an adapter trained here.
    """
    from diffusers.models.embeddings import (
        ImageProjection,
        IPAdapterFaceIDImageProjection,
        IPAdapterPlusImageProjection,
    )

    hid = getattr(unet, "encoder_hid_proj", None)
    projections = getattr(hid, "image_projection_layers", None)
    if projections is None or len(projections) != 1:
        raise InputError("the UNet has no single IP-Adapter loaded (load one with load_ip_adapter first).")
    projection = projections[0]
    renames = {ImageProjection: {"image_embeds.": "proj."}}
    renames[IPAdapterFaceIDImageProjection] = {"ff.net.0.proj.": "proj.0.", "ff.net.2.": "proj.2."}
    if isinstance(projection, IPAdapterPlusImageProjection):
        image_proj = resampler_to_ip_adapter(projection.state_dict())
    elif type(projection) in renames:
        image_proj = {}
        for key, value in projection.state_dict().items():
            for old, new in renames[type(projection)].items():
                key = key.replace(old, new)
            image_proj[key] = value
    else:
        raise InputError(f"saving a {type(projection).__name__} projection is not supported.")
    companion = {}
    if COMPANION_LORA in getattr(unet, "peft_config", {}):
        from pimg.formats.lora import lora_state_dict_from_peft

        # the old attention-processor LoRA layout has no alpha: the export folds peft's scale into up
        companion = lora_state_dict_from_peft(unet, "unet", adapter_name=COMPANION_LORA)
    layers = {}
    for index, name in enumerate(unet.attn_processors):
        processor = unet.attn_processors[name]
        if hasattr(processor, "to_k_ip"):
            layers[f"{index}.to_k_ip.weight"] = processor.to_k_ip[0].weight
            layers[f"{index}.to_v_ip.weight"] = processor.to_v_ip[0].weight
        attention = name.removesuffix(".processor")
        for short, path in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0")):
            for half, file_half in (("lora_A", "down"), ("lora_B", "up")):
                weight = companion.get(f"unet.{attention}.{path}.{half}.weight")
                if weight is not None:
                    layers[f"{index}.{short}_lora.{file_half}.weight"] = weight
    return {"image_proj": image_proj, "ip_adapter": layers}


#: diffusers' names in IP-Adapter Plus' resampler block -> IP-Adapter's (the inverse of diffusers'
#: `_convert_ip_adapter_image_proj_to_diffusers`; its keys and values are split there, joined here).
_RESAMPLER_BLOCK_NAMES = {
    "ln0": "0.norm1",
    "ln1": "0.norm2",
    "attn.to_q": "0.to_q",
    "attn.to_out.0": "0.to_out",
    "ff.0": "1.0",
    "ff.1.net.0.proj": "1.1",
    "ff.1.net.2": "1.3",
}


def resampler_to_ip_adapter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An `IPAdapterPlusImageProjection` state dict (diffusers' names) in IP-Adapter Plus' own layout."""
    out = {}
    for key, value in state.items():
        if not key.startswith("layers."):
            out[key] = value
            continue
        _, depth, rest = key.split(".", 2)
        if rest.startswith("attn.to_v."):
            continue  # joined with to_k below
        if rest.startswith("attn.to_k."):
            suffix = rest.removeprefix("attn.to_k.")
            value = torch.cat([value, state[f"layers.{depth}.attn.to_v.{suffix}"]])
            out[f"layers.{depth}.0.to_kv.{suffix}"] = value
            continue
        module, _, suffix = rest.rpartition(".")
        out[f"layers.{depth}.{_RESAMPLER_BLOCK_NAMES[module]}.{suffix}"] = value
    return out
