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
