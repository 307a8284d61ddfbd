"""Shared fixtures: a tiny model with the real architecture and file layout, built from config.

The untrained model is as fast as the shipped `tiny` and needs no download, so the core suite
exercises the real `from_pretrained` paths without depending on trained weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def random_tiny_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny SD pipeline saved in diffusers folder format."""
    from pimg.toyworld.architecture import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("random_tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the checkout; tests that read it skip where it is absent (a fresh clone)."""
    if not SHARED.is_dir():
        pytest.skip(
            f"{SHARED} is absent: these tests need the project's shared data folder beside the checkout"
        )
    return SHARED


@pytest.fixture(scope="session")
def random_dino_dir(tmp_path_factory) -> Path:
    """A randomly initialised DINO-layout ViT (224 px, patch 16, narrow) saved with `save_pretrained`."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=224,
        patch_size=16,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
    )
    folder = tmp_path_factory.mktemp("random_dino")
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def random_sdxl_dir(tmp_path_factory) -> Path:
    """A randomly initialised, very small SDXL pipeline (two text encoders, text-time conditioning)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pimg.toyworld.architecture import tokenizer_words
    from pimg.toyworld.tokenizer import build_tokenizer

    folder = tmp_path_factory.mktemp("random_sdxl") / "model"
    tokenizer = build_tokenizer(tokenizer_words(), folder / "tokenizer")
    torch.manual_seed(0)
    text = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 time ids + the pooled text projection
        cross_attention_dim=64,  # the two encoders' hidden states side by side
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text),
        text_encoder_2=CLIPTextModelWithProjection(text),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def lora_dir(random_tiny_dir, tmp_path_factory):
    """A random rank-4 LoRA (UNet + text encoder, lora_alpha != r) saved by pimg, with a kohya export."""
    from peft import LoraConfig

    from pimg.formats.lora import lora_state_dict_from_peft, save_lora
    from pimg.models import load_base

    pipe = load_base(str(random_tiny_dir))
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipe.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for name, p in module.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
    state = {
        **lora_state_dict_from_peft(pipe.unet, "unet"),
        **lora_state_dict_from_peft(pipe.text_encoder, "text_encoder"),
    }
    out = tmp_path_factory.mktemp("lora")
    base = load_base(str(random_tiny_dir))
    save_lora(out, state, kohya_components={"unet": base.unet, "text_encoder": base.text_encoder})
    return out


def random_faceid_weights(unet, seed: int = 0, lora_rank: int = 4, embed_dim: int = 512) -> dict:
    """Random weights in the exact key layout of h94's ip-adapter-faceid_sd15.bin, sized for `unet`:
    `image_proj` = MLPProjModel (proj.0 embed -> 1024, proj.2 1024 -> 4 x cross_dim, norm), and under
    `ip_adapter`, per attention processor index i, the companion LoRA (to_{q,k,v,out}_lora.{down,up})
    and for cross-attention layers to_k_ip / to_v_ip."""
    generator = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=generator) * 0.05  # noqa: E731
    cross = unet.config.cross_attention_dim
    image_proj = {
        "proj.0.weight": rand(1024, embed_dim),
        "proj.0.bias": rand(1024),
        "proj.2.weight": rand(4 * cross, 1024),
        "proj.2.bias": rand(4 * cross),
        "norm.weight": 1 + rand(cross),
        "norm.bias": rand(cross),
    }
    modules = dict(unet.named_modules())
    layers = {}
    for index, name in enumerate(unet.attn_processors):
        attention = modules[name.removesuffix(".processor")]
        hidden, context = attention.to_q.in_features, attention.to_k.in_features
        for proj, n_in, n_out in (
            ("to_q", hidden, hidden),
            ("to_k", context, hidden),
            ("to_v", context, hidden),
        ):
            layers[f"{index}.{proj}_lora.down.weight"] = rand(lora_rank, n_in)
            layers[f"{index}.{proj}_lora.up.weight"] = rand(n_out, lora_rank) * 4
        layers[f"{index}.to_out_lora.down.weight"] = rand(lora_rank, hidden)
        layers[f"{index}.to_out_lora.up.weight"] = rand(hidden, lora_rank) * 4
        if not name.endswith("attn1.processor"):
            layers[f"{index}.to_k_ip.weight"] = rand(hidden, cross) * 10
            layers[f"{index}.to_v_ip.weight"] = rand(hidden, cross) * 10
    return {"image_proj": image_proj, "ip_adapter": layers}


def random_faceid_plus_weights(unet, face_token_dim: int, seed: int = 0, embed_dim: int = 512) -> dict:
    """Random weights in the exact key layout of h94's ip-adapter-faceid-plus(v2)_sd15.bin, sized for
    `unet`: FaceID's MLP and LoRA, and `perceiver_resampler.*` over CLIP tokens of `face_token_dim`.

    Made as diffusers' own module (random), renamed by the inverse of diffusers' conversion; the
    tests check that diffusers' conversion gives the module back."""
    from diffusers.models.embeddings import IPAdapterFaceIDPlusImageProjection

    cross = unet.config.cross_attention_dim
    torch.manual_seed(seed)
    module = IPAdapterFaceIDPlusImageProjection(
        embed_dims=cross,
        output_dims=cross,
        hidden_dims=face_token_dim,
        id_embeddings_dim=embed_dim,
        heads=cross // 64,
    )
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    public = {}
    state = module.state_dict()
    for key, value in state.items():
        if key.startswith("proj.net."):  # proj.net.0.proj -> proj.0, proj.net.2 -> proj.2
            public[key.replace("proj.net.0.proj", "proj.0").replace("proj.net.2", "proj.2")] = value
        elif key.startswith("norm."):
            public[key] = value
        elif not key.startswith("layers."):
            public[f"perceiver_resampler.{key}"] = value
        else:
            _, depth, rest = key.split(".", 2)
            name = {
                "ln0.weight": "0.norm1.weight",
                "ln0.bias": "0.norm1.bias",
                "ln1.weight": "0.norm2.weight",
                "ln1.bias": "0.norm2.bias",
                "attn.to_q.weight": "0.to_q.weight",
                "attn.to_out.0.weight": "0.to_out.weight",
                "ff.0.weight": "1.0.weight",
                "ff.0.bias": "1.0.bias",
                "ff.1.net.0.proj.weight": "1.1.weight",
                "ff.1.net.2.weight": "1.3.weight",
            }.get(rest)
            if rest == "attn.to_k.weight":
                name, value = "0.to_kv.weight", torch.cat([value, state[f"layers.{depth}.attn.to_v.weight"]])
            if name is not None:
                public[f"perceiver_resampler.layers.{depth}.{name}"] = value
    weights = random_faceid_weights(unet, seed=seed)
    return {"image_proj": public, "ip_adapter": weights["ip_adapter"], "module": module}


@pytest.fixture(scope="session")
def faceid_file(random_tiny_dir, tmp_path_factory) -> Path:
    """A random IP-Adapter-FaceID checkpoint (.bin, the public key layout, with its LoRA) for the random tiny."""
    from pimg.models import load_base

    path = tmp_path_factory.mktemp("faceid") / "ip-adapter-faceid_sd15.bin"
    torch.save(random_faceid_weights(load_base(str(random_tiny_dir)).unet), path)
    return path
