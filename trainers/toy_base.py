"""Training the toy world's base model `tiny` in stages on the shared loop: clip, vae, unet, decoder.

- clip: a tiny CLIP learns toy captions against toy images contrastively (Radford et al. 2021).
- vae: an AutoencoderKL learns 64x64 -> 16x16x4 latents (reconstruction + a small KL term).
- decoder (optional): fine-tunes only the VAE decoder with the encoder frozen, as Stability's
  ft-MSE VAE did: sharper images, same latent space, so the trained UNet stays valid.
- unet: a UNet2DConditionModel learns epsilon- or v-prediction (Ho et al. 2020; Salimans & Ho 2022) in
  the frozen VAE's latent space, conditioned on the CLIP text tower's last hidden states, as Stable
  Diffusion is (Rombach et al. 2022); the tower is frozen, or trained along (`train_text_encoder`).
  Captions are dropped 10% of the time for classifier-free guidance, and 10% of one-object captions
  are the class-noun prompt (`class_noun_prompt`). `unet_init` continues a finished model, e.g. to
  move it to a zero-terminal-SNR schedule (`zero_terminal_snr`).

Every stage streams fresh scenes from the toy world's training split (held-out compositions never
appear), so there is no dataset to overfit and the step index alone fixes each batch.

A recipe file chains runs: `phases:`, each a short diff from the phase before it, run in order
(`load_recipe`, `train_phases`); `configs/toy_base.yaml` is the five phases of the shipped `tiny`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pimg.config import dotted_to_nested, from_dict, load_config, merge
from pimg.errors import InputError, TrainingError, did_you_mean
from pimg.imaging import grid, to_model_range, to_uint8
from pimg.toyworld import architecture as arch
from pimg.toyworld.captions import SceneStream
from pimg.toyworld.checker import object_mask
from pimg.toyworld.tokenizer import build_tokenizer
from pimg.trainers.diffusion_training import Conditioning, denoising_loss
from pimg.trainers.loop import LoopConfig, latest_checkpoint, run_training

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
    """Settings of one `pimg toyworld train-base` run.

    The defaults are the first phase of the shipped `tiny` (phase `scratch` of `configs/toy_base.yaml`):
    all four stages, a 5000-step VAE, v-prediction on a zero-terminal-SNR schedule with the text tower
    trained along. The shipped model is that recipe's five phases run in order (`load_recipe`), the last
    exported; `docs/experiments/toy_base.md` has each phase's figures.

    Attributes:
        out_dir: run folder; each stage trains in `out_dir/<stage>`, the finished model lands in
            `out_dir/<last stage>/model` (`result_dir`).
        stages: which stages to run, in order; later stages read earlier stages' results.
        clip, vae, unet, decoder: per-stage settings.
        caption_dropout: share of UNet training captions replaced by "" (for classifier-free guidance).
        noise_offset: per-channel constant noise added to the diffusion noise, so flat backgrounds of
            any brightness stay reachable from pure noise (Guttenberg 2023, "offset noise").
        min_snr_gamma: Min-SNR loss weighting (Hang et al. 2023), which speeds up convergence; 0 turns it
            off, as `tiny` trains (it gives the last timesteps no weight under v-prediction with zero
            terminal SNR).
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
        train_text_encoder: train the CLIP text tower with the UNet (see `UnetStage`); the shipped
            `text_encoder` is then this tuned tower, while `clip/` keeps the contrastive one for metrics.
        text_encoder_lr: the text tower's learning rate when it trains.
        unet_init: a finished model folder (e.g. `runs/tiny/decoder/model`) whose UNet and text encoder
            start the unet stage, instead of random weights and the CLIP's text tower, and whose VAE,
            CLIP and tokenizer it keeps: a finished model continues with other settings in a new run folder.
        prediction_type: "epsilon" or "v_prediction" (what the UNet predicts; saved in the scheduler).
        object_loss_weight: extra UNet loss weight on the latent pixels an object covers (0: a plain mean).
            A small object fills ~4% of the latent, so the plain loss is mostly background; two-object
            scenes, whose objects are small and must each keep their own colours, learn slowest.
        zero_terminal_snr: rescale the noise schedule so the last timestep is pure noise
            (`architecture.noise_schedule` says why); needs v-prediction.
        high_noise_share: share of UNet examples trained at a timestep from the noisier half of the
            schedule (`denoising_loss` says why); 0 draws all timesteps uniformly.
        high_noise_share_end: if set, the share moves linearly from `high_noise_share` at the first UNet
            step to this at the last: coarse to fine. Layout is learnt at high noise and, once learnt,
            holds under uniform timesteps; pattern colours are fine detail, learnt at low noise, and
            want the last, low-learning-rate steps.
    """

    out_dir: str = "runs/tiny"
    stages: tuple[str, ...] = ("clip", "vae", "unet", "decoder")
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
                steps=5000,
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
                steps=3000,
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
                steps=1000,
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
    min_snr_gamma: float = 0.0
    two_object_prob: float = 0.3
    caption_drop_prob: float = 0.3
    class_prompt_prob: float = 0.1
    decoder_subject_share: float = 0.5
    train_text_encoder: bool = True
    text_encoder_lr: float = 1e-4
    unet_init: str | None = None
    prediction_type: str = "v_prediction"
    zero_terminal_snr: bool = True
    object_loss_weight: float = 0.0
    high_noise_share: float = 0.0
    high_noise_share_end: float | None = None

    def __post_init__(self):
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise TrainingError(
                f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}."
            )
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise TrainingError(
                "zero_terminal_snr needs prediction_type: v_prediction (at zero SNR the noise is the input, "
                "so predicting it teaches nothing)."
            )
        if self.object_loss_weight < 0:
            raise TrainingError(f"object_loss_weight must be >= 0, got {self.object_loss_weight}.")
        for name in ("high_noise_share", "high_noise_share_end"):
            share = getattr(self, name)
            if share is not None and not 0.0 <= share <= 1.0:
                raise TrainingError(f"{name} must be in [0, 1], got {share}.")
        if not 0.0 <= self.decoder_subject_share <= 1.0:
            raise TrainingError(f"decoder_subject_share must be in [0, 1], got {self.decoder_subject_share}.")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise TrainingError(f"unknown stage(s) {unknown}; the stages are {STAGES}.")

    def result_dir(self) -> Path:
        """The folder the last stage's result lands in (after unet or decoder: the finished model)."""
        last = self.stages[-1]
        return Path(self.out_dir) / last / STAGE_RESULT[last]

    def high_noise_share_at(self, step: int) -> float:
        """The share of UNet timesteps drawn from the noisier half at UNet step `step`."""
        start, end = self.high_noise_share, self.high_noise_share_end
        if end is None:
            return start
        last = max(self.unet.loop.steps - 1, 1)
        return start + (end - start) * min(step, last) / last


