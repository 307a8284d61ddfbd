"""LoRA files: the diffusers layout pimg uses, the kohya layout other tools share, and checks.

pimg keeps every LoRA in the layout `diffusers` `StableDiffusionPipeline.load_lora_weights` reads:
`{component}.{module}.lora_A.weight` / `.lora_B.weight` with the scale `alpha / rank` already folded
into `lora_B`, so the file needs no alpha (a rank-r LoRA with `lora_alpha == r`, scale 1). Component
is `unet`, `text_encoder` or `text_encoder_2`; module is the checkpoint name of the layer, e.g.
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight` or
`text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight`.

The kohya layout (sd-scripts, A1111, ComfyUI) names a layer `lora_unet_<module with . as _>` with
`.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha`; the underscores are resolved through
the real module tree of the base model, never guessed.

Example:
    >>> state_dict = load_lora_state_dict("out/my-lora", {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    >>> pipe.load_lora_weights(state_dict, adapter_name="subject")
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Literal

import torch

from pimg.errors import InputError, ModelLoadError
from pimg.formats.safetensors_io import (
    check_finite,
    read_safetensors,
    read_safetensors_metadata,
    read_torch_weights,
    write_safetensors_atomically,
)

__all__ = [
    "DIFFUSERS_LORA_FILENAME",
    "KOHYA_LORA_FILENAME",
    "detect_lora_format",
    "diffusers_to_kohya",
    "fold_scale",
    "kohya_module_map",
    "kohya_prefix",
    "kohya_to_diffusers",
    "load_lora_state_dict",
    "lora_state_dict_from_peft",
    "read_safetensors",
    "read_safetensors_metadata",
    "save_lora",
    "validate_lora",
]

DIFFUSERS_LORA_FILENAME = "pytorch_lora_weights.safetensors"
KOHYA_LORA_FILENAME = "lora_kohya.safetensors"

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# Older diffusers spellings, renamed to the peft spelling on load (diffusers itself accepts them too).
_OLD_DIFFUSERS_SUFFIXES = {
    ".lora.down.weight": ".lora_A.weight",
    ".lora.up.weight": ".lora_B.weight",
    ".lora_linear_layer.down.weight": ".lora_A.weight",
    ".lora_linear_layer.up.weight": ".lora_B.weight",
}
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
# Longest first, so `lora_te1_` is never read as `lora_te_` + "1_...".
_KOHYA_PREFIXES = ("lora_unet", "lora_te1", "lora_te2", "lora_te")
# diffusers' own LoRA config key: diffusers would rebuild a LoraConfig (with its lora_alpha) from it and
# scale our already-folded weights a second time.
_DIFFUSERS_CONFIG_METADATA_KEY = "lora_adapter_metadata"
# Classes whose checkpoint names carry a level the module tree lost (mirrors transformers'
# conversion_mapping `PrefixChange` entries for the text encoders pimg uses).
_FLATTENED_PREFIXES = {"CLIPTextModel": "text_model."}

_ACCEPTED_LAYOUTS = (
    "diffusers: 'unet.<module>.lora_A.weight' / '.lora_B.weight' (also '.lora.down.weight', "
    "'.lora_linear_layer.down.weight'), with 'text_encoder.' and 'text_encoder_2.' for the text encoders; "
    "kohya: 'lora_unet_<module>.lora_down.weight' / '.lora_up.weight' / '.alpha', with 'lora_te_', "
    "'lora_te1_' or 'lora_te2_' for the text encoders"
)
_BASE_HINT = (
    "The LoRA was most likely trained for another base family (for example an SDXL LoRA on an SD 1.5 "
    "base): pass --base with the family it was trained on."
)


# ------------------------------------------------------------------------------------ layout detection


def detect_lora_format(state_dict: dict[str, torch.Tensor]) -> Literal["diffusers", "kohya"]:
    """Tell which of the two LoRA layouts a state dict uses.

    Args:
        state_dict: the tensors of a LoRA file.

    Returns:
        "diffusers" (`unet.<module>.lora_A.weight`, also the older `.lora.down.weight` and
        `.lora_linear_layer.down.weight` spellings) or "kohya" (`lora_unet_<module>.lora_down.weight`).

    Raises:
        ModelLoadError: the keys follow neither layout; the message lists the first of them.

    Example:
        >>> detect_lora_format({"lora_unet_mid_block_attentions_0_proj_in.alpha": torch.tensor(4.0)})
        'kohya'
    """
    if not state_dict:
        raise ModelLoadError(f"The LoRA holds no tensors. Accepted layouts: {_ACCEPTED_LAYOUTS}.")
    if all(_kohya_prefix_of(key) is not None for key in state_dict):
        return "kohya"
    diffusers_suffixes = _LORA_SUFFIXES + tuple(_OLD_DIFFUSERS_SUFFIXES)
    if all(key.split(".", 1)[0] in COMPONENTS and key.endswith(diffusers_suffixes) for key in state_dict):
        return "diffusers"
    odd = [k for k in state_dict if _kohya_prefix_of(k) is None and not k.endswith(diffusers_suffixes)]
    first = ", ".join(repr(k) for k in (odd or list(state_dict))[:5])
    raise ModelLoadError(
        f"The LoRA's keys follow no layout pimg reads (first keys: {first}). Accepted layouts: "
        f"{_ACCEPTED_LAYOUTS}. LyCORIS (LoHa, LoKr), DoRA and bare peft exports are not supported: "
        "export the LoRA again in one of these layouts."
    )


def _kohya_prefix_of(key: str) -> str | None:
    return next((p for p in _KOHYA_PREFIXES if key.startswith(p + "_")), None)


def _to_peft_spelling(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the older diffusers spellings (`.lora.down.weight`, ...) to `.lora_A.weight`/`.lora_B.weight`."""
    renamed = {}
    for key, value in state_dict.items():
        for old, new in _OLD_DIFFUSERS_SUFFIXES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        renamed[key] = value
    return renamed


