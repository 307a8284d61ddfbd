"""Captions for photos that came without one, chosen by the base model itself.

A LoRA trained on "a sks star" for photos of a star on a red background learns that `sks` means
"star on red": asked later for "a sks star on a blue background", the two words pull apart and the
subject suffers. Naming each photo's setting in its caption ("a sks star on a red background")
leaves the background to words the base already knows. Users rarely write captions, so pimg picks
the phrase for them, from a list of candidates, with the diffusion model as a zero-shot classifier
(Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier"): the candidate whose
prompt lets the UNet best predict the noise added to the photo (lowest mean denoising error over
fixed timesteps and noises, the same draws for every candidate) describes it best. No second model
is needed, and it works on every base pimg trains.

Example:
    >>> phrases = default_phrases("tiny")           # "on a red background", ...
    >>> pick_phrases(pipe.unet, scheduler, latents, conditioner, ["a star " + p for p in phrases])
    [2, 0, 5, 2]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pimg.trainers.diffusion_training import Conditioning, denoising_target

#: Settings a photo of a subject is commonly taken in, for bases without a list of their own.
GENERAL_PHRASES = (
    "indoors",
    "outdoors",
    "on a white background",
    "on a dark background",
    "on a table",
    "on grass",
    "on a beach",
    "in a forest",
    "in the snow",
    "on a city street",
    "on a sofa",
    "on a wooden floor",
)


def default_phrases(base: str) -> tuple[str, ...]:
    """The candidate phrases for `base`: the toy world's backgrounds on `tiny`, common settings elsewhere."""
    if base == "tiny":
        from pimg.toyworld.palette import COLOR_NAMES

        return tuple(f"on a {color} background" for color in COLOR_NAMES)
    return GENERAL_PHRASES


@torch.no_grad()
def pick_phrases(
    unet,
    noise_scheduler,
    latents: torch.Tensor,
    conditioner,
    prompts: list[str],
    *,
    time_ids: torch.Tensor | None = None,
    samples: int = 8,
    seed: int = 0,
    rows_per_call: int = 64,
) -> list[int]:
    """For each photo, the index of the prompt under which the UNet denoises it best.

    Args:
        unet: the base's UNet (frozen).
        noise_scheduler: a DDPM-family scheduler with the base's schedule (`training_noise_scheduler`).
        latents: the photos' scaled latents [N, C, h, w].
        conditioner: a `TextConditioner` of the base.
        prompts: one prompt per candidate ("a star on a red background", ...).
        time_ids: SDXL's time ids of the photos [N, 6]; None for other bases.
        samples: (timestep, noise) draws per photo, timesteps spread evenly over 10%-90% of the
            schedule: layout and colour are decided at high noise, detail at low noise.
        seed: seed of the noise draws.
        rows_per_call: UNet batch size (photos x candidates x samples rows in all).
    """
    if not prompts:
        raise ValueError("pick_phrases needs at least one candidate prompt.")
    device = latents.device
    candidates = conditioner.encode(prompts).to(device, latents.dtype)
    rows_in_all = len(prompts) * samples
    steps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0.1 * steps, 0.9 * steps, samples).long().to(device)
    generator = torch.Generator().manual_seed(seed)
    choices = []
    for index in range(latents.shape[0]):
        clean = latents[index : index + 1].expand(samples, -1, -1, -1)
        noise = torch.randn(clean.shape, generator=generator).to(clean)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        target = denoising_target(noise_scheduler, clean, noise, timesteps)
        errors = []
        # Rows candidate-major: row r is candidate r // samples at draw r % samples.
        for start in range(0, rows_in_all, rows_per_call):
            rows = torch.arange(start, min(start + rows_per_call, rows_in_all), device=device)
            draws, candidate = rows % samples, rows // samples
            conditioning = Conditioning(
                candidates.prompt_embeds[candidate],
                None if candidates.pooled is None else candidates.pooled[candidate],
                None if time_ids is None else time_ids[index : index + 1].to(device).expand(len(rows), -1),
            )
            prediction = unet(
                noisy[draws],
                timesteps[draws],
                conditioning.prompt_embeds,
                added_cond_kwargs=conditioning.added_cond_kwargs(),
            ).sample
            errors.append(
                F.mse_loss(prediction.float(), target[draws].float(), reduction="none").mean((1, 2, 3))
            )
        choices.append(int(torch.cat(errors).view(len(prompts), samples).mean(1).argmin()))
    return choices