@dataclass
class ToyBaseRecipe(ToyBaseConfig):
    """A `train-base` YAML file: settings at the top, then optionally `phases`, run in order.

    Attributes:
        phases: mappings, each a `name` and a diff from the phase before it (the first: from the
            settings above `phases`); each phase needs its own `out_dir`, and a continuing phase names
            the previous one's result as `unet_init`. A file without `phases` is one run.
    """

    phases: list[dict] = field(default_factory=list)


class Phase(NamedTuple):
    """One run of a recipe: its name and its resolved settings."""

    name: str
    config: ToyBaseConfig


def load_recipe(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, phase: str | None = None
) -> list[Phase]:
    """The phases of a `train-base` YAML file, in order, each resolved into a validated ToyBaseConfig.

    Phase k is: defaults <- the file's top-level settings <- phases 1..k's keys, in order <- `overrides`.
    A file without `phases` is one phase, named after the file (no file: `defaults`).

    Args:
        path: YAML file; None: the defaults.
        overrides: dotted keys (CLI flags) applied to every phase; None values mean "not given".
        phase: keep only the phase of this name (resolved after the phases before it).

    Returns:
        The phases to run, in order.

    Example:
        >>> [p.name for p in load_recipe("configs/toy_base.yaml")]
        ['scratch', 'more', 'binding', 'objects', 'objects_more']
    """
    where = Path(path).name if path else "config"
    recipe = load_config(ToyBaseRecipe, path)
    settings = asdict(recipe)
    entries = settings.pop("phases") or [{"name": Path(path).stem if path else "defaults"}]
    extra = dotted_to_nested(overrides or {})
    phases: list[Phase] = []
    folders: dict[str, str] = {}  # each phase's own out_dir, before --out
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name"):
            raise InputError(
                f"{where}: phases[{i}] must be a mapping with a name (`- name: more`), got {entry!r}."
            )
        diff = dict(entry)
        name = str(diff.pop("name"))
        if name in folders:
            raise InputError(f"{where}: two phases are named {name!r}; give each phase its own name.")
        settings = merge(settings, diff)
        folders[name] = settings["out_dir"]
        config = from_dict(ToyBaseConfig, merge(settings, extra), where=f"{where} phases[{name}]")
        phases.append(Phase(name, config))
    if len(set(folders.values())) < len(folders):
        raise InputError(
            f"{where}: phases share an out_dir ({', '.join(f'{n}: {d}' for n, d in folders.items())}); "
            "give each phase its own (a phase without one inherits the one before it)."
        )
    if phase is not None:
        names = [p.name for p in phases]
        if phase not in names:
            hint = did_you_mean(phase, names)
            raise InputError(f"no phase {phase!r} in {where}.{hint} Its phases: {', '.join(names)}.")
        phases = [p for p in phases if p.name == phase]
    if len(phases) > 1 and extra.get("out_dir"):
        raise InputError(
            f"an out_dir override (--out) names one run folder, but {where} runs {len(phases)} phases, "
            "each into its own out_dir; pick one phase (--phase NAME), or leave --out out."
        )
    return phases


