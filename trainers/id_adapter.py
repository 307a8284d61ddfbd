"""Tuning-free ID adapter (IP-Adapter, Ye et al. 2023; IP-Adapter Plus; IP-Adapter-FaceID): train the
image prompt once, then personalize from one photo with no training.

What learns: the image projection (IP-Adapter: a linear map of the CLIP embedding to 4 tokens of
cross-attention width; Plus: a resampler, `num_tokens` learned queries attending to the CLIP
encoder's penultimate hidden states; FaceID: an MLP of the face embedding) and, beside each
cross-attention layer, the decoupled keys and values `to_k_ip`, `to_v_ip` (initialised from the
layer's `to_k` / `to_v`, so at step 0 the image tokens are read like text tokens); with `lora_rank`,
also FaceID's companion LoRA on every attention layer. The UNet, VAE, text encoder and the image
embedder stay frozen. The model is diffusers' own: the adapter is loaded with `pipe.load_ip_adapter`
and trained through the same attention processors that generate with it, so what is trained is what
a user loads.

Data: each example conditions on one photo of a subject and takes the loss on another photo of it
(Ye et al. train on image-caption pairs of one image; here the two photos differ in size, position and
background, so the adapter learns the subject, not the photo's layout). About 5% of examples drop the
image embedding (the unconditional embedding diffusers uses: zeros; for Plus an all-zero image's
hidden states), 5% the text and 5% both, so classifier-free guidance works at inference (Ye et al.,
sec. 3.3). On `tiny` the subjects come from the toy world's unlimited subject generator (never an
evaluation subject); on real bases from a folder of subjects (`data/<subject>/*.jpg` with optional
`.txt` captions), encoded once.

Output: `ip_adapter.safetensors` in IP-Adapter's layout (`pimg.formats.ip_adapter`), the image
encoder as `image_encoder/` (clip and plus kinds), a model card, `config.json` and sample grids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pimg.errors import InputError, TrainingError
from pimg.trainers.diffusion_training import (
    TextConditioner,
    denoising_loss,
    encode_latents,
    frozen_base,
    sdxl_time_ids,
    training_noise_scheduler,
)
from pimg.trainers.loop import LoopConfig, Shard

KINDS = ("clip", "plus", "faceid")
LAYOUT_NAMES = {"clip": "IP-Adapter", "plus": "IP-Adapter Plus", "faceid": "IP-Adapter-FaceID"}


@dataclass
class IdAdapterTrainConfig:
    """Settings of `pimg train id-adapter`.

    Attributes:
        base: base model the adapter is trained for.
        kind: "clip" (IP-Adapter: a CLIP image embedding, for any subject), "plus" (IP-Adapter Plus: a
            resampler over the CLIP encoder's penultimate hidden states, num_tokens tokens) or "faceid"
            (FaceID: a face identity embedding through an MLP projection).
        image_encoder: CLIP vision model (hub id or folder) for the clip and plus kinds; None: the toy CLIP's
            vision tower on `tiny` (required on other bases).
        face_backend: "insightface" (ArcFace 512-d, the public FaceID checkpoints' embedding) or "dlib"
            (128-d, CC0 models) for the faceid kind.
        subject_crop: embed the subject cut out of its photo (`pimg.embedders.subject_crop`: plain
            backgrounds, as the toy world's) rather than the whole photo; recorded in the adapter, so
            inference crops alike.
        face_model: the face backend's model files (insightface pack folder; dlib .dat folder); None: default.
        data: "toy" (subjects from the toy world's generator, `tiny` only) or a folder of subject folders.
        caption: caption of a photo without a sidecar `.txt` in a data folder.
        out_dir: where the adapter, checkpoints, samples and logs go.
        resolution: training size; None: the base's native size.
        batch_size: subjects per micro-batch (one conditioning photo and one target photo each).
        num_tokens: image tokens per cross-attention layer (IP-Adapter and FaceID use 4; diffusers
            reads IP-Adapter's linear projection as 4 tokens, so the clip kind takes 4 only; the plus
            kind takes any number, IP-Adapter Plus uses 16).
        lora_rank: rank of FaceID's companion LoRA, trained with the adapter on every attention layer's
            q, k, v and out (self- and cross-attention), so the UNet learns to use the image tokens; it
            is saved in the adapter file, where diffusers' `load_ip_adapter` loads it (as `faceid_0`).
            0: none (plain IP-Adapter).
        image_drop, text_drop, both_drop: shares of examples trained without the image, the text or both.
        noise_offset, min_snr_gamma: as in the base's training (see `denoising_loss`).
        sample_subjects: subjects shown in the sample grid (generated ones, not evaluation subjects).
        num_inference_steps, guidance_scale: settings of the sample grid; guidance None: the base's.
            The guidance is also the one recommended for subjects made with the adapter.
        loop: the training loop's settings.
    """

    base: str = "tiny"
    kind: str = "clip"
    image_encoder: str | None = None
    face_backend: str = "insightface"
    face_model: str | None = None
    subject_crop: bool = False
    data: str = "toy"
    caption: str = "a photo"
    out_dir: str = "out/id-adapter"
    resolution: int | None = None
    batch_size: int = 8
    num_tokens: int = 4
    lora_rank: int = 0
    image_drop: float = 0.05
    text_drop: float = 0.05
    both_drop: float = 0.05
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    sample_subjects: int = 4
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=2000, learning_rate=1e-4))

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"kind {self.kind!r} is not one of {KINDS}.")
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.lora_rank < 0:
            raise InputError(f"lora_rank must be >= 0 (0: no companion LoRA), got {self.lora_rank}.")
        if self.num_tokens < 1:
            raise InputError(f"num_tokens must be >= 1, got {self.num_tokens}.")
        if self.kind == "clip" and self.num_tokens != 4:
            # diffusers reads IP-Adapter's linear projection as 4 tokens whatever its size
            raise InputError(
                f"the clip kind (IP-Adapter's projection) has 4 tokens; got num_tokens={self.num_tokens}. "
                "For more image tokens use kind plus (IP-Adapter Plus' resampler)."
            )
        drops = (self.image_drop, self.text_drop, self.both_drop)
        if any(d < 0 for d in drops) or sum(drops) >= 1:
            raise InputError(
                f"image_drop, text_drop and both_drop must be >= 0 and sum below 1; got {drops}."
            )
        if self.data == "toy" and self.kind == "faceid":
            raise InputError("the toy world has no faces: data 'toy' trains the clip and plus kinds.")


def build_embedder(config: IdAdapterTrainConfig, device: str = "cpu"):
    """The frozen embedder the adapter is conditioned on (`pimg.embedders`)."""
    from pimg.embedders import ClipImageEmbedder, FaceEmbedder

    if config.kind == "faceid":
        from pimg.faces import face_backend

        return FaceEmbedder(face_backend(config.face_backend, config.face_model))
    source = config.image_encoder
    if source is None:
        if config.base != "tiny":
            raise InputError(
                "image_encoder is needed on bases other than tiny: a CLIP vision hub id or folder."
            )
        from pimg.models import toy_clip_folder

        source = toy_clip_folder()
    return ClipImageEmbedder(source, crop=config.subject_crop, tokens=config.kind == "plus", device=device)


def initial_adapter(unet, kind: str, embed_dim: int, num_tokens: int, seed: int, lora_rank: int = 0) -> dict:
    """A fresh adapter in IP-Adapter's layout: a randomly initialised projection (torch's Linear init,
    LayerNorm at identity) and `to_k_ip` / `to_v_ip` copied from each cross-attention layer's `to_k` / `to_v`;
    with `lora_rank`, FaceID's companion LoRA on every attention layer, its up factors zero (so the
    UNet starts as the base)."""
    from pimg.formats.ip_adapter import cross_attention_layers

    width = unet.config.cross_attention_dim
    generator = torch.Generator().manual_seed(seed)

    def linear(n_in: int, n_out: int, prefix: str) -> dict:
        bound = 1 / np.sqrt(n_in)  # torch.nn.Linear's default init
        weight = (torch.rand(n_out, n_in, generator=generator) * 2 - 1) * bound
        bias = (torch.rand(n_out, generator=generator) * 2 - 1) * bound
        return {f"{prefix}.weight": weight, f"{prefix}.bias": bias}

    if kind == "plus":
        proj = initial_resampler(embed_dim, width, num_tokens, seed)
    elif kind == "clip":
        proj = linear(embed_dim, num_tokens * width, "proj")
    else:
        hidden = 1024 if embed_dim >= 512 else 4 * embed_dim  # FaceID's MLPProjModel: 512 -> 1024
        proj = {**linear(embed_dim, hidden, "proj.0"), **linear(hidden, num_tokens * width, "proj.2")}
    if kind != "plus":
        proj |= {"norm.weight": torch.ones(width), "norm.bias": torch.zeros(width)}
    modules = dict(unet.named_modules())
    layers = {}
    names = list(unet.attn_processors)
    for name in cross_attention_layers(unet):
        index = names.index(name)
        attention = modules[name.removesuffix(".processor")]
        layers[f"{index}.to_k_ip.weight"] = attention.to_k.weight.detach().clone()
        layers[f"{index}.to_v_ip.weight"] = attention.to_v.weight.detach().clone()
    if lora_rank:
        for index, name in enumerate(names):
            attention = modules[name.removesuffix(".processor")]
            for short, linear_layer in (
                ("to_q", attention.to_q),
                ("to_k", attention.to_k),
                ("to_v", attention.to_v),
                ("to_out", attention.to_out[0]),
            ):
                # peft's "gaussian" init: down ~ N(0, 1/r), up = 0
                down = torch.randn(lora_rank, linear_layer.in_features, generator=generator) / lora_rank
                layers[f"{index}.{short}_lora.down.weight"] = down
                layers[f"{index}.{short}_lora.up.weight"] = torch.zeros(linear_layer.out_features, lora_rank)
    return {"image_proj": proj, "ip_adapter": layers}


@dataclass
class IdBatch:
    """Target latents, their captions, the conditioning photos' embeddings [N, D], and SDXL time ids."""

    latents: torch.Tensor
    prompts: list[str]
    embeds: torch.Tensor
    time_ids: torch.Tensor | None
    rows: list[int]
    num_rows: int


class IdAdapterMethod:
    """Trains the image projection and the decoupled key/value layers of an IP-Adapter."""

    def __init__(self, config: IdAdapterTrainConfig):
        from accelerate import PartialState

        from pimg.inference.id_adapter import load_adapter_into

        self.config = config
        self.device = PartialState().device
        self.shard = Shard.of_process()
        self.pipe, self.sdxl, self.resolution = frozen_base(config.base, config.resolution)
        self.embedder = build_embedder(config)
        self.noise_scheduler = training_noise_scheduler(self.pipe.scheduler.config)
        self.conditioner = TextConditioner.from_pipeline(self.pipe)
        self.subjects = None if config.data == "toy" else SubjectFolders(config, self)
        if config.data == "toy" and config.base != "tiny" and not Path(config.base).is_dir():
            raise InputError(
                "data 'toy' trains on toy-world photos: use it with base tiny (or a toy base folder)."
            )
        load_adapter_into(
            self.pipe,
            initial_adapter(
                self.pipe.unet,
                config.kind,
                self.embedder.dim,
                config.num_tokens,
                config.loop.seed,
                config.lora_rank,
            ),
        )
        self.processors = torch.nn.ModuleList(
            p for p in self.pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")
        )
        self.projection = self.pipe.unet.encoder_hid_proj
        self.lora = companion_lora_modules(self.pipe.unet)
        for module in (self.processors, self.projection, self.lora):
            module.requires_grad_(True).float()
        self.pipe.to(self.device)
        # the embedding of "no image": zeros, except IP-Adapter Plus' (an all-zero image's hidden states)
        self.negative = self.embedder.negative() if config.kind == "plus" else None
        self._sample_inputs = None

    # ------------------------------------------------------------------------------------------ training

    def trainable_modules(self):
        modules = {"image_proj": self.projection, "ip_layers": self.processors}
        return modules | ({"companion_lora": self.lora} if len(self.lora) else {})

    def trainable_parameters(self):
        return [p for m in (self.projection, self.processors, self.lora) for p in m.parameters()]

    def batch(self, step: int, micro: int, seed: int) -> IdBatch:
        b = self.config.batch_size
        num_rows = b * self.shard.num_processes
        rng = np.random.default_rng([seed, step, micro])
        pairs = self.subjects.pairs(rng, num_rows) if self.subjects else toy_pairs(rng, num_rows)
        rows = list(self.shard.rows(b))
        mine = [pairs[r] for r in rows]
        draws = rng.random(num_rows)[rows]
        c = self.config
        drop_image = draws < c.image_drop + c.both_drop
        drop_text = (draws >= c.image_drop) & (draws < c.image_drop + c.both_drop + c.text_drop)
        if self.subjects:
            latents = torch.stack([self.subjects.latents[t] for _, t, _ in mine])
            embeds = torch.stack([self.subjects.embeds[i] for i, _, _ in mine])
        else:
            latents = encode_latents(self.pipe.vae, np.stack([t for _, t, _ in mine]))
            embeds = self.embedder.embed([i for i, _, _ in mine])
        embeds[torch.from_numpy(drop_image)] = 0 if self.negative is None else self.negative
        prompts = ["" if drop else caption for (_, _, caption), drop in zip(mine, drop_text, strict=True)]
        time_ids = None
        if self.sdxl:
            size = (self.resolution, self.resolution)
            time_ids = sdxl_time_ids(size, (0, 0), size).repeat(len(mine), 1)
        return IdBatch(latents, prompts, embeds, time_ids, rows, num_rows)

    def loss(self, batch: IdBatch, generator: torch.Generator):
        with torch.no_grad():
            cond = self.conditioner.encode(batch.prompts)
        if batch.time_ids is not None:
            cond = cond.with_time_ids(batch.time_ids)
        cond = cond.with_image_embeds(batch.embeds[:, None]).to(self.device)
        per_example = denoising_loss(
            self.pipe.unet,
            self.noise_scheduler,
            batch.latents.to(self.device),
            cond,
            generator,
            noise_offset=self.config.noise_offset,
            min_snr_gamma=self.config.min_snr_gamma,
            rows=batch.rows,
            num_rows=batch.num_rows,
        )
        return per_example.mean(), {}

    # ------------------------------------------------------------------------------------------ output

    def sample(self, step: int, out_dir: Path) -> Path | None:
        """A grid: per sample subject its conditioning photo, then images at adapter scale 0 and 1."""
        from pimg.imaging import row_grid
        from pimg.inference.id_adapter import image_embeds_argument

        if self.config.sample_subjects < 1:
            return None
        if self._sample_inputs is None:
            self._sample_inputs = self._sample_subjects()
        c = self.config
        guidance = c.guidance_scale if c.guidance_scale is not None else _base_guidance(c.base)
        rows = []
        for photo, caption in self._sample_inputs:
            embeds = self._embed_for_sampling(photo)
            images = [np.asarray(photo.convert("RGB") if hasattr(photo, "convert") else photo)]
            for scale in (0.0, 1.0):
                self.pipe.set_ip_adapter_scale(scale)
                out = self.pipe(
                    [caption] * 2,
                    ip_adapter_image_embeds=[
                        image_embeds_argument(embeds[0], 2, guidance > 1, self.negative)
                    ],
                    num_inference_steps=c.num_inference_steps,
                    guidance_scale=guidance,
                    generator=[torch.Generator().manual_seed(k) for k in range(2)],
                    height=self.resolution,
                    width=self.resolution,
                    output_type="np",
                ).images
                images += [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in out]
            rows.append(images)
        self.pipe.set_ip_adapter_scale(1.0)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"sample_{step:07d}.png"
        row_grid(rows).save(path)
        return path

    def _sample_subjects(self) -> list:
        if self.subjects:
            return self.subjects.sample_inputs(self.config.sample_subjects)
        from pimg.toyworld.subjects import random_subject

        rng = np.random.default_rng(10_007)  # fixed, so samples of every step show the same subjects
        out = []
        for _ in range(self.config.sample_subjects):
            subject = random_subject(rng)
            background = subject.backgrounds[0]
            out.append(
                (subject.photos(1, seed=int(rng.integers(2**31)))[0], toy_caption(subject, background))
            )
        return out

    @torch.no_grad()
    def _embed_for_sampling(self, photo) -> torch.Tensor:
        return self.embedder.embed([photo]).to(self.device)

    def save(self, out_dir: Path) -> None:
        from pimg.formats.ip_adapter import IP_ADAPTER_FILE, ip_adapter_from_unet, save_ip_adapter

        c = self.config
        metadata = {
            "pimg.method": "id-adapter",
            "pimg.kind": c.kind,
            "pimg.base": c.base,
            "pimg.embedder": self.embedder_description(),
            "pimg.subject_crop": str(c.subject_crop).lower(),
        }
        save_ip_adapter(out_dir / IP_ADAPTER_FILE, ip_adapter_from_unet(self.pipe.unet), metadata)
        if c.kind != "faceid":
            self.embedder.model.save_pretrained(str(out_dir / "image_encoder"), safe_serialization=True)
        self.write_model_card(out_dir)

    def embedder_description(self) -> str:
        c = self.config
        if c.kind == "faceid":
            return f"face:{c.face_backend}"
        return "clip:image_encoder"

    def write_model_card(self, out_dir: Path) -> None:
        c = self.config
        base = c.base
        usage = (
            "```python\n"
            "from diffusers import StableDiffusionPipeline\n\n"
            f'pipe = StableDiffusionPipeline.from_pretrained("{base}")\n'
            f'pipe.load_ip_adapter("{out_dir}", subfolder="", weight_name="ip_adapter.safetensors"'
            + (
                ', image_encoder_folder="image_encoder")\n'
                if c.kind != "faceid"
                else ", image_encoder_folder=None)\n"
            )
            + "pipe.set_ip_adapter_scale(0.8)\n"
            + (
                'image = pipe("a photo", ip_adapter_image=photo).images[0]\n'
                if c.kind != "faceid"
                else 'image = pipe("a photo", ip_adapter_image_embeds=[face_embeds]).images[0]\n'
            )
            + "```\n\n"
            f"pimg: `pimg generate --base {base} --id-adapter {out_dir} --id-image photo.png --prompt ...`\n"
        )
        text = (
            f"# ID adapter ({LAYOUT_NAMES[c.kind]} layout)\n\n"
            f"Base: `{base}`; embedder: {self.embedder_description()}; {c.loop.steps} steps, batch {c.batch_size}, "
            f"data: {c.data}.\n\nSample grid: `samples/` (per subject: its photo, two images at scale 0, two "
            "at scale 1).\n\n## Use\n\n" + usage
        )
        (out_dir / "README.md").write_text(text)


def initial_resampler(embed_dim: int, width: int, num_tokens: int, seed: int) -> dict:
    """A fresh IP-Adapter Plus resampler (diffusers' init, seeded) in IP-Adapter Plus' layout; its
    width is the UNet's cross-attention width, in heads of 64 as the public Plus files have them."""
    from diffusers.models.embeddings import IPAdapterPlusImageProjection

    from pimg.formats.ip_adapter import resampler_to_ip_adapter

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        resampler = IPAdapterPlusImageProjection(
            embed_dims=embed_dim,
            output_dims=width,
            hidden_dims=width,
            heads=max(1, width // 64),
            num_queries=num_tokens,
        )
    return resampler_to_ip_adapter(resampler.state_dict())


def companion_lora_modules(unet) -> torch.nn.ModuleList:
    """The down and up layers of the companion LoRA diffusers loaded from the adapter (peft adapter
    `faceid_0`), for training; empty when the adapter has none."""
    from pimg.formats.ip_adapter import COMPANION_LORA

    out = torch.nn.ModuleList()
    for module in unet.modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and COMPANION_LORA in lora_a:
            out.extend([lora_a[COMPANION_LORA], module.lora_B[COMPANION_LORA]])
    return out


def _base_guidance(base: str) -> float:
    from pimg.models import recommended_guidance

    return recommended_guidance(base)


def toy_caption(subject, background: str) -> str:
    """The caption of a toy subject's photo: its class noun and background, nothing of its look."""
    return f"a {subject.class_noun} on a {background} background"


def toy_pairs(rng: np.random.Generator, n: int) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """n (conditioning photo, target photo, target caption) triples of random training subjects."""
    from pimg.toyworld.checker import read_background
    from pimg.toyworld.subjects import random_subject

    out = []
    for _ in range(n):
        subject = random_subject(rng)
        condition, target = subject.photos(2, seed=int(rng.integers(2**31)))
        out.append((condition, target, toy_caption(subject, read_background(target))))
    return out


class SubjectFolders:
    """A folder of subject folders (`data/<subject>/*.jpg`, `.txt` captions optional), encoded once.

    Each subject needs at least 2 photos (one to condition on, another to take the loss on). The
    VAE latents and the embeddings of every photo are computed at start and kept (the encoders are frozen).
    """

    def __init__(self, config: IdAdapterTrainConfig, method: IdAdapterMethod):
        from pimg.photos import load_photos

        root = Path(config.data)
        if not root.is_dir():
            raise InputError(f"data {config.data!r} is neither 'toy' nor a folder of subject folders.")
        self.latents, self.embeds, self.captions, self.groups, self.photos = [], [], [], [], []
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            photos = load_photos(folder, method.resolution)
            if len(photos) < 2:
                continue
            embeds = method.embedder.embed(list(photos.images), [str(p) for p in photos.paths])
            latents = encode_latents(method.pipe.vae, photos.images)
            start = len(self.latents)
            self.latents += list(latents)
            self.embeds += list(embeds)
            self.captions += [cap or config.caption for cap in photos.captions]
            self.photos += list(photos.images)
            self.groups.append(list(range(start, start + len(photos))))
        if not self.groups:
            raise TrainingError(f"{root} holds no subject folder with 2 or more usable photos.")

    def pairs(self, rng: np.random.Generator, n: int) -> list[tuple[int, int, str]]:
        out = []
        for _ in range(n):
            group = self.groups[rng.integers(len(self.groups))]
            condition, target = rng.choice(group, size=2, replace=False)
            out.append((int(condition), int(target), self.captions[target]))
        return out

    def sample_inputs(self, n: int) -> list:
        return [(self.photos[g[0]], self.captions[g[1]]) for g in self.groups[:n]]
