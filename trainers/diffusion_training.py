"""What every diffusion fine-tuning method shares: the denoising loss, latents, text conditioning, new tokens.

- `denoising_loss`: the latent diffusion objective (Ho et al. 2020, eq. 14; Rombach et al. 2022, eq. 2)
  with the target the scheduler was trained for (epsilon, v-prediction, or the sample), optional
  offset noise and Min-SNR weighting (Hang et al. 2023, eq. 9).
- `encode_latents`: VAE latents, scaled as the UNet expects; methods cache them since the VAE is frozen.
- `TextConditioner`: prompts -> UNet conditioning for SD 1.x/2.x (one CLIP) and SDXL (two CLIPs, the
  pooled embedding and the size/crop "time ids" of Podell et al. 2023, sec. 2.2).
- `NewTokens`: new tokens in the tokenizer whose vectors alone are trained (Textual Inversion, Gal et
  al. 2022; the embedding half of pivotal tuning), through an embedding layer that keeps every
  existing row frozen.

Example:
    >>> conditioner = TextConditioner.from_pipeline(pipe)
    >>> latents = encode_latents(pipe.vae, photos.images)
    >>> per_image = denoising_loss(pipe.unet, noise_scheduler, latents, conditioner.encode(prompts), generator)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pimg.errors import InputError
from pimg.imaging import to_model_range

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def fill_prompt(template: str, token: str, class_noun: str) -> str:
    """Fill `{token}` and `{class_noun}` in a prompt template or caption.

    Example:
        >>> fill_prompt("a {token} {class_noun}", "sks", "star")
        'a sks star'
    """
    try:
        return " ".join(template.format(token=token, class_noun=class_noun).split())
    except (KeyError, IndexError, ValueError) as exc:
        raise InputError(
            f"prompt {template!r} has a placeholder other than {{token}} and {{class_noun}} ({exc}); "
            "write literal braces as {{ and }}."
        ) from exc


def training_noise_scheduler(scheduler_config):
    """A DDPM scheduler with the base's noise schedule and prediction type (the sampler may be another)."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler_config)
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise InputError(
            f"the base's scheduler predicts {scheduler.config.prediction_type!r}; pimg trains {PREDICTION_TYPES}."
        )
    return scheduler