def _check_unet_inits(phases: list[Phase]) -> None:
    """Before any training: each `unet_init` is a finished model or the result of an earlier phase."""
    made: list[Path] = []
    for phase in phases:
        init = phase.config.unet_init
        if init and Path(init) not in made and not (Path(init) / "model_index.json").is_file():
            earlier = ", ".join(str(m) for m in made) or "none"
            raise TrainingError(
                f"phase {phase.name}: unet_init {init} is neither a finished model folder (no "
                f"model_index.json) nor an earlier phase's result (earlier phases write: {earlier}); "
                "run the phase that makes it first, or fix the path."
            )
        made.append(phase.config.result_dir())


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
            matches = out.logits_per_image.argmax(1) == torch.arange(len(pixels), device=pixels.device)
            top1 = matches.float().mean().item()
        return out.loss, {"retrieval_top1": top1}

    def sample(self, step, out_dir):
        return None

    def save(self, out_dir):
        self.clip.save_pretrained(str(out_dir / "clip"), safe_serialization=True)


class VaeStage:
    """Reconstruction training of the tiny AutoencoderKL (MSE + L1 + small KL).

    Steps matter more than size here: the same network reached 24.9 dB held-out PSNR after 1200 steps
    and 32.1 dB after 5000 (`docs/experiments/toy_base.md`), where its round trips stop costing the
    checker's colour, shape and two-object readings anything.
    """

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
        pixels = to_model_range(_stream_batch(self.config, 8, 10**6, 0, 123)[0]).to(self.vae.device)
        recon = self.vae(pixels).sample
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"vae_{step:07d}.png"
        grid(list(to_uint8(pixels)) + list(to_uint8(recon)), columns=8).save(path)
        return path

    def save(self, out_dir):
        # SD scales latents to unit variance before diffusion; measure this VAE's scale.
        with torch.no_grad():
            pixels = to_model_range(_stream_batch(self.config, 256, 10**6, 1, 321)[0]).to(self.vae.device)
            std = self.vae.encode(pixels).latent_dist.mean.float().std().item()
        self.vae.register_to_config(scaling_factor=1.0 / std)
        self.vae.save_pretrained(str(out_dir / "vae"), safe_serialization=True)


class DecoderStage(VaeStage):
    """Fine-tunes the VAE decoder of a finished model on full scenes and subject photos; the encoder stays frozen.

    It cannot make up for an under-trained encoder: on the 1200-step VAE's latents, a new decoder of twice
    the width (channels 64, 128, 128) trained 700 steps reached 26.0 dB held-out PSNR, this fine-tune
    26.8 dB; a VAE trained 5000 steps reaches 32.1 dB before any fine-tune.
    """

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


class UnetBatch(NamedTuple):
    """One UNet micro-batch. The timestep share rides along because the loss draws the timesteps and, by the
    loop's contract, sees only the batch and a generator, not the step."""

    latents: torch.Tensor
    text: torch.Tensor  # token ids when the text tower trains, else its (fixed) hidden states
    pixel_weights: torch.Tensor | None
    high_noise_share: float