# --------------------------------------------------------------------------------- module name mapping


def is_peft_internal(name: str) -> bool:
    # Once peft wraps a layer, its tree grows `to_q.base_layer`, `to_q.lora_A.default`, ...; those are
    # not layers a LoRA file can name.
    return any(part == "base_layer" or part.startswith("lora_") for part in name.split("."))


def _checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """Checkpoint module name -> real module name for every layer a LoRA file can name.

    transformers >= 5 flattened `CLIPTextModel` (no `.text_model` level; its own conversion mapping
    strips the prefix when loading weights), while checkpoints, diffusers LoRA files and kohya files keep
    `text_model.`; the checkpoint name puts it back so files stay portable.
    """
    prefix = _FLATTENED_PREFIXES.get(type(model).__name__, "")
    if prefix and hasattr(model, prefix.rstrip(".")):  # an older transformers that still nests it
        prefix = ""
    return {prefix + name: name for name, _ in model.named_modules() if name and not is_peft_internal(name)}


class _LayerNames:
    """Checkpoint <-> real module names of one component, walked once per call (UNets have ~1,500 modules)."""

    def __init__(self, model: torch.nn.Module):
        self.to_real = _checkpoint_names(model)
        self.to_checkpoint = {real: checkpoint for checkpoint, real in self.to_real.items()}

    def resolve(self, name: str) -> str | None:
        """The real name for a checkpoint name or a real name; None when the model has no such layer."""
        if name in self.to_real:
            return self.to_real[name]
        return name if name in self.to_checkpoint else None


def kohya_prefix(component: str, components: dict[str, torch.nn.Module]) -> str:
    """The kohya key prefix of a component: `lora_unet`, `lora_te` (SD 1/2), `lora_te1`/`lora_te2` (SDXL).

    Args:
        component: "unet", "text_encoder" or "text_encoder_2".
        components: all components of the base; a `text_encoder_2` makes the first text encoder `lora_te1`.

    Returns:
        The prefix, without the trailing underscore.
    """
    if component == "unet":
        return "lora_unet"
    if component == "text_encoder":
        return "lora_te1" if "text_encoder_2" in components else "lora_te"
    if component == "text_encoder_2":
        return "lora_te2"
    raise InputError(f"Unknown LoRA component '{component}'. Valid components: {', '.join(COMPONENTS)}.")


def kohya_module_map(component_prefix: str, model: torch.nn.Module) -> dict[str, str]:
    """Map kohya layer names to the model's real dotted module names.

    kohya writes `down_blocks.0.attentions.0` as `down_blocks_0_attentions_0`, which loses where the
    dots were (`to_out.0` vs a layer called `to_out_0`); walking the real module tree is the only sure
    way back. Two modules that would get the same kohya name are both left out.

    Args:
        component_prefix: the kohya prefix, e.g. "lora_unet", "lora_te", "lora_te1", "lora_te2".
        model: the component the names refer to.

    Returns:
        e.g. `{"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q":
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", ...}`.

    Example:
        >>> kohya_module_map("lora_te", text_encoder)["lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
        'encoder.layers.0.self_attn.q_proj'
    """
    mapping: dict[str, str] = {}
    clashes: set[str] = set()
    for checkpoint_name, real_name in _checkpoint_names(model).items():
        kohya_name = f"{component_prefix}_{checkpoint_name.replace('.', '_')}"
        if kohya_name in mapping:
            clashes.add(kohya_name)
        mapping[kohya_name] = real_name
    for kohya_name in clashes:
        del mapping[kohya_name]
    return mapping


