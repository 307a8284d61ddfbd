"""`pimg train hypernet`: train the hypernetwork end to end with the diffusion loss (Shrestha et al. 2025).

Each example is a subject: the hypernetwork reads some of its photos and predicts its LiDB LoRA; the
UNet, with that LoRA applied to the example's rows only (`hypernets.lidb.apply_per_sample`: one UNet
call for the whole batch, a different LoRA per row), denoises *another* photo of the subject, captioned
`a <token> <class noun> on a <background> background`. The loss is the usual diffusion loss plus
`output_l2 * mean(prediction^2)`, the output penalty Shrestha et al. ("Finetuning-Free Personalization
of Text to Image Generation via Hypernetworks", arXiv 2511.03156) use to keep end-to-end training
stable, without HyperDreamBooth's stage of per-subject fine-tuned targets.

How many photos a subject is given (1 to `max_photos`) is drawn per step, so one hypernetwork serves 1 to
N photos. On `tiny` the subjects come from the toy world's unlimited subject generator (never an
evaluation subject); on real bases from a folder of subject folders (`data/<subject>/*.jpg`, as
CelebA-HQ by identity or a folder of pets is arranged), each with at least 2 photos.

Output: the hypernetwork folder (`hypernets.model`), a model card, `config.json`, sample grids
(per subject: the photos it was given, then images of its prediction), checkpoints and TensorBoard logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pimg.errors import InputError, TrainingError
from pimg.hypernets.lidb import apply_per_sample
from pimg.hypernets.model import HypernetArchitecture, Hypernetwork, PhotoEncoder
from pimg.trainers.diffusion_training import (
    TextConditioner,
    denoising_loss,
    encode_latents,
    frozen_base,
    sdxl_time_ids,
    training_noise_scheduler,
)
from pimg.trainers.loop import LoopConfig, Shard


@dataclass
class HypernetTrainConfig:
    """Settings of `pimg train hypernet`.

    Attributes:
        base: base model the hypernetwork predicts LoRAs for.
        image_encoder: the frozen vision model (CLIP vision or DINOv2: hub id or folder); None: the toy
            CLIP's vision tower on `tiny` (required on other bases).
        architecture: decoder and weight-space shape (`HypernetArchitecture`).
        data: "toy" (the toy world's subject generator, `tiny` only) or a folder of subject folders.
        token: the word predicted LoRAs are bound to (prompts say `a <token> <class noun>`).
        caption: the caption of a data-folder photo without a sidecar `.txt` (`{token}` is replaced).
        out_dir: where the hypernetwork, checkpoints, samples and logs go.
        resolution: training size; None: the base's native size.
        batch_size: subjects per micro-batch.
        max_photos: a subject is given 1 to this many photos (drawn per step).
        output_l2: weight of the output penalty `mean(prediction^2)` (0: off).
        noise_offset, min_snr_gamma: as in the base's training (see `denoising_loss`).
        sample_subjects: subjects in the sample grid (generated ones, never evaluation subjects).
        num_inference_steps: steps of the sample grid.
        guidance_scale: guidance of the sample grid, recorded as the recommendation for predictions.
        loop: the training loop's settings.
    """

    base: str = "tiny"
    image_encoder: str | None = None
    architecture: HypernetArchitecture = field(default_factory=HypernetArchitecture)
    data: str = "toy"
    token: str = "sks"
    caption: str = "a photo of {token}"
    out_dir: str = "out/hypernet"
    resolution: int | None = None
    batch_size: int = 8
    max_photos: int = 4
    output_l2: float = 1e-3
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    sample_subjects: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 1.0
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(steps=4000, learning_rate=1e-4))

    def __post_init__(self):
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.max_photos < 1:
            raise InputError(f"max_photos must be >= 1, got {self.max_photos}.")
        if self.output_l2 < 0:
            raise InputError(f"output_l2 must be >= 0, got {self.output_l2}.")
        if not self.token or any(c.isspace() for c in self.token):
            raise InputError(f"token must be one word, e.g. 'sks'; got {self.token!r}.")


def toy_caption(token: str, subject, background: str) -> str:
    """A toy photo's caption: the token, the class noun and the background, nothing of the subject's look."""
    return f"a {token} {subject.class_noun} on a {background} background"


@dataclass
class HypernetBatch:
    """Per subject its photos' pixels [B, views, 3, H, W]; the target latents, captions, SDXL time ids."""

    pixels: torch.Tensor
    latents: torch.Tensor
    prompts: list[str]
    time_ids: torch.Tensor | None
    rows: list[int]
    num_rows: int


class HypernetMethod:
    """Trains the hypernetwork's decoder; the encoder, UNet, VAE and text encoder stay frozen."""

    def __init__(self, config: HypernetTrainConfig):
        from accelerate import PartialState

        from pimg.hypernets.lidb import LidbSpace
        from pimg.models import toy_clip_folder

        self.config = config
        self.device = PartialState().device
        self.shard = Shard.of_process()
        if config.data == "toy" and config.base != "tiny" and not Path(config.base).is_dir():
            raise InputError(
                "data 'toy' trains on toy-world photos: use it with base tiny (or a toy base folder)."
            )
        self.pipe, self.sdxl, self.resolution = frozen_base(config.base, config.resolution)
        self.noise_scheduler = training_noise_scheduler(self.pipe.scheduler.config)
        self.conditioner = TextConditioner.from_pipeline(self.pipe)
        source = config.image_encoder
        if source is None:
            if config.base != "tiny" and config.data != "toy":
                raise InputError(
                    "image_encoder is needed on bases other than tiny: a CLIP vision or DINOv2 hub id or folder."
                )
            source = toy_clip_folder()
        encoder = PhotoEncoder(source, config.architecture.subject_crop)
        # The space's bases come from a seed: the same in every process and every resumed run.
        space = LidbSpace.from_unet(self.pipe.unet, config.architecture.lidb)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.loop.seed)
            self.hypernet = Hypernetwork(space, encoder, config.architecture)
        self.subjects = None if config.data == "toy" else SubjectFolders(config, self)
        self.pipe.to(self.device)
        self.hypernet.to(self.device)
        self._sample_inputs = None

    # ------------------------------------------------------------------------------------------ training

    def trainable_modules(self):
        return {"hypernet": self.hypernet}

    def trainable_parameters(self):
        return [p for p in self.hypernet.parameters() if p.requires_grad]

    def batch(self, step: int, micro: int, seed: int) -> HypernetBatch:
        c = self.config
        num_rows = c.batch_size * self.shard.num_processes
        rng = np.random.default_rng([seed, step, micro])
        given = int(rng.integers(1, c.max_photos + 1))  # photos per subject this step
        examples = (
            self.subjects.examples(rng, num_rows, given)
            if self.subjects
            else self._toy_examples(rng, num_rows, given)
        )
        rows = list(self.shard.rows(c.batch_size))
        mine = [examples[r] for r in rows]
        pixels = torch.stack([self.hypernet.encoder.pixels(photos) for photos, _, _ in mine])
        if self.subjects:
            latents = torch.stack([self.subjects.latents[target] for _, target, _ in mine])
        else:
            latents = encode_latents(self.pipe.vae, np.stack([target for _, target, _ in mine]))
        time_ids = None
        if self.sdxl:
            size = (self.resolution, self.resolution)
            time_ids = sdxl_time_ids(size, (0, 0), size).repeat(len(mine), 1)
        return HypernetBatch(pixels, latents, [caption for _, _, caption in mine], time_ids, rows, num_rows)

    def _toy_examples(self, rng: np.random.Generator, n: int, given: int) -> list:
        from pimg.toyworld.checker import read_background
        from pimg.toyworld.subjects import random_subject

        out = []
        for _ in range(n):
            subject = random_subject(rng)
            *photos, target = subject.photos(given + 1, seed=int(rng.integers(2**31)))
            out.append((photos, target, toy_caption(self.config.token, subject, read_background(target))))
        return out

    def loss(self, batch: HypernetBatch, generator: torch.Generator):
        with torch.no_grad():
            cond = self.conditioner.encode(batch.prompts)
        if batch.time_ids is not None:
            cond = cond.with_time_ids(batch.time_ids)
        flat = self.hypernet(batch.pixels.to(self.device))
        with apply_per_sample(self.pipe.unet, self.hypernet.space, self.hypernet.space.split(flat)):
            per_example = denoising_loss(
                self.pipe.unet,
                self.noise_scheduler,
                batch.latents.to(self.device),
                cond.to(self.device),
                generator,
                noise_offset=self.config.noise_offset,
                min_snr_gamma=self.config.min_snr_gamma,
                rows=batch.rows,
                num_rows=batch.num_rows,
            )
        diffusion = per_example.mean()
        penalty = flat.pow(2).mean()
        if not torch.isfinite(penalty):
            raise TrainingError(
                "the hypernetwork's prediction is not finite; lower loop.learning_rate or raise output_l2."
            )
        return diffusion + self.config.output_l2 * penalty, {
            "diffusion_loss": float(diffusion.detach()),
            "prediction_l2": float(penalty.detach()),
        }

    # ------------------------------------------------------------------------------------------ output

    @torch.no_grad()
    def sample(self, step: int, out_dir: Path) -> Path | None:
        """A grid: per sample subject the photos it was given, then 3 images of its predicted LoRA."""
        from pimg.imaging import row_grid

        c = self.config
        if c.sample_subjects < 1:
            return None
        if self._sample_inputs is None:
            self._sample_inputs = self._sample_subjects()
        self.hypernet.eval()
        rows = []
        for photos, caption in self._sample_inputs:
            factors = [(a[None], b[None]) for a, b in self.hypernet.predict(photos)]
            with apply_per_sample(self.pipe.unet, self.hypernet.space, factors):
                images = self.pipe(
                    [caption] * 3,
                    num_inference_steps=c.num_inference_steps,
                    guidance_scale=c.guidance_scale,
                    generator=[torch.Generator().manual_seed(k) for k in range(3)],
                    height=self.resolution,
                    width=self.resolution,
                    output_type="np",
                ).images
            shown = [np.asarray(p) for p in photos]
            rows.append(shown + [(np.clip(im, 0, 1) * 255).round().astype(np.uint8) for im in images])
        self.hypernet.train()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"sample_{step:07d}.png"
        row_grid(rows).save(path)
        return path

    def _sample_subjects(self) -> list:
        if self.subjects:
            return self.subjects.sample_inputs(self.config.sample_subjects, self.config.max_photos)
        from pimg.toyworld.subjects import random_subject

        rng = np.random.default_rng(10_007)  # fixed, so samples of every step show the same subjects
        out = []
        for _ in range(self.config.sample_subjects):
            subject = random_subject(rng)
            photos = subject.photos(self.config.max_photos, seed=int(rng.integers(2**31)))
            out.append((photos, toy_caption(self.config.token, subject, subject.backgrounds[0])))
        return out

    def save(self, out_dir: Path) -> None:
        c = self.config
        self.hypernet.save(
            out_dir,
            {
                "base": c.base,
                "token": c.token,
                "guidance_scale": c.guidance_scale,
                "max_photos": c.max_photos,
                "trained_steps": c.loop.steps,
            },
        )
        (out_dir / "README.md").write_text(
            f"# Hypernetwork for `{c.base}`\n\n"
            f"Photos of a subject -> a LiDB LoRA (rank {c.architecture.lidb.rank}, d_down {c.architecture.lidb.d_down}, "
            f"d_up {c.architecture.lidb.d_up}) over {len(self.hypernet.space.layers)} layers, in one forward pass. "
            f"Trained {c.loop.steps} steps, batch {c.batch_size}, data: {c.data}, output penalty {c.output_l2:g}.\n\n"
            "## Use\n\n"
            f"```bash\npimg hypernet predict --base {c.base} --hypernet {out_dir} --photos my_photos/ --out out/subject\n"
            f'pimg generate --base {c.base} --lora out/subject --prompt "a {c.token} <class noun> on a green background"\n```\n\n'
            "The subject folder is an ordinary LoRA (diffusers' `load_lora_weights`, kohya export beside it).\n"
        )