class UnetStage:
    """Text-conditioned latent diffusion training of the tiny UNet on the frozen VAE's latents.

    The CLIP text tower conditions the UNet, frozen as in SD, or trained with it (`train_text_encoder`):
    contrastive training never needs words the image batch does not contrast, so the frozen tower
    barely tells "at the left" from "at the right" and the UNet cannot follow what it is not told.
    """

    def __init__(self, config: ToyBaseConfig, tokenizer, clip, vae):
        from accelerate import PartialState
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        self.config = config
        self.tokenizer = tokenizer
        self.clip = clip
        # Accelerate places only the modules that train; the frozen VAE (and a frozen text tower) encode
        # every batch, so they go to the training device here.
        self.device = PartialState().device
        self.vae = vae.eval().requires_grad_(False).to(self.device)
        if config.unet_init:
            init = Path(config.unet_init)
            self.unet = UNet2DConditionModel.from_pretrained(str(init / "unet")).float()
            self.text_encoder = CLIPTextModel.from_pretrained(str(init / "text_encoder")).float()
        else:
            self.unet = arch.build_unet(seed=config.unet.loop.seed)
            self.text_encoder = arch.text_encoder_from_clip(clip)
        self.text_encoder.requires_grad_(config.train_text_encoder).train(config.train_text_encoder)
        self.text_encoder.to(self.device)
        if self.device.type != "cuda":
            _use_plain_attention(self.unet, self.text_encoder)
        schedule = arch.noise_schedule(config.prediction_type, config.zero_terminal_snr)
        self.noise_scheduler = DDPMScheduler(**schedule, clip_sample=False)

    def trainable_modules(self):
        if self.config.train_text_encoder:
            return {"unet": self.unet, "text_encoder": self.text_encoder}
        return {"unet": self.unet}

    def trainable_parameters(self):
        if self.config.train_text_encoder:
            return [
                {"params": list(self.unet.parameters())},
                {"params": list(self.text_encoder.parameters()), "lr": self.config.text_encoder_lr},
            ]
        return list(self.unet.parameters())

    def token_ids(self, captions: list[str]) -> torch.Tensor:
        return self.tokenizer(
            captions,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    @torch.no_grad()
    def batch(self, step, micro, seed):
        images, captions, scenes = _scene_batch(self.config, self.config.unet.batch_size, step, micro, seed)
        draws = torch.rand(len(captions), generator=torch.Generator().manual_seed(seed + step * 17 + micro))
        captions = [
            self._training_caption(d, c, s) for d, c, s in zip(draws.tolist(), captions, scenes, strict=True)
        ]
        pixels = to_model_range(images).to(self.device)
        # bf16 encodes a batch 3x faster on a CPU (0.08 against 0.26 s for 32 scenes); the latents move
        # by at most 0.6% of their range, well under the diffusion noise put on them.
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        ids = self.token_ids(captions).to(self.device)
        # A frozen text tower's output is fixed: encode here, outside the autograd graph.
        text = ids if self.config.train_text_encoder else self.text_encoder(ids)[0].float()
        pixel_weights = self._pixel_weights(images, scenes, latents.shape[-1])
        return UnetBatch(latents.float(), text, pixel_weights, self.config.high_noise_share_at(step))

    def _pixel_weights(self, images: np.ndarray, scenes, latent_size: int) -> torch.Tensor | None:
        """1 + object_loss_weight on latent pixels that hold any object pixel, else 1 (None when off)."""
        if not self.config.object_loss_weight:
            return None
        masks = np.stack(
            [object_mask(image, scene.background) for image, scene in zip(images, scenes, strict=True)]
        )
        covered = F.adaptive_max_pool2d(torch.from_numpy(masks).float()[:, None], latent_size)
        return 1.0 + self.config.object_loss_weight * covered

    def _training_caption(self, draw: float, caption: str, scene) -> str:
        """One uniform draw picks: the empty caption, the class-noun prompt (one object only), or the caption."""
        if draw < self.config.caption_dropout:
            return ""
        if len(scene.objects) == 1 and draw < self.config.caption_dropout + self.config.class_prompt_prob:
            return class_noun_prompt(scene)
        return caption

    def loss(self, batch: UnetBatch, generator):
        text = self.text_encoder(batch.text)[0] if self.config.train_text_encoder else batch.text
        per_example = denoising_loss(
            self.unet,
            self.noise_scheduler,
            batch.latents,
            Conditioning(text),
            generator,
            noise_offset=self.config.noise_offset,
            min_snr_gamma=self.config.min_snr_gamma,
            pixel_weights=batch.pixel_weights,
            high_noise_share=batch.high_noise_share,
        )
        return per_example.mean(), {"high_noise_share": batch.high_noise_share}

    def pipeline(self):
        scheduler = arch.build_scheduler(self.config.prediction_type, self.config.zero_terminal_snr)
        return arch.assemble_pipeline(self.tokenizer, self.text_encoder, self.vae, self.unet, scheduler)

    @torch.no_grad()
    def sample(self, step, out_dir):
        from pimg.inference.pipeline import PersonalizedPipeline

        pipe = PersonalizedPipeline(self.pipeline(), "toy base in training")
        pipe.pipe.set_progress_bar_config(disable=True)
        images = []
        for i, prompt in enumerate(SAMPLE_PROMPTS):
            generated = pipe.generate(
                prompt,
                num_images=4,
                seed=i * 10,
                num_inference_steps=self.config.sample_steps,
                guidance_scale=5.0,
            )
            images.extend(np.asarray(g.image) for g in generated)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"unet_{step:07d}.png"
        grid(images, columns=8).save(path)
        self.unet.train()
        self.text_encoder.train(self.config.train_text_encoder)
        return path

    def save(self, out_dir):
        arch.save_model_folder(self.pipeline(), self.clip, out_dir / "model")


def _use_plain_attention(unet, text_encoder) -> None:
    """Attention as softmax(QK^T)V in plain matrix products, instead of PyTorch's fused SDPA kernel.

    At these sizes (256 tokens, 16-dim heads) the fused kernel's CPU backward is slow: a batch-32
    training step of the UNet and text tower took 0.83 s with SDPA and 0.59 s with this (bf16, 2 cores).
    The weights and what they compute are unchanged. Only CUDA keeps SDPA; any other device (CPU, and
    Apple's MPS, whose speed here was never measured) gets this.
    """
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())
    text_encoder.set_attn_implementation("eager")