@dataclass
class Conditioning:
    """UNet conditioning for a batch: hidden states, for SDXL the pooled embedding and time ids, and
    for a UNet with an IP-Adapter loaded its image embeddings ([N, 1, D], diffusers' layout)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None

    def added_cond_kwargs(self) -> dict | None:
        added = {} if self.image_embeds is None else {"image_embeds": [self.image_embeds]}
        if self.pooled is None:
            return added or None
        if self.time_ids is None:
            raise InputError("SDXL conditioning needs time ids; pass them with `with_time_ids`.")
        return {"text_embeds": self.pooled, "time_ids": self.time_ids, **added}

    def with_time_ids(self, time_ids: torch.Tensor) -> Conditioning:
        return dataclasses.replace(self, time_ids=time_ids.to(self.prompt_embeds))

    def with_image_embeds(self, image_embeds: torch.Tensor) -> Conditioning:
        return dataclasses.replace(self, image_embeds=image_embeds.to(self.prompt_embeds))

    def to(self, device, dtype=None) -> Conditioning:
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        return Conditioning(*(move(getattr(self, f.name)) for f in dataclasses.fields(self)))

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        pooled = [p.pooled for p in parts]
        time_ids = [p.time_ids for p in parts]
        return Conditioning(
            torch.cat([p.prompt_embeds for p in parts]),
            None if pooled[0] is None else torch.cat(pooled),
            None if time_ids[0] is None else torch.cat(time_ids),
        )


def sdxl_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): (h, w) before resizing, crop offset, (h, w) out."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def denoising_loss(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    conditioning: Conditioning,
    generator: torch.Generator,
    *,
    noise_offset: float = 0.0,
    min_snr_gamma: float | None = None,
    pixel_weights: torch.Tensor | None = None,
    high_noise_share: float = 0.0,
    rows: Sequence[int] | None = None,
    num_rows: int | None = None,
) -> torch.Tensor:
    """The per-example latent diffusion loss: noise the latents at random timesteps, predict, compare.

    The target follows `noise_scheduler.config.prediction_type`: the noise (epsilon), the velocity
    v = alpha_t * noise - sigma_t * x0 (Salimans & Ho 2022, sec. 4) or the clean latents. All random
    draws come from `generator` (a CPU generator, so CPU and GPU runs draw the same numbers).

    Args:
        unet: a `UNet2DConditionModel`.
        noise_scheduler: a DDPM-family scheduler with the base's schedule.
        latents: scaled latents [N, C, h, w].
        conditioning: text conditioning of the N examples.
        generator: source of noise and timesteps.
        noise_offset: std of a per-channel constant added to the noise (Guttenberg 2023), so flat
            colours far from the mean stay reachable.
        min_snr_gamma: Min-SNR-gamma weighting (Hang et al. 2023); None or 0 turns it off.
        pixel_weights: optional weights [N, 1, h, w] at latent resolution (a masked loss): each
            example's loss is its weighted mean over latent pixels, so its scale does not depend on
            how much of the image the weights cover.
        high_noise_share: share of examples whose timestep is drawn from the noisier half of the
            schedule instead of all of it (0: uniform). Layout, position and which object gets which
            colour are decided at high noise, where the prompt is most of what the model has to go on;
            at low noise the image itself says what to draw.
        rows: under data parallelism (`pimg.trainers.loop.Shard`), which rows of the step's global
            batch of `num_rows` examples `latents` are. Every process gets the same generator, draws
            the noise and timesteps of the whole global batch and keeps its own rows, so N processes
            draw, row for row, what one process with the whole batch would (at a cost of milliseconds:
            16 ms on one CPU thread for SDXL's 32 rows of 8 GPUs x batch 4). None: `latents` are all of it.
        num_rows: the size of the global batch (with `rows` only).

    Returns:
        Loss per example [N] (float32); methods weight and average it.
    """
    n = latents.shape[0]
    drawn = n if rows is None else _global_rows(rows, num_rows, n)
    noise = torch.randn((drawn, *latents.shape[1:]), generator=generator)
    if noise_offset:
        noise = noise + noise_offset * torch.randn((drawn, latents.shape[1], 1, 1), generator=generator)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (drawn,), generator=generator)
    if high_noise_share:
        noisier_half = torch.rand(drawn, generator=generator) < high_noise_share
        timesteps = torch.where(noisier_half, num_timesteps // 2 + timesteps // 2, timesteps)
    if rows is not None:
        keep = torch.as_tensor(list(rows), dtype=torch.long)
        noise, timesteps = noise[keep], timesteps[keep]
    noise, timesteps = noise.to(latents), timesteps.to(latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    prediction_type = noise_scheduler.config.prediction_type
    target = denoising_target(noise_scheduler, latents, noise, timesteps)
    prediction = unet(
        noisy,
        timesteps,
        conditioning.prompt_embeds,
        added_cond_kwargs=conditioning.added_cond_kwargs(),
    ).sample
    squared_error = F.mse_loss(prediction.float(), target.float(), reduction="none")
    if pixel_weights is None:
        per_example = squared_error.mean(dim=(1, 2, 3))
    else:
        if pixel_weights.shape != (n, 1, *latents.shape[2:]):
            raise ValueError(
                f"pixel_weights must have shape {(n, 1, *latents.shape[2:])} (one weight per latent pixel); "
                f"got {tuple(pixel_weights.shape)}"
            )
        weights = pixel_weights.to(squared_error)
        per_example = (squared_error * weights).mean(dim=1).sum(dim=(1, 2)) / weights.sum(dim=(1, 2, 3))
    if min_snr_gamma:
        alphas = noise_scheduler.alphas_cumprod.to(latents.device)[timesteps].float()
        snr = alphas / (1 - alphas)
        weight = torch.clamp(snr, max=min_snr_gamma) / snr
        if prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)
        per_example = per_example * weight
    return per_example


def denoising_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet is trained to predict, by `noise_scheduler.config.prediction_type`: the noise
    (epsilon), the velocity v = alpha_t * noise - sigma_t * x0, or the clean latents."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    return latents


def _global_rows(rows: Sequence[int], num_rows: int | None, n: int) -> int:
    """Check `rows` of a global batch against the n latents given; returns the global batch size."""
    if num_rows is None or len(rows) != n or not all(0 <= r < num_rows for r in rows):
        raise ValueError(
            f"rows must name one row of the global batch (0 .. num_rows - 1) for each of the {n} latents; "
            f"got rows={list(rows)}, num_rows={num_rows}"
        )
    return num_rows


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, batch_size: int = 8) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> the scaled latents the UNet sees, [N, C, H/f, W/f] float32 on the CPU.

    The posterior mean is used (not a sample), so a cache of them is deterministic; the VAE's
    posterior std is small next to the diffusion noise added on top.
    """
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    param = next(vae.parameters())
    out = []
    for start in range(0, len(images), batch_size):
        # SDXL's VAE overflows in fp16, so encode in float32 whatever the frozen weights' dtype.
        pixels = to_model_range(images[start : start + batch_size]).to(param.device, param.dtype)
        mean = vae.encode(pixels).latent_dist.mean.float()
        out.append(((mean - shift) * scale).cpu())
    return torch.cat(out)


class TextConditioner:
    """Prompts -> UNet conditioning, for SD 1.x/2.x (one text encoder) and SDXL (two).

    SD conditions on the last hidden state of CLIP; SDXL on the penultimate hidden states of both
    encoders concatenated, plus the second encoder's pooled projection.
    """

    def __init__(self, tokenizers: list, text_encoders: list, sdxl: bool):
        if len(tokenizers) != len(text_encoders) or len(tokenizers) != (2 if sdxl else 1):
            raise InputError(
                f"{'SDXL' if sdxl else 'SD'} needs {2 if sdxl else 1} tokenizer(s) and text encoder(s); got "
                f"{len(tokenizers)} and {len(text_encoders)}."
            )
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.sdxl = sdxl

    @classmethod
    def from_pipeline(cls, pipe) -> TextConditioner:
        if getattr(pipe, "text_encoder_2", None) is not None:
            return cls(
                [pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2], sdxl=True
            )
        return cls([pipe.tokenizer], [pipe.text_encoder], sdxl=False)

    def token_ids(self, tokenizer, prompts: list[str]) -> torch.Tensor:
        return tokenizer(
            prompts,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode(self, prompts: list[str]) -> Conditioning:
        """Encode prompts (with gradients if any encoder parameter requires them)."""
        if not self.sdxl:
            encoder = self.text_encoders[0]
            ids = self.token_ids(self.tokenizers[0], prompts).to(encoder.device)
            return Conditioning(encoder(ids)[0])
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            out = encoder(self.token_ids(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled embedding is the one SDXL uses
        return Conditioning(torch.cat(hidden, dim=-1), pooled)


class EmbeddingWithNewRows(torch.nn.Module):
    """An input embedding whose existing rows are frozen and whose new token ids map to trainable vectors.

    Only `vectors` is a trainable parameter, so the optimizer, its state and every checkpoint hold
    the new rows alone, and no other token's embedding can move (no gradient masking needed).
    """

    def __init__(self, base: torch.nn.Embedding, new_ids: list[int], vectors: torch.Tensor):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.vectors = torch.nn.Parameter(vectors.detach().clone().float())
        slot = torch.full((max(max(new_ids) + 1, base.num_embeddings),), -1, dtype=torch.long)
        slot[torch.tensor(new_ids)] = torch.arange(len(new_ids))
        self.register_buffer("slot", slot, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The full table (existing rows, then new ones written in), for code that reads `.weight`."""
        table = self.base.weight.detach().clone()
        new_ids = torch.nonzero(self.slot >= 0).flatten()
        if new_ids.max() >= table.shape[0]:
            pad = table.new_zeros(int(new_ids.max()) + 1 - table.shape[0], table.shape[1])
            table = torch.cat([table, pad])
        table[new_ids] = self.vectors.detach()[self.slot[new_ids]].to(table.dtype)
        return table

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        slot = self.slot[input_ids]
        old = self.base(input_ids.clamp(max=self.base.num_embeddings - 1))
        new = self.vectors[slot.clamp(min=0)].to(old.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), new, old)


class NewTokens:
    """New tokens (Textual Inversion) added to a tokenizer and text encoder, their vectors trainable.

    An n-vector token `<t>` becomes the tokens `<t>`, `<t>_1`, ..., `<t>_{n-1}` (diffusers'
    multi-vector convention), so `expand` turns "a <t> star" into "a <t> <t>_1 <t>_2 star" exactly as
    `pipe.load_textual_inversion` files are used at inference.

    Example:
        >>> tokens = NewTokens(pipe.tokenizer, pipe.text_encoder, "<sks>", n_vectors=2, init_word="star")
        >>> tokens.expand("a <sks> star")
        'a <sks> <sks>_1 star'
    """

    def __init__(self, tokenizer, text_encoder, token: str, n_vectors: int = 1, init_word: str = ""):
        from pimg.formats.embeddings import multi_vector_tokens

        if n_vectors < 1:
            raise InputError(f"n_vectors must be >= 1, got {n_vectors}.")
        if not token or any(c.isspace() for c in token) or token != token.lower():
            raise InputError(f"token {token!r} must be one lower-case word without spaces, e.g. '<sks>'.")
        self.token = token
        self.names = multi_vector_tokens(token, n_vectors)
        vocab = tokenizer.get_vocab()
        taken = [n for n in self.names if n in vocab or f"{n}</w>" in vocab]
        if taken:
            raise InputError(
                f"token {taken[0]!r} is already in the tokenizer, so it cannot be learned as a new token "
                f"(that would redefine an existing word). Pick a new one, e.g. '<{token.strip('<>')}>'."
            )
        base = text_encoder.get_input_embeddings()
        init = self._init_vectors(tokenizer, base, init_word, n_vectors)
        tokenizer.add_tokens(self.names)
        self.ids = tokenizer.convert_tokens_to_ids(self.names)
        self.layer = EmbeddingWithNewRows(base, self.ids, init)
        text_encoder.set_input_embeddings(self.layer)
        self.tokenizer = tokenizer

    @staticmethod
    def _init_vectors(tokenizer, base: torch.nn.Embedding, init_word: str, n: int) -> torch.Tensor:
        weight = base.weight.detach().float()
        if not init_word:
            return weight.mean(0, keepdim=True).repeat(n, 1)
        ids = tokenizer(init_word, add_special_tokens=False).input_ids
        if not ids:
            raise InputError(
                f"init_word {init_word!r} tokenizes to nothing; pick a word such as the class noun."
            )
        if n > 1 and len(ids) == n:
            # A phrase of exactly n tokens ("red and blue striped" for 4 vectors): vector i starts as
            # token i, so the new token first reads as that phrase.
            return weight[ids].clone()
        # A word of several tokens starts from their mean, so every vector begins at the word's meaning.
        return weight[ids].mean(0, keepdim=True).repeat(n, 1)

    @property
    def vectors(self) -> torch.nn.Parameter:
        return self.layer.vectors

    def expand(self, prompt: str) -> str:
        """Spell the token as its n vector tokens (as diffusers does at inference)."""
        return prompt.replace(self.token, " ".join(self.names)) if len(self.names) > 1 else prompt


def save_new_tokens(out_dir, token: str, tokens: list[NewTokens]) -> str:
    """Write learned token vectors beside a result; returns the file name.

    SD (one text encoder): `learned_embeds.safetensors` in the diffusers form. SDXL: one entry per
    text encoder, `clip_l` and `clip_g`, as diffusers' SDXL examples write them.
    """
    from pathlib import Path

    from pimg.formats.embeddings import DIFFUSERS_EMBEDDING_FILENAME, save_embedding
    from pimg.formats.safetensors_io import write_safetensors_atomically

    if len(tokens) == 1:
        save_embedding(out_dir, token, tokens[0].vectors)
        return DIFFUSERS_EMBEDDING_FILENAME
    filename = "embeddings_sdxl.safetensors"
    write_safetensors_atomically(
        Path(out_dir) / filename,
        {"clip_l": tokens[0].vectors, "clip_g": tokens[1].vectors},
        {"format": "pt", "token": token},
    )
    return filename


def frozen_base(base: str, resolution: int | None = None):
    """A base pipeline for methods that train modules beside it: every component frozen, no progress bar.

    Returns:
        (pipe, is_sdxl, training resolution: `resolution` or the base's native size).
    """
    from pimg.models import load_base

    pipe = load_base(base)
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).requires_grad_(False)
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    return pipe, sdxl, resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