# ---------------------------------------------------------------------------------------- conversions


def kohya_to_diffusers(
    state_dict: dict[str, torch.Tensor], components: dict[str, torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """Convert a kohya-layout LoRA to pimg's diffusers layout, folding `alpha / rank` into `lora_B`.

    A kohya layer computes `W + (alpha / r) * up @ down`; with `lora_B = up * alpha / r` the result
    loads as a plain rank-r LoRA with `lora_alpha == r`. A layer without `.alpha` has alpha = rank.

    Args:
        state_dict: kohya keys (`lora_unet_...lora_down.weight`, `.lora_up.weight`, `.alpha`).
        components: "unet", "text_encoder" and optionally "text_encoder_2" of the base model.

    Returns:
        `{"unet.<module>.lora_A.weight": down, "unet.<module>.lora_B.weight": scaled up, ...}`, dtypes kept.

    Raises:
        ModelLoadError: a key names a layer the base does not have, or a layer lacks its up/down half.

    Example:
        >>> diffusers_sd = kohya_to_diffusers(read_safetensors("lora.safetensors"), {"unet": unet})
    """
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        suffix = next((s for s in _KOHYA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or _kohya_prefix_of(key) is None:
            raise ModelLoadError(
                f"kohya LoRA key '{key}' is not a plain LoRA weight (expected '.lora_down.weight', "
                "'.lora_up.weight' or '.alpha' after a 'lora_unet_'/'lora_te*_' name). LyCORIS (LoHa, "
                "LoKr) and DoRA files are not supported."
            )
        layers.setdefault(key[: -len(suffix)], {})[suffix] = value

    maps = {
        kohya_prefix(c, components): (c, kohya_module_map(kohya_prefix(c, components), m))
        for c, m in components.items()
    }
    names = {component: _LayerNames(model) for component, model in components.items()}
    converted: dict[str, torch.Tensor] = {}
    for kohya_name, parts in layers.items():
        component, real_name = _kohya_layer_target(kohya_name, maps, components)
        if ".lora_down.weight" not in parts or ".lora_up.weight" not in parts:
            raise ModelLoadError(
                f"kohya LoRA layer '{kohya_name}' has only {sorted(parts)}; it needs both '.lora_down.weight' "
                "and '.lora_up.weight'. The file is incomplete: export it again."
            )
        down, up = parts[".lora_down.weight"], parts[".lora_up.weight"]
        rank = down.shape[0]
        alpha = float(parts[".alpha"].item()) if ".alpha" in parts else float(rank)
        checkpoint_name = names[component].to_checkpoint[real_name]
        converted[f"{component}.{checkpoint_name}.lora_A.weight"] = down
        converted[f"{component}.{checkpoint_name}.lora_B.weight"] = fold_scale(up, alpha / rank)
    return converted


def _kohya_layer_target(
    kohya_name: str, maps: dict[str, tuple[str, dict[str, str]]], components: dict[str, torch.nn.Module]
) -> tuple[str, str]:
    prefix = _kohya_prefix_of(kohya_name)
    if prefix not in maps:
        expected = ", ".join(f"{p}_ ({c})" for p, (c, _) in maps.items())
        family = "SDXL" if prefix in ("lora_te1", "lora_te2") else "SD 1.x/2.x"
        raise ModelLoadError(
            f"kohya LoRA layer '{kohya_name}' uses the prefix '{prefix}_', which fits a {family} base; this "
            f"base has {expected}. {_BASE_HINT}"
        )
    component, module_map = maps[prefix]
    if kohya_name not in module_map:
        if prefix == "lora_unet" and kohya_name.startswith(
            ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")
        ):
            raise ModelLoadError(
                f"kohya LoRA layer '{kohya_name}' uses the original SGM UNet names (input_blocks/middle_block/"
                "output_blocks, as sd-scripts writes SDXL LoRAs), which pimg does not convert. Load this file "
                "directly with diffusers `pipe.load_lora_weights(path)`, which remaps SGM names."
            )
        raise ModelLoadError(
            f"kohya LoRA layer '{kohya_name}' names no layer of the base {component} "
            f"({type(components[component]).__name__}). {_BASE_HINT}"
        )
    return component, module_map[kohya_name]


def fold_scale(lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Multiply `lora_B` by a LoRA scale (alpha / rank) in float32, keeping its dtype.

    Args:
        lora_b: the up projection, [out, r] or [out, r, 1, 1].
        scale: alpha / rank (alpha / sqrt(rank) for rsLoRA).

    Returns:
        `lora_b` itself when scale is 1 (so round trips stay bit-exact), else a new scaled tensor.
    """
    if scale == 1.0:
        return lora_b
    return (lora_b.float() * scale).to(lora_b.dtype)


def diffusers_to_kohya(
    state_dict: dict[str, torch.Tensor], components: dict[str, torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """Export a diffusers-layout LoRA (scale folded) in the kohya layout, with `.alpha = rank`.

    Args:
        state_dict: `{component}.{module}.lora_A.weight` / `.lora_B.weight` keys.
        components: the base's components; they pick `lora_te` vs `lora_te1` and check every layer exists.

    Returns:
        `{"lora_unet_<module>.lora_down.weight": A, ".lora_up.weight": B, ".alpha": rank}`, dtypes kept.

    Example:
        >>> kohya_sd = diffusers_to_kohya(state_dict, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    """
    names = {component: _LayerNames(model) for component, model in components.items()}
    converted: dict[str, torch.Tensor] = {}
    for key, value in _to_peft_spelling(state_dict).items():
        component, module_name, half = _split_diffusers_key(key, components)
        real_name = names[component].resolve(module_name)
        if real_name is None:
            raise ModelLoadError(f"LoRA layer '{key}' names no layer of the base {component}. {_BASE_HINT}")
        checkpoint_name = names[component].to_checkpoint[real_name]
        kohya_name = f"{kohya_prefix(component, components)}_{checkpoint_name.replace('.', '_')}"
        if half == "lora_A":
            converted[f"{kohya_name}.lora_down.weight"] = value
            converted[f"{kohya_name}.alpha"] = torch.tensor(float(value.shape[0]), dtype=value.dtype)
        else:
            converted[f"{kohya_name}.lora_up.weight"] = value
    return converted


def _split_diffusers_key(key: str, components: dict[str, torch.nn.Module]) -> tuple[str, str, str]:
    """`unet.a.b.lora_A.weight` -> ("unet", "a.b", "lora_A"), with errors for unknown parts."""
    component, _, rest = key.partition(".")
    if not key.endswith(_LORA_SUFFIXES) or component not in COMPONENTS:
        raise ModelLoadError(
            f"LoRA key '{key}' is not in the diffusers layout ('{{component}}.<module>.lora_A.weight' or "
            f"'.lora_B.weight', component one of {', '.join(COMPONENTS)})."
        )
    if component not in components:
        family = "SDXL" if component == "text_encoder_2" else "a base with that component"
        raise ModelLoadError(
            f"LoRA layer '{key}' is for the {component}, which this base does not have (it has "
            f"{', '.join(components)}); it fits {family}. {_BASE_HINT}"
        )
    module_name, _, half = rest[: -len(".weight")].rpartition(".")
    return component, module_name, half


# ------------------------------------------------------------------------------------------ validation


def validate_lora(state_dict: dict[str, torch.Tensor], components: dict[str, torch.nn.Module]) -> None:
    """Check that a diffusers-layout LoRA fits the base: every layer exists and every shape matches.

    `lora_A.weight` must be [r, in_features] ([r, in_channels, kh, kw] for a Conv2d) and `lora_B.weight`
    [out_features, r] ([out_channels, r, 1, 1]), with the same r.

    Args:
        state_dict: `{component}.{module}.lora_A.weight` / `.lora_B.weight` keys.
        components: "unet", "text_encoder" and optionally "text_encoder_2" of the base.

    Raises:
        ModelLoadError: on the first layer that does not fit, naming it, the expected and the found shape.

    Example:
        >>> validate_lora(state_dict, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    """
    names = {component: _LayerNames(model) for component, model in components.items()}
    for key, value in state_dict.items():
        component, module_name, half = _split_diffusers_key(key, components)
        model = components[component]
        real_name = names[component].resolve(module_name)
        if real_name is None:
            raise ModelLoadError(
                f"LoRA layer '{key}' names no layer of the base {component} ({type(model).__name__}). {_BASE_HINT}"
            )
        partner_key = key.replace(
            f".{half}.weight", ".lora_B.weight" if half == "lora_A" else ".lora_A.weight"
        )
        if partner_key not in state_dict:
            raise ModelLoadError(
                f"LoRA layer '{key}' has no matching '{partner_key}'. The file is incomplete: export it again."
            )
        rank = (value if half == "lora_A" else state_dict[partner_key]).shape[0]
        expected = _expected_shape(model.get_submodule(real_name), half, rank, key)
        if tuple(value.shape) != expected:
            raise ModelLoadError(
                f"LoRA layer '{key}' does not fit the base {component}: expected shape {list(expected)}, "
                f"found {list(value.shape)}. {_BASE_HINT}"
            )


def _expected_shape(module: torch.nn.Module, half: str, rank: int, key: str) -> tuple[int, ...]:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if isinstance(base, torch.nn.Linear):
        return (rank, base.in_features) if half == "lora_A" else (base.out_features, rank)
    if isinstance(base, torch.nn.Conv2d):
        if half == "lora_A":
            return (rank, base.in_channels, *base.kernel_size)
        return (base.out_channels, rank, 1, 1)
    raise ModelLoadError(
        f"LoRA layer '{key}' targets a {type(base).__name__}; pimg loads LoRAs on Linear and Conv2d layers only."
    )


# ------------------------------------------------------------------------------------- save and load


def save_lora(
    path_or_dir: str | os.PathLike,
    state_dict: dict[str, torch.Tensor],
    *,
    kohya_components: dict[str, torch.nn.Module] | None = None,
    metadata: dict[str, object] | None = None,
) -> Path:
    """Write a diffusers-layout LoRA (and optionally its kohya export beside it), atomically.

    Args:
        path_or_dir: a folder (the file is `pytorch_lora_weights.safetensors` inside it) or a
            `.safetensors` file path.
        state_dict: diffusers layout with the scale folded, e.g. from `lora_state_dict_from_peft`.
        kohya_components: the base's components; when given, `lora_kohya.safetensors` is written too.
        metadata: strings stored in the safetensors header (base model, token, rank, ...); other values
            are stored as JSON.

    Returns:
        The path of the diffusers-layout file.

    Example:
        >>> save_lora("out/run1", sd, metadata={"pimg.base": "sd15", "pimg.rank": 4})
    """
    bad = next(
        (k for k in state_dict if not k.endswith(_LORA_SUFFIXES) or k.split(".")[0] not in COMPONENTS), None
    )
    if bad is not None:
        raise InputError(
            f"save_lora got key '{bad}', which is not in the diffusers layout '{{component}}.<module>.lora_A."
            "weight'. Convert kohya dicts with kohya_to_diffusers and peft models with lora_state_dict_from_peft."
        )
    metadata = dict(metadata or {})
    if _DIFFUSERS_CONFIG_METADATA_KEY in metadata:
        raise InputError(
            f"metadata key '{_DIFFUSERS_CONFIG_METADATA_KEY}' is reserved: diffusers would rebuild a LoraConfig "
            "from it and scale the already-folded weights again. Store the values under other keys."
        )
    header = {"format": "pt"} | {
        str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()
    }

    path = Path(path_or_dir)
    if path.suffix != ".safetensors":
        path = path / DIFFUSERS_LORA_FILENAME
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors_atomically(path, state_dict, header)
    if kohya_components is not None:
        kohya = diffusers_to_kohya(state_dict, kohya_components)
        write_safetensors_atomically(path.with_name(KOHYA_LORA_FILENAME), kohya, header)
    return path


def load_lora_state_dict(
    path: str | os.PathLike, components: dict[str, torch.nn.Module]
) -> dict[str, torch.Tensor]:
    """Read a LoRA file in either layout and return it in diffusers layout, checked against the base.

    Args:
        path: a LoRA file (`.safetensors`; `.bin`/`.pt` read with `weights_only=True`) or a folder holding
            `pytorch_lora_weights.safetensors`.
        components: "unet", "text_encoder" and optionally "text_encoder_2" of the base.

    Returns:
        A dict ready for `pipe.load_lora_weights(state_dict, adapter_name=...)`.

    Raises:
        ModelLoadError: unreadable file, unknown layout, a LoRA that does not fit the base, or NaN/Inf
            weights (the first such tensor named).

    Example:
        >>> sd = load_lora_state_dict("lora_kohya.safetensors", {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    """
    path = Path(path)
    if path.is_dir():
        folder, path = path, path / DIFFUSERS_LORA_FILENAME
        if not path.exists():
            found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt"))
            raise ModelLoadError(
                f"LoRA folder '{folder}' has no {DIFFUSERS_LORA_FILENAME} (weights files there: "
                f"{', '.join(found) or 'none'}). Pass the LoRA file itself."
            )
    if path.suffix == ".safetensors":
        state_dict = read_safetensors(path, what="LoRA file")
    else:
        state_dict = read_torch_weights(path, what="LoRA file")
        if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise ModelLoadError(
                f"LoRA file '{path}' does not hold a flat name -> tensor dictionary. Export it again as .safetensors."
            )
    return prepare_lora_state_dict(state_dict, components, what=f"LoRA file '{path}'")


def prepare_lora_state_dict(
    state_dict: dict[str, torch.Tensor], components: dict[str, torch.nn.Module], what: str = "LoRA"
) -> dict[str, torch.Tensor]:
    """LoRA weights in either layout, in memory -> diffusers layout, checked against the base.

    The in-memory half of `load_lora_state_dict` (a hypernetwork's prediction takes this road).

    Raises:
        ModelLoadError: not a dict of tensors, an unknown layout, a LoRA that does not fit the base, or
            a tensor holding NaN or Inf (named, as the file names it).

    Example:
        >>> sd = prepare_lora_state_dict(predicted, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    """
    if not state_dict or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ModelLoadError(f"{what} is not a non-empty name -> tensor dictionary.")
    check_finite(state_dict, what)  # before conversion, so the message names the tensor as the file does
    if detect_lora_format(state_dict) == "kohya":
        state_dict = kohya_to_diffusers(state_dict, components)
    else:
        state_dict = _to_peft_spelling(state_dict)
    validate_lora(state_dict, components)
    return state_dict


# ------------------------------------------------------------------------------------------------ peft


def lora_state_dict_from_peft(
    model: torch.nn.Module, component_prefix: str, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """Pull one peft LoRA adapter out of a model in pimg's diffusers layout, with its scale folded.

    Each layer's own `lora_alpha / r` (`/ sqrt(r)` with rsLoRA) is used, so `rank_pattern` and
    `alpha_pattern` count; scales set at run time (`set_adapters` weights) do not.

    Args:
        model: a UNet or text encoder carrying the adapter (`add_adapter`, `load_lora_weights`, ...).
        component_prefix: "unet", "text_encoder" or "text_encoder_2".
        adapter_name: the peft adapter to export.

    Returns:
        `{"{component_prefix}.<module>.lora_A.weight": ..., ".lora_B.weight": scaled}`, detached copies.

    Example:
        >>> save_lora("out/run1", lora_state_dict_from_peft(pipe.unet, "unet", adapter_name="subject"))
    """
    from peft import get_peft_model_state_dict

    if component_prefix not in COMPONENTS:
        raise InputError(f"Unknown component_prefix '{component_prefix}'. Valid: {', '.join(COMPONENTS)}.")
    adapters = list(getattr(model, "peft_config", {}))
    if adapter_name not in adapters:
        raise InputError(
            f"{type(model).__name__} has no LoRA adapter '{adapter_name}' (adapters: {', '.join(adapters) or 'none'}). "
            "Pass one of those as adapter_name."
        )
    peft_state_dict = get_peft_model_state_dict(model, adapter_name=adapter_name)
    to_checkpoint = _LayerNames(model).to_checkpoint
    exported: dict[str, torch.Tensor] = {}
    for key, value in peft_state_dict.items():
        if not key.endswith(_LORA_SUFFIXES):
            raise InputError(
                f"Adapter '{adapter_name}' has weight '{key}', which a plain LoRA file cannot hold (DoRA, LoRA "
                "bias or embedding LoRA). Train it with use_dora=False, lora_bias=False on Linear/Conv2d layers."
            )
        real_name, half = key[: -len(".weight")].rsplit(".", 1)
        layer = model.get_submodule(real_name)
        value = value.detach().clone()
        if half == "lora_B":
            rank, alpha = layer.r[adapter_name], layer.lora_alpha[adapter_name]
            value = fold_scale(
                value, alpha / (math.sqrt(rank) if layer.use_rslora.get(adapter_name) else rank)
            )
        exported[f"{component_prefix}.{to_checkpoint[real_name]}.{half}.weight"] = value
    return exported
