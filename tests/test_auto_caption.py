"""Auto-captioning with the base as a zero-shot classifier: right on toy photos, used by training."""

from __future__ import annotations

import numpy as np

from pimg.models import load_base
from pimg.photos import save_photos
from pimg.toyworld.checker import read_background
from pimg.toyworld.subjects import EVAL_SUBJECTS
from pimg.trainers.auto_caption import default_phrases, pick_phrases
from pimg.trainers.diffusion_training import TextConditioner, encode_latents, training_noise_scheduler
from pimg.trainers.personalize import load_train_config, train


def test_the_tiny_base_names_each_photos_background():
    pipe = load_base("tiny")
    phrases = default_phrases("tiny")
    conditioner = TextConditioner.from_pipeline(pipe)
    scheduler = training_noise_scheduler(pipe.scheduler.config)
    for subject in list(EVAL_SUBJECTS.values())[:2]:
        photos = subject.photos(3, seed=5)
        latents = encode_latents(pipe.vae, np.stack(photos))
        prompts = [f"a {subject.class_noun} {phrase}" for phrase in phrases]
        chosen = pick_phrases(pipe.unet, scheduler, latents, conditioner, prompts)
        assert [phrases[c] for c in chosen] == [f"on a {read_background(p)} background" for p in photos]


def test_training_captions_only_the_photos_without_a_caption(tmp_path):
    subject = EVAL_SUBJECTS["ringed_star_rgb"]
    photos = subject.photos(3, seed=0)
    folder = save_photos(tmp_path / "photos", photos)
    (folder / "photo_00.txt").write_text("a {token} {class_noun} in my own words\n")
    config = load_train_config(
        "lora",
        None,
        {
            "base": "tiny",
            "photos": str(folder),
            "class_noun": "star",
            "auto_caption": True,
            "out_dir": str(tmp_path / "out"),
            "loop.steps": 1,
            "sample_images": 0,
            "sample_prompts": [],
        },
    )
    card = (train("lora", config, progress=False) / "README.md").read_text()
    for name, photo in zip(("photo_01.png", "photo_02.png"), photos[1:], strict=True):
        assert f"- `{name}`: a {{token}} {{class_noun}} on a {read_background(photo)} background" in card
    assert "photo_00.png" not in card  # its own caption stands


def test_photos_without_captions_and_no_auto_caption_get_a_warning(tmp_path):
    import warnings

    import pytest

    folder = save_photos(tmp_path / "photos", EVAL_SUBJECTS["ringed_star_rgb"].photos(2, seed=0))
    settings = {
        "base": "tiny",
        "photos": str(folder),
        "class_noun": "star",
        "auto_caption": False,
        "loop.steps": 1,
        "sample_images": 0,
        "sample_prompts": [],
    }
    config = load_train_config("lora", None, {**settings, "out_dir": str(tmp_path / "bare")})
    with pytest.warns(UserWarning, match="2 of 2 photos have no caption.*--auto-caption"):
        train("lora", config, progress=False)
    for photo in folder.glob("*.png"):
        photo.with_suffix(".txt").write_text("a {token} {class_noun} on a red background\n")
    config = load_train_config("lora", None, {**settings, "out_dir": str(tmp_path / "captioned")})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train("lora", config, progress=False)
    assert not [w for w in caught if "no caption" in str(w.message)]
