"""The Lightweight DreamBooth (LiDB) weight space a hypernetwork predicts (HyperDreamBooth, sec. 3.1).

HyperDreamBooth (Ruiz et al. 2023, "HyperDreamBooth: HyperNetworks for Fast Personalization of
Text-to-Image Models", sec. 3.1 "Lightweight DreamBooth") factors each rank-r LoRA of a target layer
`W' = W + up @ down` once more through frozen random orthogonal bases:

    down = a @ A_aux      a [r x d_down],  A_aux [d_down x in]   (orthonormal rows)
    up   = B_aux @ b      b [d_up x r],    B_aux [out x d_up]    (orthonormal columns)

Only `a` and `b` are trained or predicted: with the paper's d_down 100, d_up 50, r 1 that is 150
numbers per layer, whatever the layer's width. The bases are never stored: they are drawn again from
the space's seed and each layer's name, so a prediction is only (config, factors).

A prediction `expand`s to an ordinary rank-r LoRA in pimg's diffusers layout (`pimg.formats.lora`), which
`pipe.load_lora_weights` reads and `save_lora` writes with its kohya export, as `pimg train lora` does.
For training, `apply_per_sample` adds a different subject's LoRA to each row of one batched UNet call
through forward hooks, which peft's layers cannot do (one adapter per call, not per row).

Example:
    >>> space = LidbSpace.from_unet(pipe.unet)                     # d_down 100, d_up 50, rank 1
    >>> factors = space.split(torch.randn(space.size) * 1e-2)       # one subject
    >>> pipe.load_lora_weights(space.expand(factors), adapter_name="subject")
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from pimg.errors import InputError
from pimg.formats.lora import is_peft_internal

__all__ = [
    "DEFAULT_TARGETS",
    "LidbConfig",
    "LidbLayer",
    "LidbSpace",
    "apply_per_sample",
    "save_lidb_lora",
]

#: SD/SDXL UNet attention projections of every attention layer (self and cross): the targets of
#: HyperDreamBooth and of `pimg train lora` (`pimg.trainers.lora.UNET_TARGETS`, which hypernets/ may not
#: import; keep the two equal).
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

#: One subject's factors: per target layer, in `LidbSpace.layers` order, `(a [.., r, d_down], b [.., d_up, r])`;
#: a batch of subjects carries a leading batch dimension on every tensor.
Factors = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class LidbConfig:
    """The shape of a LiDB weight space; with the UNet it fixes every basis, so it is saved with predictions.

    Attributes:
        target_modules: UNet Linear layers that get a LoRA, as name suffixes matched the way peft's
            `target_modules` list is (`name == t` or `name.endswith("." + t)`).
        d_down: rows of each down basis `A_aux`, the length of `a` (HyperDreamBooth: 100).
        d_up: columns of each up basis `B_aux`, the length of `b` (HyperDreamBooth: 50).
        rank: LoRA rank r (HyperDreamBooth: 1).
        seed: draws every basis, together with the layer's name.
        scale: the delta weight is `scale * up @ down`; `expand` folds it into `lora_B`.
    """

    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    d_down: int = 100
    d_up: int = 50
    rank: int = 1
    seed: int = 0
    scale: float = 1.0

    def __post_init__(self):
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise InputError("target_modules is empty; give at least one, e.g. to_q,to_k,to_v,to_out.0.")
        for name in ("d_down", "d_up", "rank"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.rank > min(self.d_down, self.d_up):
            raise InputError(
                f"rank {self.rank} exceeds min(d_down, d_up) = {min(self.d_down, self.d_up)}: the extra rank "
                "would be wasted. Lower rank or raise d_down/d_up."
            )
        if self.seed < 0:
            raise InputError(f"seed must be >= 0 (it is stored with every prediction), got {self.seed}.")


@dataclass(frozen=True)
class LidbLayer:
    """One target layer: its real module name in the UNet and its Linear's sizes."""

    name: str
    in_features: int
    out_features: int


