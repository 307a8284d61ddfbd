"""Training the toy world's base model `tiny` in three stages on the shared loop: clip, vae, unet.

- clip: a tiny CLIP learns toy captions against toy images contrastively (Radford et al. 2021).
- vae: an AutoencoderKL learns 64x64 -> 16x16x4 latents (reconstruction + a small KL term).
- decoder (optional): fine-tunes only the VAE decoder with the encoder frozen, as Stability's
  ft-MSE VAE did: sharper images, same latent space, so the trained UNet stays valid.
- unet: a UNet2DConditionModel learns epsilon-prediction (Ho et al. 2020) in the frozen VAE's latent
  space, conditioned on the frozen CLIP text tower's last hidden states, as Stable Diffusion is
  (Rombach et al. 2022). Captions are dropped 10% of the time for classifier-free guidance, and
  10% of one-object captions are the class-noun prompt (`class_noun_prompt`).

Every stage streams fresh scenes from the toy world's training split (held-out compositions never
appear), so there is no dataset to overfit and the step index alone fixes each batch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pimg.trainers.loop import LoopConfig, latest_checkpoint, run_training

from pimg.errors import TrainingError
from pimg.imaging import grid, to_model_range, to_uint8
from pimg.toyworld import architecture as arch
from pimg.toyworld.captions import SceneStream
from pimg.toyworld.tokenizer import build_tokenizer

STAGES = ("clip", "vae", "unet", "decoder")
#: Folder each stage writes its finished result to, inside its stage folder.
STAGE_RESULT = {"clip": "clip", "vae": "vae", "unet": "model", "decoder": "model"}

#: Prompts drawn in every UNet sample grid; the last three use held-out compositions.
SAMPLE_PROMPTS = (
    "a red star on a blue background",
    "a large yellow circle at the left on a black background",
    "a small green square at the top on a white background",
    "a large purple and orange striped heart on a green background",
    "a small red circle at the left and a small blue square at the right on a yellow background",
    "a white triangle at the bottom on a purple background",
)


@dataclass
class StageConfig:
    """One stage: its loop settings and batch size."""

    batch_size: int = 64
    loop: LoopConfig = field(default_factory=LoopConfig)


@dataclass
class ToyBaseConfig:
    """Settings of `pimg toyworld train-base`.

    Attributes:
        out_dir: run folder; each stage trains in `out_dir/<stage>`, the model lands in `out_dir/model`.
        stages: which stages to run, in order; later stages read earlier stages' results.
        clip, vae, unet: per-stage settings.
        caption_dropout: share of UNet training captions replaced by "" (for classifier-free guidance).
        noise_offset: per-channel constant noise added to the diffusion noise, so flat backgrounds of
            any brightness stay reachable from pure noise (Guttenberg 2023, "offset noise").
        min_snr_gamma: Min-SNR loss weighting (Hang et al. 2023), which speeds up convergence.
        sample_steps: denoising steps of the periodic UNet sample grids.
        two_object_prob: share of two-object scenes in training.
        caption_drop_prob: chance that a caption leaves out an object's size or position.
        class_prompt_prob: share of one-object UNet training captions replaced by `class_noun_prompt`
            (shape and background only). Outside the caption grammar, but the form every
            personalization prompt takes ("a sks star on a green background"): without it the base
            draws nothing for a class noun alone, and a subject method has no class prior to start from.
        decoder_subject_share: share of each decoder fine-tuning batch that is photos of random
            training subjects (rings, bands, emblems: finer detail than the grammar's objects), so
            the decoder renders what users personalize. Measured on the 5 first evaluation subjects'
            photos, encoded and decoded: mean subject fidelity 0.68 with the decoder fine-tuned on
            scenes alone (600 steps), 0.73 with this mix (1000 steps, share 0.5).
    """

    out_dir: str = "runs/tiny"
    stages: tuple[str, ...] = ("clip", "vae", "unet")
    clip: StageConfig = field(
        default_factory=lambda: StageConfig(
            batch_size=128,
            loop=LoopConfig(
                steps=600,
                learning_rate=1e-3,
                lr_schedule="cosine",
                warmup_steps=100,
                weight_decay=0.1,
                mixed_precision="bf16",
                checkpoint_every=250,
            ),
        )
    )
    vae: StageConfig = field(
        default_factory=lambda: StageConfig(
            batch_size=32,
            loop=LoopConfig(
                steps=1200,
                learning_rate=1e-3,
                lr_schedule="cosine",
                warmup_steps=100,
                weight_decay=0.0,
                mixed_precision="bf16",
                checkpoint_every=200,
                sample_every=400,
            ),
        )
    )
    unet: StageConfig = field(
        default_factory=lambda: StageConfig(
            batch_size=64,
            loop=LoopConfig(
                steps=2500,
                learning_rate=5e-4,
                lr_schedule="cosine",
                warmup_steps=150,
                weight_decay=0.01,
                mixed_precision="bf16",
                checkpoint_every=100,
                sample_every=500,
                ema_decay=0.998,
            ),
        )
    )
    sample_steps: int = 20
    decoder: StageConfig = field(
        default_factory=lambda: StageConfig(
            batch_size=16,
            loop=LoopConfig(
                steps=600,
                learning_rate=2e-4,
                lr_schedule="cosine",
                warmup_steps=50,
                weight_decay=0.0,
                mixed_precision="bf16",
                checkpoint_every=100,
                sample_every=300,
            ),
        )
    )
    caption_dropout: float = 0.1
    noise_offset: float = 0.1
    min_snr_gamma: float = 5.0
    two_object_prob: float = 0.3
    caption_drop_prob: float = 0.3
    class_prompt_prob: float = 0.1
    decoder_subject_share: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.decoder_subject_share <= 1.0:
            raise TrainingError(f"decoder_subject_share must be in [0, 1], got {self.decoder_subject_share}.")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise TrainingError(f"unknown stage(s) {unknown}; the stages are {STAGES}.")


def _stream_batch(config: ToyBaseConfig, batch_size: int, step: int, micro: int, seed: int):
    images, captions, _ = _scene_batch(config, batch_size, step, micro, seed)
    return images, captions


def _batch_seed(step: int, micro: int, seed: int) -> int:
    """The random seed of one micro-batch's data: the step index alone fixes each batch."""
    return seed * 7_919 + step * 131 + micro


def _scene_batch(config: ToyBaseConfig, batch_size: int, step: int, micro: int, seed: int):
    stream = SceneStream(
        seed=_batch_seed(step, micro, seed),
        split="train",
        two_object_prob=config.two_object_prob,
        drop_prob=config.caption_drop_prob,
    )
    return stream.batch(batch_size)


def _subject_photos(n: int, seed: int) -> np.ndarray:
    """One photo each of n random training subjects (never an evaluation subject's shape and colours)."""
    from pimg.toyworld.subjects import random_subject

    rng = np.random.default_rng(seed)
    return np.stack([random_subject(rng).photos(1, seed=int(rng.integers(2**31)))[0] for _ in range(n)])


def class_noun_prompt(scene) -> str:
    """`a star on a green background`: a one-object scene named by its shape alone (its look left open)."""
    return f"a {scene.objects[0].shape} on a {scene.background} background"


class ClipStage:
    """Contrastive image/caption training of the tiny CLIP."""

    def __init__(self, config: ToyBaseConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.clip = arch.build_clip(tokenizer, seed=config.clip.loop.seed)

    def trainable_modules(self):
        return {"clip": self.clip}

    def trainable_parameters(self):
        return list(self.clip.parameters())

    def batch(self, step, micro, seed):
        images, captions = _stream_batch(self.config, self.config.clip.batch_size, step, micro, seed)
        tokens = self.tokenizer(captions, padding="longest", return_tensors="pt")
        return to_model_range(images), tokens.input_ids, tokens.attention_mask

    def loss(self, batch, generator):
        pixels, input_ids, attention_mask = batch
        out = self.clip(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, return_loss=True
        )
        with torch.no_grad():
            top1 = (out.logits_per_image.argmax(1) == torch.arange(len(pixels))).float().mean().item()
        return out.loss, {"retrieval_top1": top1}

    def sample(self, step, out_dir):
        return None

    def save(self, out_dir):
        self.clip.save_pretrained(str(out_dir / "clip"), safe_serialization=True)


class VaeStage:
    """Reconstruction training of the tiny AutoencoderKL (MSE + L1 + small KL)."""

    kl_weight = 1e-6
    #: The VAE is fully convolutional, so it trains on random 32x32 crops: a quarter of the compute
    #: per image, with the same edges and patterns. Offsets are multiples of 4 to keep the latent grid.
    crop_size = 32

    def __init__(self, config: ToyBaseConfig):
        self.config = config
        self.vae = arch.build_vae(seed=config.vae.loop.seed)

    def trainable_modules(self):
        return {"vae": self.vae}

    def trainable_parameters(self):
        return list(self.vae.parameters())

    def batch(self, step, micro, seed):
        images, _ = _stream_batch(self.config, self.config.vae.batch_size, step, micro, seed)
        rng = np.random.default_rng(seed * 31 + step * 7 + micro)
        offsets = rng.integers(0, (64 - self.crop_size) // 4 + 1, size=(len(images), 2)) * 4
        crops = np.stack(
            [
                im[y : y + self.crop_size, x : x + self.crop_size]
                for im, (y, x) in zip(images, offsets, strict=True)
            ]
        )
        return to_model_range(crops)

    def loss(self, pixels, generator):
        posterior = self.vae.encode(pixels).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        latents = posterior.mean + posterior.std * noise
        recon = self.vae.decode(latents).sample.float()
        mse = F.mse_loss(recon, pixels)
        loss = mse + 0.1 * F.l1_loss(recon, pixels) + self.kl_weight * posterior.kl().mean()
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))  # signal range [-1, 1] spans 2
        return loss, {"psnr": psnr}

    @torch.no_grad()
    def sample(self, step, out_dir):
        pixels = to_model_range(_stream_batch(self.config, 8, 10**6, 0, 123)[0])
        recon = self.vae(pixels).sample
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"vae_{step:07d}.png"
        grid(list(to_uint8(pixels)) + list(to_uint8(recon)), columns=8).save(path)
        return path

    def save(self, out_dir):
        # SD scales latents to unit variance before diffusion; measure this VAE's scale.
        with torch.no_grad():
            pixels = to_model_range(_stream_batch(self.config, 256, 10**6, 1, 321)[0])
            std = self.vae.encode(pixels).latent_dist.mean.float().std().item()
        self.vae.register_to_config(scaling_factor=1.0 / std)
        self.vae.save_pretrained(str(out_dir / "vae"), safe_serialization=True)


class DecoderStage(VaeStage):
    """Fine-tunes the VAE decoder of a finished model on full scenes and subject photos; the encoder stays frozen."""

    def __init__(self, config: ToyBaseConfig, model_dir: Path):
        from diffusers import StableDiffusionPipeline

        self.config = config
        self.model_dir = model_dir
        self.pipeline = StableDiffusionPipeline.from_pretrained(str(model_dir))
        self.vae = self.pipeline.vae
        self.vae.encoder.requires_grad_(False)
        self.vae.quant_conv.requires_grad_(False)

    def trainable_parameters(self):
        return [p for p in self.vae.parameters() if p.requires_grad]

    def batch(self, step, micro, seed):
        n = self.config.decoder.batch_size
        n_subject = round(n * self.config.decoder_subject_share)
        parts = []
        if n > n_subject:
            parts.append(_stream_batch(self.config, n - n_subject, step, micro, seed)[0])
        if n_subject:
            parts.append(_subject_photos(n_subject, _batch_seed(step, micro, seed)))
        return to_model_range(np.concatenate(parts))

    def loss(self, pixels, generator):
        with torch.no_grad():
            latents = self.vae.encode(pixels).latent_dist.mean
        recon = self.vae.decode(latents).sample.float()
        mse = F.mse_loss(recon, pixels)
        psnr = 10 * math.log10(4.0 / max(mse.item(), 1e-10))
        return mse + 0.1 * F.l1_loss(recon, pixels), {"psnr": psnr}

    def save(self, out_dir):
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(str(self.model_dir / "clip"))
        arch.save_model_folder(self.pipeline, clip, out_dir / "model")


class UnetStage:
    """Text-conditioned latent diffusion training of the tiny UNet (frozen CLIP text tower and VAE)."""

    def __init__(self, config: ToyBaseConfig, tokenizer, clip, vae):
        from diffusers import DDPMScheduler

        self.config = config
        self.tokenizer = tokenizer
        self.clip = clip
        self.text_encoder = arch.text_encoder_from_clip(clip).eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.unet = arch.build_unet(seed=config.unet.loop.seed)
        self.noise_scheduler = DDPMScheduler(**arch.SCHEDULER_CONFIG, clip_sample=False)
        alphas = self.noise_scheduler.alphas_cumprod
        self.snr = alphas / (1 - alphas)

    def trainable_modules(self):
        return {"unet": self.unet}

    def trainable_parameters(self):
        return list(self.unet.parameters())

    @torch.no_grad()
    def encode_prompts(self, captions: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(ids)[0]

    @torch.no_grad()
    def batch(self, step, micro, seed):
        images, captions, scenes = _scene_batch(self.config, self.config.unet.batch_size, step, micro, seed)
        draws = torch.rand(len(captions), generator=torch.Generator().manual_seed(seed + step * 17 + micro))
        captions = [
            self._training_caption(d, c, s) for d, c, s in zip(draws.tolist(), captions, scenes, strict=True)
        ]
        latents = self.vae.encode(to_model_range(images)).latent_dist.mean * self.vae.config.scaling_factor
        return latents.float(), self.encode_prompts(captions).float()

    def _training_caption(self, draw: float, caption: str, scene) -> str:
        """One uniform draw picks: the empty caption, the class-noun prompt (one object only), or the caption."""
        if draw < self.config.caption_dropout:
            return ""
        if len(scene.objects) == 1 and draw < self.config.caption_dropout + self.config.class_prompt_prob:
            return class_noun_prompt(scene)
        return caption

    def loss(self, batch, generator):
        latents, text = batch
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator)
        if self.config.noise_offset:
            noise = noise + self.config.noise_offset * torch.randn(
                (n, latents.shape[1], 1, 1), generator=generator
            )
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (n,), generator=generator
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, text).sample.float()
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        snr = self.snr[timesteps]
        weight = torch.clamp(snr, max=self.config.min_snr_gamma) / snr
        return (per_sample * weight).mean(), {}

    def pipeline(self):
        return arch.assemble_pipeline(self.tokenizer, self.clip, self.vae, self.unet)

    @torch.no_grad()
    def sample(self, step, out_dir):
        pipe = self.pipeline()
        pipe.set_progress_bar_config(disable=True)
        images = []
        for i, prompt in enumerate(SAMPLE_PROMPTS):
            gen = [torch.Generator().manual_seed(i * 10 + k) for k in range(4)]
            out = pipe(
                prompt,
                num_inference_steps=self.config.sample_steps,
                guidance_scale=5.0,
                generator=gen,
                num_images_per_prompt=4,
                output_type="np",
            ).images
            images.extend((out * 255).round().astype("uint8"))
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"unet_{step:07d}.png"
        grid(images, columns=8).save(path)
        self.unet.train()
        return path

    def save(self, out_dir):
        arch.save_model_folder(self.pipeline(), self.clip, out_dir / "model")


