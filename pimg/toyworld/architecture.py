"""The tiny base model's architecture, as data: Stable Diffusion's parts at toy-world scale.

The same classes as SD 1.x (CLIP text tower, AutoencoderKL, UNet2DConditionModel), so every
pimg method that works on `tiny` runs unchanged on a real SD checkpoint. Sizes were picked by
measured CPU speed: a batch-8 UNet forward (4 images with classifier-free guidance) in ~60 ms on
2 cores keeps 25-step generation of 4 images within a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

#: CLIP text tower; its last hidden state conditions the UNet, as in SD 1.x.
TEXT_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=128,
)

#: CLIP vision tower: a ViT over 8x8 patches of the 64x64 image.
VISION_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    image_size=64,
    patch_size=8,
    hidden_act="quick_gelu",
    projection_dim=128,
)

#: 64x64x3 -> 16x16x4 latents (two downsamplings), as SD's 8x VAE is to 512 px.
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=64,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(64, 128, 256),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=TEXT_CONFIG["hidden_size"],
    attention_head_dim=4,
    norm_num_groups=16,
)

#: SD 1.x's noise schedule.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
)

#: SD 1.x's latent scale; the trained VAE's own value replaces it (1 / std of its latents).
DEFAULT_LATENT_SCALE = 0.18215


def tokenizer_words() -> list[str]:
    """Every word the tiny tokenizer keeps whole: the grammar, rare identifiers, a few prompt words."""
    from pimg.toyworld.captions import VOCABULARY
    from pimg.toyworld.tokenizer import EXTRA_WORDS, RARE_TOKENS

    return sorted(set(VOCABULARY) | set(RARE_TOKENS) | set(EXTRA_WORDS))


def build_clip(tokenizer, seed: int = 0):
    """A randomly initialised tiny `CLIPModel` (text + vision towers)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    text = dict(
        TEXT_CONFIG,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = CLIPConfig(
        text_config=text, vision_config=VISION_CONFIG, projection_dim=TEXT_CONFIG["projection_dim"]
    )
    return CLIPModel(config)


def build_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG, scaling_factor=DEFAULT_LATENT_SCALE)


def build_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**UNET_CONFIG)


def noise_schedule(prediction_type: str = "epsilon", zero_terminal_snr: bool = False) -> dict:
    """SD 1.x's schedule, optionally rescaled to zero terminal SNR (Lin et al. 2024, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed"). SD's last training step keeps sqrt(0.0047) of the
    image, so a model learns to read the layout off that leak, and at sampling time, from pure noise,
    takes it from the noise instead of the prompt. Zero terminal SNR needs v-prediction and sampling that
    starts at the last timestep ("trailing" spacing)."""
    schedule = dict(SCHEDULER_CONFIG, prediction_type=prediction_type)
    if zero_terminal_snr:
        schedule.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return schedule


def build_scheduler(prediction_type: str = "epsilon", zero_terminal_snr: bool = False):
    """The sampler `tiny` ships with: DPM-Solver++ on the model's noise schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(**noise_schedule(prediction_type, zero_terminal_snr))


def text_encoder_from_clip(clip):
    """The CLIP text tower as a standalone `CLIPTextModel` (what SD pipelines call `text_encoder`)."""
    from transformers import CLIPTextModel

    text_encoder = CLIPTextModel(clip.config.text_config)
    # transformers 5 flattened CLIPTextModel: its state dict is the CLIP text tower's, unprefixed.
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder


def assemble_pipeline(tokenizer, text_encoder, vae, unet, scheduler=None):
    """A diffusers `StableDiffusionPipeline` from tiny parts (no safety checker: synthetic domain)."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler or build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_model_folder(pipeline, clip, folder: str | Path, *, half: bool = False) -> Path:
    """Save a pipeline in diffusers folder format plus the full CLIP under `clip/`.

    `StableDiffusionPipeline.from_pretrained(folder)` reads it; `CLIPModel.from_pretrained(folder/"clip")`
    reads the CLIP whose towers serve the toy metrics. Both load in float32 when no dtype is given, even
    from weights stored in fp16 (`half`); `dtype=torch.float16` loads every part in half precision.
    """
    folder = Path(folder)
    if half:
        pipeline = pipeline.to(torch.float16)
        clip = clip.to(torch.float16)
    pipeline.save_pretrained(str(folder), safe_serialization=True)
    clip.save_pretrained(str(folder / "clip"), safe_serialization=True)
    pipeline.tokenizer.save_pretrained(str(folder / "clip"))
    clip_image_processor().save_pretrained(str(folder / "clip"))
    for config in (folder / "text_encoder" / "config.json", folder / "clip" / "config.json"):
        declare_float32(config)
    return folder


def declare_float32(config_file: str | Path) -> None:
    """Make a saved transformers `config.json` name float32 (top level and sub-configs), whatever the weights.

    transformers 5 loads a model in the dtype its config names, and `save_pretrained` writes the dtype the
    model had; diffusers loads its models in float32. A text encoder saved in fp16 thus came back in fp16
    beside an fp32 UNet from `StableDiffusionPipeline.from_pretrained(folder)` with no dtype, and the first
    call failed ("mat1 and mat2 must have the same dtype"). Weights stored in fp16 are upcast on load.
    """
    path = Path(config_file)
    config = json.loads(path.read_text())
    config["dtype"] = "float32"
    for sub in config.values():
        if isinstance(sub, dict) and "dtype" in sub:
            sub["dtype"] = "float32"
    # transformers' own layout, so a re-saved config differs only where the dtype changed.
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def clip_image_processor():
    """The toy CLIP's preprocessing: 64x64 images, scaled to [-1, 1] (mean 0.5, std 0.5), no crop."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": VISION_CONFIG["image_size"]},
        do_center_crop=True,
        crop_size={"height": VISION_CONFIG["image_size"], "width": VISION_CONFIG["image_size"]},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def export_model(source: str | Path, destination: str | Path) -> Path:
    """Re-save a trained tiny model folder in fp16 (how `tiny` ships inside the package).

    The weights are stored in fp16; the configs name float32, so a load without a dtype gives a float32
    pipeline (see `declare_float32`).

    Example:
        >>> export_model("runs/tiny/unet/model", "pimg/assets/tiny")
    """
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPModel

    source = Path(source)
    # float32 whatever the source's configs say (an older export names float16 for its text encoder).
    pipeline = StableDiffusionPipeline.from_pretrained(
        str(source), dtype=torch.float32, safety_checker=None, requires_safety_checker=False
    )
    clip = CLIPModel.from_pretrained(str(source / "clip"), dtype=torch.float32)
    return save_model_folder(pipeline, clip, destination, half=True)


def build_random_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Build the untrained tiny model deterministically from config and save it to `folder`.

    Tests use it as a fast, dependency-free stand-in with the real architecture and file layout.
    """
    from pimg.toyworld.tokenizer import build_tokenizer

    folder = Path(folder)
    tokenizer = build_tokenizer(tokenizer_words(), folder / "tokenizer")
    clip = build_clip(tokenizer, seed)
    pipeline = assemble_pipeline(tokenizer, text_encoder_from_clip(clip), build_vae(seed), build_unet(seed))
    return save_model_folder(pipeline, clip, folder)
