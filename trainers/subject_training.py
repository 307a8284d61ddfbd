"""The set-up every subject-learning method shares: base model, photos, cached latents, prompts, samples.

A method (DreamBooth, LoRA, Textual Inversion in `pimg.trainers`) subclasses `SubjectTraining`,
marks what it trains, and adds its loss terms and its save format; everything below is common:

- the base pipeline, loaded on the CPU in float32 and moved to accelerate's device;
- the user's photos (`pimg.photos`), VAE-encoded once since the VAE is always frozen;
- instance prompts (`a {token} {class_noun}`, or the photo's sidecar caption), and their text
  embeddings cached when no text-encoder weight is trained;
- `batch(step, micro, seed)`: a pure function of its arguments (an epoch-wise permutation of the
  photos seeded by the epoch), which the loop's exact resume relies on; under several processes,
  this process's rows of the global batch, whose noise `loss` draws as one process would;
- sample grids and the model card written beside every output.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from pimg.errors import InputError
from pimg.imaging import grid
from pimg.models import recommended_guidance
from pimg.trainers.diffusion_training import (
    Conditioning,
    TextConditioner,
    denoising_loss,
    encode_latents,
    fill_prompt,
    sdxl_time_ids,
    training_noise_scheduler,
)
from pimg.trainers.loop import Shard, process_state


@dataclass
class SubjectConfig:
    """Settings every subject method shares; each method's config subclasses this and adds `loop`.

    Attributes:
        base: base model (built-in name, diffusers folder, single file or hub id; see `load_base`).
        photos: folder of the subject's photos (sidecar `.txt` captions optional).
        token: the word the subject is bound to ("sks"); methods that learn a new token need an
            unused one such as "<sks>".
        class_noun: what the subject is ("dog", "star"); used in prompts and class images.
        prompt_template: instance prompt for photos without a caption; captions may use the same
            `{token}` and `{class_noun}` placeholders.
        auto_caption: photos without a caption get `prompt_template` plus the phrase of
            `caption_phrases` that describes them best, chosen by the base itself
            (`pimg.trainers.auto_caption`), so the token learns the subject and not its background.
        caption_phrases: the candidates ("on a beach", ...); empty takes the base's defaults (on
            `tiny` its eight backgrounds).
        out_dir: where the result, checkpoints, samples, logs and the model card go.
        resolution: training size in pixels; None takes the base's native size (tiny 64, SD 1.5 512,
            SDXL 1024). Photos are resized and centre-cropped to it, never upscaled.
        batch_size: photos per micro-batch.
        flip: add horizontally flipped copies of the photos (off: subjects are often not symmetric).
        noise_offset: offset noise strength (see `denoising_loss`).
        min_snr_gamma: Min-SNR loss weighting; None turns it off.
        sample_prompts: prompts of the sample grid (placeholders as in `prompt_template`).
        sample_images: images per sample prompt.
        num_inference_steps: denoising steps for samples.
        guidance_scale: classifier-free guidance recommended for the trained subject: the sample
            grid uses it, the model card and `config.json` record it, and `pimg generate` and
            `pimg eval toysubject` use it when no guidance is given (see `pimg.inference.guidance`).
            None takes the base's recommendation.
    """

    base: str = "tiny"
    photos: str = ""
    token: str = "sks"
    class_noun: str = ""
    prompt_template: str = "a {token} {class_noun}"
    auto_caption: bool = False
    caption_phrases: tuple[str, ...] = ()
    out_dir: str = "out/train"
    resolution: int | None = None
    batch_size: int = 1
    flip: bool = False
    noise_offset: float = 0.0
    min_snr_gamma: float | None = None
    sample_prompts: tuple[str, ...] = ("a {token} {class_noun}",)
    sample_images: int = 4
    num_inference_steps: int = 25
    guidance_scale: float | None = None

    def __post_init__(self):
        if not self.token or any(c.isspace() for c in self.token):
            raise InputError(f"token must be one word without spaces, e.g. 'sks'; got {self.token!r}.")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise InputError(
                f"resolution must be a multiple of 8 (or None for the base's), got {self.resolution}."
            )
        if self.batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.sample_images < 0:
            raise InputError(f"sample_images must be >= 0, got {self.sample_images}.")
        if "{token}" not in self.prompt_template:
            raise InputError(
                f"prompt_template {self.prompt_template!r} lacks '{{token}}', so nothing binds the subject to the "
                "token; e.g. 'a {token} {class_noun}'."
            )

    def recommended_guidance(self) -> float:
        """The classifier-free guidance of the samples, and the one recommended for the result."""
        return recommended_guidance(self.base) if self.guidance_scale is None else self.guidance_scale

    def check_required(self) -> None:
        """The fields with no usable default, checked when training starts."""
        if not self.photos:
            raise InputError("no photos given: pass --photos DIR (a folder of the subject's photos).")
        if not self.class_noun.strip():
            raise InputError("no class noun given: pass --class-noun WORD, what the subject is (e.g. 'dog').")


@dataclass
class SubjectBatch:
    """One micro-batch: cached latents, their prompts (filled, not yet expanded) and SDXL time ids.

    `rows` are its rows of the step's global batch of `num_rows` (see `denoising_loss`); None: all of it.
    """

    latents: torch.Tensor
    prompts: list[str]
    time_ids: torch.Tensor | None
    rows: list[int] | None = None
    num_rows: int | None = None


def epoch_indices(
    n_items: int,
    batch_size: int,
    accumulation: int,
    step: int,
    micro: int,
    seed: int,
    shard: Shard | None = None,
) -> list[int]:
    """Indices of one micro-batch: every item once per epoch, in an order seeded by (seed, epoch).

    A pure function of its arguments, so a resumed run sees exactly the batches of an uninterrupted one.
    The global micro-batch is the next `shard.num_processes * batch_size` items of that order; `shard`
    takes its rows of it, so N processes with `batch_size` b see, together, what one process with N*b
    sees. None: one process.

    Example:
        >>> epoch_indices(4, 1, 1, 0, 0, 0, Shard(1, 2)) == epoch_indices(4, 2, 1, 0, 0, 0)[1:]
        True
    """
    shard = shard or Shard()
    first = (step * accumulation + micro) * batch_size * shard.num_processes
    out = []
    for row in shard.rows(batch_size):
        epoch, position = divmod(first + row, n_items)
        out.append(int(np.random.default_rng([seed, epoch]).permutation(n_items)[position]))
    return out


class SubjectTraining:
    """Base of the subject methods: subclasses set up what they train, then call `finish_setup()`.

    Subclasses provide `trainable_modules`, `trainable_parameters` and `save`, and may extend `loss`.
    """

    #: Does the method train weights inside the text encoder(s)? If not, prompt embeddings are cached.
    trains_text = False
    #: Name of the method in model cards and metadata.
    method_name = "subject"

    def __init__(
        self, config: SubjectConfig, *, seed: int, accumulation: int = 1, mixed_precision: str = "no"
    ):
        from pimg.models import load_base
        from pimg.photos import load_photos

        config.check_required()
        self.config = config
        self.seed = seed
        self.accumulation = accumulation
        self.mixed_precision = mixed_precision
        self.device = process_state().device
        #: This process's rows of every global batch (one shard of one outside a launcher).
        self.shard = Shard.of_process()
        self.pipe = load_base(config.base)
        self.pipe.set_progress_bar_config(disable=True)
        for module in self.components().values():
            module.requires_grad_(False)
        self.sdxl = getattr(self.pipe, "text_encoder_2", None) is not None
        self.resolution = config.resolution or self.native_resolution()
        self.photos = load_photos(config.photos, self.resolution)  # warns about each skipped file
        self.pipe.vae.to(self.device)
        images = self.photos.images
        captions = list(self.photos.captions)
        time_ids = [
            sdxl_time_ids(o, c, (self.resolution,) * 2)
            for o, c in zip(self.photos.original_sizes, self.photos.crop_offsets, strict=True)
        ]
        if config.flip:
            images = np.concatenate([images, images[:, :, ::-1]])
            captions, time_ids = captions * 2, time_ids * 2
        self.latents = encode_latents(self.pipe.vae, images)
        self.noise_scheduler = training_noise_scheduler(self.pipe.scheduler.config)
        self.conditioner = TextConditioner.from_pipeline(self.pipe)
        #: The captions `auto_caption` chose, by photo file name (listed in the model card).
        self.auto_captions: dict[str, str] = {}
        if config.auto_caption:
            captions = self._caption_missing(captions, time_ids)
        elif bare := sum(c is None for c in self.photos.captions):
            warnings.warn(
                f"{bare} of {len(self.photos)} photos have no caption, so all of them train on "
                f"'{config.prompt_template}' and the token learns their backgrounds as well as the subject. "
                "Pass --auto-caption (auto_caption: true) to have the base name each photo's setting, or "
                "write a photo.txt caption beside each photo.",
                stacklevel=2,
            )
        self.instance_prompts = [self.prompt(c or config.prompt_template) for c in captions]
        self.instance_time_ids = torch.stack(time_ids) if self.sdxl else None
        self._text_cache: dict[str, Conditioning] = {}
        self.last_sample: Path | None = None

    def _caption_missing(self, captions: list[str | None], time_ids: list[torch.Tensor]) -> list[str | None]:
        """`captions` (flipped copies, if any, after the photos) with each missing one chosen by the base."""
        from pimg.trainers.auto_caption import default_phrases, pick_phrases

        photos = len(self.photos)  # a flipped copy has its photo's setting: classify the photos only
        missing = [i for i, caption in enumerate(captions[:photos]) if caption is None]
        if not missing:
            return captions
        phrases = list(self.config.caption_phrases or default_phrases(self.config.base))
        self.pipe.unet.to(self.device)
        chosen = pick_phrases(
            self.pipe.unet,
            self.noise_scheduler,
            self.latents[missing].to(self.device),
            self.conditioner,
            [f"a {self.config.class_noun} {phrase}" for phrase in phrases],
            time_ids=torch.stack([time_ids[i] for i in missing]) if self.sdxl else None,
        )
        per_photo = list(captions[:photos])
        for i, choice in zip(missing, chosen, strict=True):
            per_photo[i] = f"{self.config.prompt_template} {phrases[choice]}"
            self.auto_captions[self.photos.paths[i].name] = per_photo[i]
        return per_photo * (len(captions) // photos)

    # ------------------------------------------------------------------------------------------ set-up

    def components(self) -> dict[str, torch.nn.Module]:
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
        return {n: getattr(self.pipe, n) for n in names if getattr(self.pipe, n, None) is not None}

    def text_components(self) -> dict[str, torch.nn.Module]:
        return {n: m for n, m in self.components().items() if n.startswith("text_encoder")}

    @property
    def base_location(self) -> str:
        """Where plain diffusers finds the base: a built-in name's folder, else the name as given."""
        from pimg.models import describe_base

        kind, location = describe_base(self.config.base)
        return location if kind == "builtin" else self.config.base

    def native_resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor)

    def prompt(self, template: str) -> str:
        """A prompt template or caption with the token and class noun filled in."""
        return fill_prompt(template, self.config.token, self.config.class_noun)

    def expand_prompt(self, prompt: str) -> str:
        """How the text encoder sees a prompt (methods with multi-vector tokens spell them out)."""
        return prompt

    def finish_setup(self) -> None:
        """Move everything to the device; on CUDA with mixed precision, frozen weights go to half precision."""
        half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.mixed_precision)
        for module in self.components().values():
            module.to(self.device)
            if half is not None and self.device.type == "cuda":
                # As diffusers' training examples: frozen weights in half precision, trained ones in float32.
                for param in module.parameters():
                    param.data = param.data.to(torch.float32 if param.requires_grad else half)

    # ------------------------------------------------------------------------------------------ training

    def batch(self, step: int, micro: int, seed: int) -> SubjectBatch:
        b = self.config.batch_size
        idx = epoch_indices(len(self.latents), b, self.accumulation, step, micro, seed, self.shard)
        time_ids = self.instance_time_ids[idx] if self.instance_time_ids is not None else None
        prompts = [self.instance_prompts[i] for i in idx]
        rows = list(self.shard.rows(b))
        return SubjectBatch(self.latents[idx], prompts, time_ids, rows, b * self.shard.num_processes)

    def conditioning(self, prompts: list[str], time_ids: torch.Tensor | None) -> Conditioning:
        """Text conditioning of a batch: from the cache when the text encoders are frozen."""
        if self.trains_text:
            cond = self.conditioner.encode([self.expand_prompt(p) for p in prompts])
        else:
            missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
            if missing:
                with torch.no_grad():
                    encoded = self.conditioner.encode([self.expand_prompt(p) for p in missing])
                for i, p in enumerate(missing):
                    self._text_cache[p] = Conditioning(
                        encoded.prompt_embeds[i : i + 1].float(),
                        None if encoded.pooled is None else encoded.pooled[i : i + 1].float(),
                    )
            cond = Conditioning.cat([self._text_cache[p] for p in prompts])
        return cond.with_time_ids(time_ids) if time_ids is not None else cond

    def example_losses(
        self, latents: torch.Tensor, prompts: list[str], time_ids, generator, rows=None, num_rows=None
    ) -> torch.Tensor:
        """Per-example denoising loss of latents under their prompts (`rows`: see `denoising_loss`)."""
        cond = self.conditioning(prompts, time_ids).to(self.device)
        return denoising_loss(
            self.pipe.unet,
            self.noise_scheduler,
            latents.to(self.device),
            cond,
            generator,
            noise_offset=self.config.noise_offset,
            min_snr_gamma=self.config.min_snr_gamma,
            rows=rows,
            num_rows=num_rows,
        )

    def loss(self, batch: SubjectBatch, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        # The mean over this process's rows: the loop averages gradients over processes of equal shares,
        # which makes it the mean over the global batch.
        losses = self.example_losses(
            batch.latents, batch.prompts, batch.time_ids, generator, batch.rows, batch.num_rows
        )
        return losses.mean(), {}

    # ------------------------------------------------------------------------------------------ output

    @torch.no_grad()
    def generate(
        self, prompts: list[str], n: int, seed: int = 0, guidance: float | None = None
    ) -> list[np.ndarray]:
        """n uint8 images per prompt from the current weights (image k of a prompt uses seed + k).

        guidance: None takes `self.config.recommended_guidance()`.
        """
        from pimg.inference.pipeline import PersonalizedPipeline

        guidance = self.config.recommended_guidance() if guidance is None else guidance
        # Through the shared pipeline, as every generation in pimg, on the weights being trained.
        sampler = PersonalizedPipeline(self.pipe, self.config.base)
        images = []
        for prompt in prompts:
            generated = sampler.generate(
                prompt,
                num_images=n,
                seed=seed,
                num_inference_steps=self.config.num_inference_steps,
                guidance_scale=guidance,
                height=self.resolution,
                width=self.resolution,
            )
            images.extend(np.asarray(g.image) for g in generated)
        return images

    def sample(self, step: int, out_dir: Path) -> Path | None:
        if not self.config.sample_images or not self.config.sample_prompts:
            return None
        prompts = [self.prompt(p) for p in self.config.sample_prompts]
        images = self.generate(prompts, self.config.sample_images)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.last_sample = out_dir / f"sample_{step:07d}.png"
        grid(images, columns=self.config.sample_images).save(self.last_sample)
        return self.last_sample

    def write_model_card(self, out_dir: Path, steps: int, files: list[str], usage: str) -> Path:
        """README.md with base, token, class, steps, the sample grid, the files and how to load them."""
        c = self.config
        sample = f"![samples]({self.last_sample.relative_to(out_dir)})\n\n" if self.last_sample else ""
        prompts = ", ".join(f"`{self.prompt(p)}`" for p in c.sample_prompts)
        lines = [
            f"# {self.method_name}: `{c.token}` {c.class_noun}",
            "",
            "| | |",
            "|---|---|",
            f"| method | {self.method_name} |",
            f"| base | `{c.base}` |",
            f"| token | `{c.token}` |",
            f"| class noun | `{c.class_noun}` |",
            f"| training steps | {steps} |",
            f"| recommended guidance | {c.recommended_guidance()} |",
            f"| photos | {len(self.photos)} at {self.resolution} px |",
            f"| files | {', '.join(f'`{f}`' for f in files)} |",
            "",
            *(
                ["Captions chosen by `auto_caption` (the base as a zero-shot classifier):", ""]
                + [f"- `{name}`: {caption}" for name, caption in self.auto_captions.items()]
                + [""]
                if self.auto_captions
                else []
            ),
            f"Sample grid ({prompts}; {c.sample_images} seeds each):",
            "",
            sample + "## Use",
            "",
            "```python",
            usage.strip(),
            "```",
            "",
            "The full resolved training configuration is in `config.json`.",
        ]
        path = out_dir / "README.md"
        path.write_text("\n".join(lines) + "\n")
        return path


def config_record(config) -> dict:
    """A config dataclass as JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(asdict(config), default=str))
