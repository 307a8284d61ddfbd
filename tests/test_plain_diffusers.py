"""Every model folder pimg writes loads in plain diffusers the way users load it: with no dtype argument.

transformers 5 loads a model in the dtype its config names, diffusers loads its models in float32. A
folder whose text encoder config names float16 therefore loads as an fp16 text encoder beside an fp32
UNet, and the first call fails ("mat1 and mat2 must have the same dtype"). Covered here: the shipped
`tiny`, the `pimg toyworld train-base` layout (`save_model_folder`), `pimg toyworld export` and a
DreamBooth result, also as saved on CUDA with mixed precision (frozen parts in half precision).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pimg.formats.safetensors_io import read_safetensors
from pimg.models import BUILTIN_MODELS
from pimg.photos import save_photos

TINY = BUILTIN_MODELS["tiny"].folder
PARTS = ("text_encoder", "unet", "vae")


def plain_load(folder: Path, **kwargs):
    """`StableDiffusionPipeline.from_pretrained(folder)` as a user writes it (plus the quiet bar)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(folder), **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_generates(pipe, dtype: torch.dtype = torch.float32) -> None:
    assert {name: getattr(pipe, name).dtype for name in PARTS} == dict.fromkeys(PARTS, dtype)
    image = pipe(
        "a red star on a blue background",
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def stored_dtypes(folder: Path) -> set[torch.dtype]:
    return {t.dtype for f in folder.rglob("*.safetensors") for t in read_safetensors(f).values()}


def test_shipped_tiny_loads_in_float32_without_dtype():
    from transformers import CLIPModel

    assert_generates(plain_load(TINY))
    assert CLIPModel.from_pretrained(str(TINY / "clip")).dtype == torch.float32
    assert stored_dtypes(TINY) == {torch.float16}  # the package still ships half-size weights


def test_shipped_tiny_loads_in_half_precision_when_asked():
    assert_generates(plain_load(TINY, dtype=torch.float16), torch.float16)


def test_model_folder_with_half_parts_loads_in_float32(random_tiny_dir, tmp_path):
    """`pimg toyworld train-base` saves through `save_model_folder`; parts read from an fp16 folder
    (e.g. `unet_init`'s CLIP) must not make its configs name float16."""
    from transformers import CLIPModel

    from pimg.toyworld.architecture import save_model_folder

    pipe = plain_load(random_tiny_dir)
    pipe.text_encoder.half()
    clip = CLIPModel.from_pretrained(str(random_tiny_dir / "clip"), dtype=torch.float16)
    folder = save_model_folder(pipe, clip, tmp_path / "model")

    assert_generates(plain_load(folder))
    assert CLIPModel.from_pretrained(str(folder / "clip")).dtype == torch.float32


def test_export_stores_fp16_and_loads_in_float32(random_tiny_dir, tmp_path):
    from transformers import CLIPModel

    from pimg.toyworld.architecture import export_model

    # A source as the old shipped `tiny` was: fp16 weights whose text encoder config names float16.
    source = tmp_path / "source"
    shutil.copytree(TINY, source)
    config_file = source / "text_encoder" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "dtype": "float16"}))

    for src in (random_tiny_dir, source):
        folder = export_model(src, tmp_path / f"export_{src.name}")
        assert stored_dtypes(folder) == {torch.float16}
        assert_generates(plain_load(folder))
        assert CLIPModel.from_pretrained(str(folder / "clip")).dtype == torch.float32


@pytest.fixture(scope="module")
def dreambooth_config(random_tiny_dir, tmp_path_factory):
    from pimg.toyworld.subjects import EVAL_SUBJECTS
    from pimg.trainers.personalize import load_train_config

    photos = tmp_path_factory.mktemp("photos")
    save_photos(photos, EVAL_SUBJECTS["ringed_star_rgb"].photos(2, seed=0))
    values = {
        "base": str(random_tiny_dir),
        "photos": str(photos),
        "class_noun": "star",
        "out_dir": str(tmp_path_factory.mktemp("dreambooth")),
        "prior_preservation": False,  # class images are not what this file is about
        "loop.steps": 2,
        "sample_images": 0,
        "num_inference_steps": 2,
    }
    return load_train_config("dreambooth", None, values)


def test_dreambooth_result_loads_in_float32_without_dtype(dreambooth_config):
    from pimg.trainers.personalize import train

    out = train("dreambooth", dreambooth_config, progress=False)
    assert_generates(plain_load(out))


def test_dreambooth_saved_with_half_frozen_parts_loads_in_float32(dreambooth_config, tmp_path):
    """On CUDA with mixed precision, `finish_setup` leaves the frozen text encoder and VAE in half
    precision; the saved folder must still load as one float32 pipeline."""
    from pimg.trainers.dreambooth import DreamBoothMethod

    method = DreamBoothMethod(dreambooth_config)
    method.pipe.text_encoder.half()
    method.pipe.vae.half()
    method.save(tmp_path)

    assert_generates(plain_load(tmp_path))
    assert method.pipe.text_encoder.dtype == method.pipe.vae.dtype == torch.float16  # training state kept