def _unet_stage_inputs(config: ToyBaseConfig, out: Path):
    """The CLIP and VAE the unet stage works with: the run's own clip and vae stages, or `unet_init`'s."""
    from diffusers import AutoencoderKL
    from transformers import CLIPModel

    if config.unet_init:
        init = Path(config.unet_init)
        return CLIPModel.from_pretrained(str(init / "clip")), AutoencoderKL.from_pretrained(str(init / "vae"))
    for needed in ("clip", "vae"):
        if not (out / needed / needed).is_dir():
            raise TrainingError(
                f"the unet stage needs the {needed} stage's result in {out / needed}; "
                f"run with --stages {needed} first."
            )
    return (
        CLIPModel.from_pretrained(str(out / "clip" / "clip")),
        AutoencoderKL.from_pretrained(str(out / "vae" / "vae")),
    )


def train_base(config: ToyBaseConfig, resume: bool = False, progress: bool = True) -> Path:
    """Run the configured stages; returns the last stage's result folder (after unet or decoder: the
    finished diffusers model).

    Example:
        >>> train_base(ToyBaseConfig())  # the shipped tiny's first phase: ~1.9 h on 2 cores
    """
    from transformers import CLIPTokenizer

    out = Path(config.out_dir)
    token_dir = out / "tokenizer"
    if config.unet_init and not (Path(config.unet_init) / "model_index.json").is_file():
        raise TrainingError(
            f"unet_init {config.unet_init} is not a finished model folder (no model_index.json)."
        )
    if config.unet_init:  # a continued model keeps its tokenizer: its ids are what its text tower learned
        tokenizer = CLIPTokenizer.from_pretrained(str(Path(config.unet_init) / "tokenizer"))
    elif (token_dir / "tokenizer.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(str(token_dir))
    else:
        tokenizer = build_tokenizer(arch.tokenizer_words(), token_dir)
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
            clip, vae = _unet_stage_inputs(config, out)
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
    return config.result_dir()


def train_phases(phases: list[Phase], resume: bool = False, progress: bool = True) -> Path:
    """Run a recipe's phases in order, each a `train_base` run; returns the last phase's result folder.

    With `resume`, finished stages (and so finished phases) are skipped and a stopped one continues
    from its newest checkpoint. Every `unet_init` is checked before the first step.

    Example:
        >>> train_phases(load_recipe("configs/toy_base.yaml"), resume=True)  # the shipped tiny, ~4 h
    """
    if not phases:
        raise TrainingError("no phases to run; load them with load_recipe(path).")
    _check_unet_inits(phases)
    for i, phase in enumerate(phases, start=1):
        if len(phases) > 1:
            print(f"phase {phase.name} ({i}/{len(phases)}) in {phase.config.out_dir}")
        folder = train_base(phase.config, resume=resume, progress=progress)
    return folder