def train_base(config: ToyBaseConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run the configured stages; returns the folder of the finished diffusers model.

    Example:
        >>> train_base(ToyBaseConfig(out_dir="runs/tiny"))  # about 2 h on a 2-core CPU
    """
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPTokenizer

    out = Path(config.out_dir)
    token_dir = out / "tokenizer"
    tokenizer = (
        CLIPTokenizer.from_pretrained(str(token_dir))
        if (token_dir / "tokenizer.json").is_file()
        else build_tokenizer(arch.tokenizer_words(), token_dir)
    )
    resolved = asdict(config)
    for stage in config.stages:
        stage_dir = out / stage
        if resume and (stage_dir / STAGE_RESULT[stage]).is_dir():
            print(f"stage {stage}: finished earlier, result in {stage_dir / STAGE_RESULT[stage]}")
            continue
        stage_resume = resume and latest_checkpoint(stage_dir) is not None
        if stage == "clip":
            method = ClipStage(config, tokenizer)
        elif stage == "vae":
            method = VaeStage(config)
        elif stage == "decoder":
            if not (out / "unet" / "model").is_dir():
                raise TrainingError(
                    f"the decoder stage fine-tunes a finished model; run the unet stage into {out} first."
                )
            method = DecoderStage(config, out / "unet" / "model")
        else:
            for needed in ("clip", "vae"):
                if not (out / needed / needed).is_dir():
                    raise TrainingError(
                        f"the unet stage needs the {needed} stage's result in {out / needed}; "
                        f"run with --stages {needed} first."
                    )
            clip = CLIPModel.from_pretrained(str(out / "clip" / "clip"))
            vae = AutoencoderKL.from_pretrained(str(out / "vae" / "vae"))
            method = UnetStage(config, tokenizer, clip, vae)
        stage_config = getattr(config, stage)
        logs = run_training(
            method,
            stage_config.loop,
            stage_dir,
            resume=stage_resume,
            resolved_config=resolved,
            progress=progress,
        )
        print(f"stage {stage} done: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
    return out / ("decoder" if "decoder" in config.stages else "unet") / "model"