def semi_orthogonal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A random [rows x cols] matrix with orthonormal rows (rows <= cols) or columns (rows > cols).

    The QR factor of a Gaussian matrix, its signs fixed by R's diagonal so the draw is Haar-uniform and
    unique (Mezzadri 2007, "How to generate random matrices from the classical compact groups"). Drawn
    and factored in float64 on the CPU, so the same generator state gives the same basis everywhere.

    Example:
        >>> q = semi_orthogonal(3, 8, torch.Generator().manual_seed(0)); torch.allclose(q @ q.T, torch.eye(3, dtype=q.dtype))
        True
    """
    tall = max(rows, cols), min(rows, cols)
    q, r = torch.linalg.qr(torch.randn(*tall, generator=generator, dtype=torch.float64))
    q = q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)
    return (q if rows >= cols else q.T).float()


def _layer_generator(seed: int, name: str, which: str) -> torch.Generator:
    # A stable hash (not Python's salted `hash`), so a layer's basis depends on (seed, name) only, never
    # on the process, the layer order or which other layers are targeted.
    digest = hashlib.sha256(f"lidb:{seed}:{name}:{which}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class LidbSpace(nn.Module):
    """Frozen random bases of every target layer, and the maps between factors, flat vectors and LoRAs.

    An `nn.Module` so the bases (non-persistent buffers: they are drawn again, never saved) follow the
    hypernetwork holding the space through `.to(device)` and accelerate's device placement.

    When d_down > in_features (SD's 320-wide layers have room for 100; `tiny`'s 64-wide ones do not),
    `A_aux` keeps d_down rows and gets orthonormal *columns* instead (`A_aux.T @ A_aux = I`): every `a`
    still maps onto a down projection, every down projection is reached, and every layer keeps the same
    number of factors, so one output head serves all layers. Likewise `B_aux` gets orthonormal rows when
    d_up > out_features. In both cases `a @ A_aux` never grows a norm (`||down|| <= ||a||`).

    Flat layout: layer after layer in `layers` order, each layer's `a` then `b`, row-major; so a
    hypernetwork head's output `[B, len(layers), numbers_per_layer]` is `flat.view(B, -1)`.

    Args:
        layers: the target layers, in a fixed order.
        config: the space's shape and seed.

    Example:
        >>> space = LidbSpace.from_unet(load_base("tiny").unet, LidbConfig(seed=7))
        >>> space.numbers_per_layer, space.size  # tiny: 56 attention projections (SD 1.5: 128)
        (150, 8400)
    """

    def __init__(self, layers: Sequence[LidbLayer], config: LidbConfig):
        super().__init__()
        if not layers:
            raise InputError("LidbSpace needs at least one target layer.")
        self.config = config
        self.layers = tuple(layers)
        for i, layer in enumerate(self.layers):
            down_basis = semi_orthogonal(
                config.d_down, layer.in_features, _layer_generator(config.seed, layer.name, "down")
            )
            up_basis = semi_orthogonal(
                layer.out_features, config.d_up, _layer_generator(config.seed, layer.name, "up")
            )
            # Buffer names cannot hold the module's dots: index them, `layers[i]` names the layer.
            self.register_buffer(f"down_basis_{i}", down_basis, persistent=False)
            self.register_buffer(f"up_basis_{i}", up_basis, persistent=False)

    @classmethod
    def from_unet(cls, unet: nn.Module, config: LidbConfig | None = None) -> LidbSpace:
        """The space over every Linear of `unet` whose name ends in one of `config.target_modules`.

        Args:
            unet: a diffusers `UNet2DConditionModel` (any module tree works); peft-wrapped layers count
                by their base Linear.
            config: shape and seed; None: HyperDreamBooth's defaults.

        Raises:
            InputError: no layer matches, or a matching layer is not a Linear.

        Example:
            >>> space = LidbSpace.from_unet(pipe.unet, LidbConfig(target_modules=("to_k", "to_v")))
        """
        config = config or LidbConfig()
        layers = []
        for name, module in unet.named_modules():
            if is_peft_internal(name) or not any(
                name == t or name.endswith("." + t) for t in config.target_modules
            ):
                continue
            linear = _base_linear(module, name)
            layers.append(LidbLayer(name, linear.in_features, linear.out_features))
        if not layers:
            some = sorted({n.rsplit(".", 1)[-1] for n, m in unet.named_modules() if isinstance(m, nn.Linear)})
            raise InputError(
                f"target_modules {list(config.target_modules)} match no layer of the {type(unet).__name__}. "
                f"Its Linear layers end in: {', '.join(some[:12]) or 'none'}."
            )
        return cls(layers, config)

    # ---------------------------------------------------------------------------------------- sizes

    @property
    def numbers_per_layer(self) -> int:
        """Factors per layer, r * (d_down + d_up): HyperDreamBooth's 150."""
        return self.config.rank * (self.config.d_down + self.config.d_up)

    @property
    def size(self) -> int:
        """Length of a flat factor vector: numbers_per_layer * len(layers)."""
        return self.numbers_per_layer * len(self.layers)

    def bases(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(A_aux [d_down x in], B_aux [out x d_up])` of `layers[index]`."""
        return getattr(self, f"down_basis_{index}"), getattr(self, f"up_basis_{index}")

    # ------------------------------------------------------------------------------ flat <-> factors

    def split(self, flat: torch.Tensor) -> Factors:
        """A flat vector `[..., size]` -> per layer `(a [..., r, d_down], b [..., d_up, r])`, as views.

        Leading dimensions (a batch of subjects) are kept; gradients flow through.

        Example:
            >>> a, b = space.split(torch.zeros(4, space.size))[0]; a.shape, b.shape
            (torch.Size([4, 1, 100]), torch.Size([4, 50, 1]))
        """
        if flat.shape[-1:] != (self.size,):
            raise InputError(
                f"a flat LiDB vector has {self.size} numbers in its last dimension "
                f"({len(self.layers)} layers x {self.numbers_per_layer}); got shape {list(flat.shape)}."
            )
        c, lead = self.config, flat.shape[:-1]
        per_layer = flat.reshape(*lead, len(self.layers), self.numbers_per_layer)
        a_part, b_part = per_layer.split([c.rank * c.d_down, c.d_up * c.rank], dim=-1)
        return [
            (
                a_part[..., i, :].reshape(*lead, c.rank, c.d_down),
                b_part[..., i, :].reshape(*lead, c.d_up, c.rank),
            )
            for i in range(len(self.layers))
        ]

    def join(self, factors: Factors) -> torch.Tensor:
        """The inverse of `split`: per-layer `(a, b)` -> a flat `[..., size]` vector."""
        self._check_factors(factors)
        return torch.cat([torch.cat([a.flatten(-2), b.flatten(-2)], dim=-1) for a, b in factors], dim=-1)

    def _check_factors(self, factors: Factors, batched: bool | None = None) -> tuple[int, ...]:
        """Check shapes against the space; returns the leading (batch) shape they share."""
        c = self.config
        if len(factors) != len(self.layers):
            raise InputError(
                f"LiDB factors hold {len(factors)} layers; this space has {len(self.layers)}. Use the space "
                "that made them (same UNet, target_modules and config)."
            )
        lead = factors[0][0].shape[:-2]
        for layer, (a, b) in zip(self.layers, factors, strict=True):
            if a.shape != (*lead, c.rank, c.d_down) or b.shape != (*lead, c.d_up, c.rank):
                raise InputError(
                    f"LiDB factors of layer '{layer.name}' have shapes a {list(a.shape)}, b {list(b.shape)}; "
                    f"this space (rank {c.rank}, d_down {c.d_down}, d_up {c.d_up}) needs a [..., {c.rank}, "
                    f"{c.d_down}] and b [..., {c.d_up}, {c.rank}] with the same leading shape as layer 0."
                )
        if batched is not None and (len(lead) == 1) != batched:
            want = "one leading batch dimension" if batched else "no batch dimension"
            raise InputError(f"LiDB factors here need {want}; got leading shape {list(lead)}.")
        return tuple(lead)

    # ------------------------------------------------------------------------------- LoRA weights

    def lora_factors(self, factors: Factors) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer `(down [..., r, in], up [..., out, r])`, with `down = a @ A_aux`, `up = B_aux @ b`.

        HyperDreamBooth sec. 3.1; `scale` is not applied here. Differentiable in the factors.
        """
        self._check_factors(factors)
        out = []
        for i, (a, b) in enumerate(factors):
            down_basis, up_basis = self.bases(i)
            out.append((a @ down_basis.to(a), up_basis.to(b) @ b))
        return out

    def expand(self, factors: Factors) -> dict[str, torch.Tensor]:
        """One subject's factors -> a rank-r LoRA in pimg's diffusers layout, `scale` folded into lora_B.

        Keys are `unet.<module>.lora_A.weight` [r x in] and `.lora_B.weight` [out x r]: what
        `pipe.load_lora_weights(state_dict, adapter_name=...)` reads (diffusers infers lora_alpha = r,
        scale 1) and `pimg.formats.lora.save_lora` writes with its kohya export.

        Args:
            factors: one subject (no batch dimension), e.g. `space.split(flat)` of a `[size]` vector.

        Returns:
            Detached, contiguous float tensors on the factors' device.

        Example:
            >>> pipe.load_lora_weights(space.expand(factors), adapter_name="subject")
        """
        from pimg.formats.lora import fold_scale

        self._check_factors(factors, batched=False)
        state_dict = {}
        with torch.no_grad():
            for layer, (down, up) in zip(self.layers, self.lora_factors(factors), strict=True):
                # UNet module names are their checkpoint names (only CLIPTextModel lost a level).
                state_dict[f"unet.{layer.name}.lora_A.weight"] = down.detach().contiguous().clone()
                state_dict[f"unet.{layer.name}.lora_B.weight"] = (
                    fold_scale(up.detach(), self.config.scale).contiguous().clone()
                )
        return state_dict


def save_lidb_lora(
    out_dir,
    space: LidbSpace,
    factors: Factors,
    components: dict[str, nn.Module],
    metadata: dict | None = None,
):
    """Write one subject's prediction as `pimg train lora` writes a LoRA: diffusers file + kohya export.

    The LiDB config is stored in the header (`pimg.lidb`), so the factors can be read back by projecting
    onto the same bases; the weights themselves are an ordinary LoRA.

    Args:
        out_dir: the result folder (or a `.safetensors` path), as `save_lora` takes it.
        space: the space the factors belong to.
        factors: one subject's factors.
        components: the base's "unet" and text encoder(s); they name the kohya prefixes and check every layer.
        metadata: more header entries (`pimg.method`, `pimg.base`, `pimg.token`, ...).

    Returns:
        The path of the diffusers-layout file.

    Example:
        >>> save_lidb_lora("out/subject", space, factors, {"unet": pipe.unet, "text_encoder": pipe.text_encoder})
    """
    from pimg.formats.lora import prepare_lora_state_dict, save_lora

    state_dict = prepare_lora_state_dict(space.expand(factors), components, what="LiDB prediction")
    header = {"pimg.rank": space.config.rank, "pimg.lidb": asdict(space.config)} | dict(metadata or {})
    return save_lora(out_dir, state_dict, kohya_components=components, metadata=header)


# ------------------------------------------------------------------------------ per-sample application


@contextmanager
def apply_per_sample(unet: nn.Module, space: LidbSpace, factors: Factors) -> Iterator[None]:
    """Within the block, every UNet call adds subject i's LiDB LoRA to the rows of subject i.

    peft applies one adapter to a whole batch; training a hypernetwork needs a different LoRA per row in
    one UNet call. A forward hook on each target layer adds `scale * (x @ down_i^T) @ up_i^T` per row
    (einsum), with `down_i, up_i` recomputed from the factors on every call, so autograd reaches the
    factors (and the hypernetwork behind them) through any number of UNet calls and backward passes,
    gradient checkpointing included. The hooks are removed on exit, even after an error.

    Row mapping: a UNet batch of N rows with B subjects (N a multiple of B) gives row j subject j % B:
    diffusers' classifier-free guidance stacks `[uncond rows ..., cond rows ...]`, each block in subject
    order. Rows that should see the base model (HM-CFG's base rows) get all-zero factors.

    Args:
        unet: the UNet the space was built on (hooks go on the outer module of peft-wrapped layers, so
            the LiDB delta adds to any loaded adapter).
        space: the LiDB space, on the UNet's device.
        factors: per layer `(a [B, r, d_down], b [B, d_up, r])`, e.g. `space.split(flat)` of `[B, size]`.

    Example:
        >>> with apply_per_sample(pipe.unet, space, space.split(hypernet(photos))):
        ...     loss = F.mse_loss(pipe.unet(noisy, t, text).sample, noise)
        >>> loss.backward()
    """
    (batch,) = space._check_factors(factors, batched=True)
    handles = []
    try:
        for i, layer in enumerate(space.layers):
            module = unet.get_submodule(layer.name)
            linear = _base_linear(module, layer.name)
            if (linear.in_features, linear.out_features) != (layer.in_features, layer.out_features):
                raise InputError(
                    f"layer '{layer.name}' is {linear.in_features} -> {linear.out_features} in this UNet but "
                    f"{layer.in_features} -> {layer.out_features} in the LiDB space: build the space on this UNet."
                )
            handles.append(module.register_forward_hook(_row_lora_hook(space, i, factors[i], batch)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _row_lora_hook(space: LidbSpace, index: int, factor: tuple[torch.Tensor, torch.Tensor], batch: int):
    a, b = factor
    down_basis, up_basis = space.bases(index)
    scale = space.config.scale
    name = space.layers[index].name

    def hook(module, args, output):
        x = args[0]
        rows = x.shape[0]
        if rows % batch:
            raise InputError(
                f"the UNet batch has {rows} rows at '{name}', not a multiple of the {batch} subjects' factors. "
                "Give one factor row per subject and stack the batch as [block 1 ..., block 2 ...]."
            )
        # Computed here, not once on entry: each call builds its own graph to the factors.
        down = (a @ down_basis.to(a)).to(x.dtype)  # [B, r, in]
        up = (up_basis.to(b) @ b).to(x.dtype)  # [B, out, r]
        if rows != batch:  # row j -> subject j % B
            down, up = down.repeat(rows // batch, 1, 1), up.repeat(rows // batch, 1, 1)
        hidden = torch.einsum("n...i,nri->n...r", x, down)
        return output + scale * torch.einsum("n...r,nor->n...o", hidden, up)

    return hook


def _base_linear(module: nn.Module, name: str) -> nn.Linear:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    if not isinstance(base, nn.Linear):
        raise InputError(
            f"target layer '{name}' is a {type(base).__name__}; LiDB targets Linear layers only. Narrow "
            "target_modules, e.g. to to_q,to_k,to_v,to_out.0."
        )
    return base
