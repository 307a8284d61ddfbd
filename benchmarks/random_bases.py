"""Random-weight pipelines in real architectures, for timings that need the real shapes, not trained weights.

Imported by the benchmark scripts beside it (`python benchmarks/<script>.py` puts this folder on the path).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Where the random SD1.5 folder is kept between runs (about 4 GB in float32); the weights are seeded,
# so every run, and every script, times the same model.
CACHE = Path(os.environ.get("PIMG_BENCH_CACHE", Path.home() / ".cache" / "pimg" / "benchmarks"))


def random_sd15_pipeline(folder: Path = CACHE) -> Path:
    """Stable Diffusion 1.5's architecture with random weights, saved as a diffusers folder (returned;
    `folder/sd15`, reused when an earlier run saved it whole).

    UNet 320-640-1280-1280 with 768-wide cross-attention (diffusers' defaults), SD's VAE and a
    12-layer 768-wide CLIP text encoder over the toy tokenizer's vocabulary.
    """
    base = folder / "sd15"
    if (base / "model_index.json").is_file():  # written last by save_pretrained
        return base
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pimg.toyworld.architecture import tokenizer_words
    from pimg.toyworld.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer(tokenizer_words(), folder / "tokenizer")
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults are SD1.5's
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=768,
            intermediate_size=3072,
            num_attention_heads=12,
            num_hidden_layers=12,
            projection_dim=768,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(base)
    return base