class SubjectFolders:
    """A folder of subject folders (`data/<subject>/*.jpg`, optional `.txt` captions), latents encoded once."""

    def __init__(self, config: HypernetTrainConfig, method: HypernetMethod):
        from pimg.photos import load_photos

        root = Path(config.data)
        if not root.is_dir():
            raise InputError(f"data {config.data!r} is neither 'toy' nor a folder of subject folders.")
        self.latents, self.captions, self.photos, self.groups = [], [], [], []
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            photos = load_photos(folder, method.resolution)
            if len(photos) < 2:
                continue
            start = len(self.latents)
            self.latents += list(encode_latents(method.pipe.vae, photos.images))
            self.photos += list(photos.images)
            self.captions += [
                (cap or config.caption).replace("{token}", config.token) for cap in photos.captions
            ]
            self.groups.append(list(range(start, start + len(photos))))
        if not self.groups:
            raise TrainingError(f"{root} holds no subject folder with 2 or more usable photos.")

    def examples(self, rng: np.random.Generator, n: int, given: int) -> list:
        out = []
        for _ in range(n):
            group = self.groups[rng.integers(len(self.groups))]
            target = int(rng.choice(group))
            others = [i for i in group if i != target]
            chosen = rng.choice(others, size=min(given, len(others)), replace=False)
            # every subject of a batch shows the same number of photos: repeat when a folder has fewer
            chosen = [int(chosen[k % len(chosen)]) for k in range(given)]
            out.append(([self.photos[i] for i in chosen], target, self.captions[target]))
        return out

    def sample_inputs(self, n: int, given: int) -> list:
        return [([self.photos[i] for i in g[1 : 1 + given]], self.captions[g[0]]) for g in self.groups[:n]]
