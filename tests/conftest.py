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
