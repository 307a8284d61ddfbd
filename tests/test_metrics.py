"""Metrics: cosine math, each backbone's preprocessing, self-similarity, batching, bad input, face identity.

Backbones are randomly initialised from small configs (no download): the numbers mean nothing, but
the real loading, preprocessing and batching code runs. Real-weight figures come from the
`pimg eval` commands.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from pimg.errors import InputError, ModelLoadError
from pimg.metrics import (
    DINO_224,
    OPENAI_CLIP_224,
    TOY_CLIP_64,
    cosine_matrix,
    cosine_rows,
    list_backends,
    list_metrics,
    load_embedder,
    load_metric,
    no_face_rate,
)
from pimg.metrics.base import mean_over_references
from pimg.metrics.images import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess
from pimg.toyworld.subjects import EVAL_SUBJECTS

STAR, CIRCLE = list(EVAL_SUBJECTS.values())[:2]


def _photo(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, random_tiny_dir):
    """A small transformers CLIP at 224 px with its saved image processor and the tiny tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(random_tiny_dir / "clip")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(small, vocab_size=len(tokenizer)),
        vision_config=dict(small, image_size=224, patch_size=32),
        projection_dim=16,
    )
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------- math


def test_cosine_matrix_and_rows():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    expected = torch.tensor([[1.0, 1 / math.sqrt(2), 0.0], [0.0, 1 / math.sqrt(2), -1.0]])
    torch.testing.assert_close(cosine_matrix(a, b), expected)
    torch.testing.assert_close(cosine_rows(a, b[:2]), torch.tensor([1.0, 1 / math.sqrt(2)]))
    # Scale does not matter; a NaN row (no face) stays NaN and is left out of reference means.
    torch.testing.assert_close(cosine_matrix(5 * a, b), expected)
    sims = cosine_matrix(torch.tensor([[1.0, 0.0], [math.nan, math.nan]]), b)
    assert torch.isnan(sims[1]).all()
    means = mean_over_references(torch.tensor([[1.0, math.nan, 0.0], [math.nan] * 3]))
    assert means[0] == 0.5 and torch.isnan(means[1])
    assert no_face_rate(torch.tensor([0.3, math.nan, 0.2, math.nan])) == 0.5


# ----------------------------------------------------------------------------------- preprocessing


def test_preprocessing_constants_per_backbone():
    assert OPENAI_CLIP_224 == Preprocess(224, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")
    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert DINO_224 == Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
    assert (IMAGENET_MEAN, IMAGENET_STD) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert TOY_CLIP_64 == Preprocess(64, 64, (0.5,) * 3, (0.5,) * 3, "bicubic")
    # open_clip's own record for ViT-B-32 / openai agrees with ours.
    import open_clip

    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    assert (cfg["mean"], cfg["std"], cfg["interpolation"]) == (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")
    assert open_clip.get_model_config("ViT-B-32")["vision_cfg"]["image_size"] == 224


def test_preprocess_matches_open_clip_transform_and_shapes():
    import open_clip

    image = _photo(0, size=(300, 200))
    theirs = open_clip.image_transform(224, is_train=False, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)(image)
    torch.testing.assert_close(OPENAI_CLIP_224([image])[0], theirs)
    assert DINO_224([image]).shape == (1, 3, 224, 224)
    # Toy images pass unresized: 0 -> -1, 255 -> 1.
    toy = np.zeros((64, 64, 3), np.uint8)
    toy[:, 32:] = 255
    x = TOY_CLIP_64([Image.fromarray(toy)])
    assert x.shape == (1, 3, 64, 64) and x[0, :, :, :32].eq(-1).all() and x[0, :, :, 32:].eq(1).all()


def test_transformers_clip_reads_its_saved_processor(clip_dir):
    from transformers import CLIPImageProcessor

    embedder = load_embedder("clip-i", "transformers", str(clip_dir))
    assert embedder.preprocess == OPENAI_CLIP_224
    # Same pixels as transformers' own processor, up to one 8-bit level of rounding.
    image = _photo(3, size=(300, 200))
    theirs = CLIPImageProcessor.from_pretrained(clip_dir)(images=image, return_tensors="pt")["pixel_values"]
    assert (torch.as_tensor(theirs) - embedder.preprocess([image])).abs().max() < 1.5 / 255 / min(
        OPENAI_CLIP_STD
    )


# ------------------------------------------------------------------------------------- scoring


def test_toy_clip_image_against_itself_is_one_and_batching_does_not_matter(random_tiny_dir):
    photos = STAR.photos(n=5, seed=0)
    clip_i = load_metric("clip-i", "toy", str(random_tiny_dir), batch_size=2)
    torch.testing.assert_close(clip_i.score(photos[:1], photos[:1]), torch.ones(1))
    one = load_metric("clip-i", "toy", str(random_tiny_dir), batch_size=1).score(photos, photos[:3])
    torch.testing.assert_close(clip_i.score(photos, photos[:3]), one, atol=1e-5, rtol=0)
    # Mean over references: the score is the average of the per-reference cosines.
    per_reference = [clip_i.score(photos, [ref]) for ref in photos[:3]]
    torch.testing.assert_close(one, torch.stack(per_reference).mean(0), atol=1e-5, rtol=0)


def test_dino_image_against_itself_is_one_and_batching_does_not_matter(random_dino_dir, tmp_path):
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        _photo(i, size=(320, 256)).save(paths[-1])
    dino = load_metric("dino", model=str(random_dino_dir), batch_size=3)
    assert dino.score(paths, paths).shape == (4,)
    torch.testing.assert_close(dino.score(paths[:1], paths[:1]), torch.ones(1))
    single = load_metric("dino", model=str(random_dino_dir), batch_size=1).score(paths, paths[:2])
    torch.testing.assert_close(dino.score(paths, paths[:2]), single, atol=1e-5, rtol=0)


def test_open_clip_backend_with_random_weights_runs_both_metrics():
    embedder = load_embedder("clip-i", "open_clip", "ViT-B-32", pretrained=None, batch_size=2)
    assert embedder.preprocess == OPENAI_CLIP_224
    images = [_photo(1), _photo(2)]
    torch.testing.assert_close(
        load_metric("clip-i", embedder=embedder).score(images[:1], images[:1]), torch.ones(1)
    )
    scores = load_metric("clip-t", embedder=embedder).score(images, "a photo of a dog")
    assert scores.shape == (2,) and scores.abs().le(1).all()


def test_clip_t_one_prompt_per_image(random_tiny_dir):
    clip_t = load_metric("clip-t", "toy", str(random_tiny_dir))
    photos = STAR.photos(n=3, seed=1)
    scores = clip_t.score(photos, ["a star", "a red star on a blue background", "a sks star"])
    assert scores.shape == (3,) and scores.abs().le(1).all()
    with pytest.raises(InputError, match="one string per image; got 2 for 3"):
        clip_t.score(photos, ["a star", "a circle"])


def test_toy_fidelity_separates_subjects():
    fidelity = load_metric("toy-fidelity")
    own = fidelity.score(STAR.photos(n=3, seed=2), STAR.photos(n=3, seed=3))
    other = fidelity.score(CIRCLE.photos(n=3, seed=2), STAR.photos(n=3, seed=3))
    assert own.min() > 0.85 and other.max() < 0.5
    # A Subject stands for its canonical reference histogram.
    assert fidelity.score(STAR.photos(n=2, seed=4), [STAR]).min() > 0.85


# ----------------------------------------------------------------------------------- bad input


def test_bad_and_missing_images_are_input_errors(random_tiny_dir, tmp_path):
    clip_i = load_metric("clip-i", "toy", str(random_tiny_dir))
    good = STAR.photos(n=1, seed=0)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InputError, match="broken.png cannot be read"):
        clip_i.score([broken], good)
    with pytest.raises(InputError, match="nothing.png does not exist"):
        clip_i.score(good, [tmp_path / "nothing.png"])
    with pytest.raises(InputError, match="uint8"):
        clip_i.score([np.zeros((8, 8, 3), np.float32)], good)
    with pytest.raises(InputError, match="references is empty"):
        clip_i.score(good, [])


def test_registry_names_choices_and_reads_paths(random_tiny_dir):
    assert list_metrics() == ["dino", "clip-i", "clip-t", "face-id", "toy-fidelity"]
    assert list_backends("clip-i") == ["open_clip", "transformers", "toy"]
    with pytest.raises(InputError, match="valid metrics: dino, clip-i"):
        load_metric("fid")
    with pytest.raises(InputError, match="valid backends: open_clip, transformers, toy"):
        load_metric("clip-i", "openclip")
    # A local path picks its backend: a tiny model folder is the toy CLIP.
    assert load_embedder("clip-t", str(random_tiny_dir)).description["backend"] == "toy"


def test_missing_models_say_which_flag_and_extra(tmp_path, monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE at import: patch its constant so hub ids fail at once.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="'facebook/dino-vits16'.*--dino-model /path.*pip install"):
        load_metric("dino")
    with pytest.raises(ModelLoadError, match="no such folder.*--clip-model"):
        load_metric("clip-i", "transformers", str(tmp_path / "missing-clip"))
    with pytest.raises(ModelLoadError, match="no toy-world CLIP.*--clip-model"):
        load_metric("clip-i", "toy", str(tmp_path))
    with pytest.raises(ModelLoadError, match="ViT-B-32.*--clip-pretrained"):
        load_metric("clip-i", "open_clip", "ViT-B-32", pretrained=str(tmp_path / "missing.bin"))
    import importlib.util

    # Without dlib the error names the extra; with it, a folder lacking the .dat files names the flag.
    dlib_missing = (
        "dlib face model file .*--face-model"
        if importlib.util.find_spec("dlib")
        else (r"needs dlib.*pip install 'pimg\[face-dlib\]'")
    )
    with pytest.raises(ModelLoadError, match=dlib_missing):
        load_metric("face-id", "dlib", str(tmp_path))
    try:
        import insightface  # noqa: F401
    except ImportError:
        with pytest.raises(ModelLoadError, match=r"pip install 'pimg\[face\]'"):
            load_metric("face-id", "insightface")


# ------------------------------------------------------------------------------ face identity


@pytest.fixture(scope="module")
def dlib_backend():
    pytest.importorskip("dlib", reason="dlib is not installed: pip install 'pimg[face-dlib]'")
    pytest.importorskip("face_recognition_models", reason="pip install 'pimg[face-dlib]'")
    return load_embedder("face-id", "dlib")


@pytest.mark.shared
def test_dlib_verifies_people_on_shared_faces(shared_dir, dlib_backend):
    from pimg.metrics.real_vs_real import face_verification

    report = face_verification(shared_dir / "faces", dlib_backend)
    assert report["no_face_rate"] == 0.0
    assert report["faces_per_photo"][str(shared_dir / "faces" / "multi" / "couple.jpg")] == 2
    best = report["euclidean"]["best"]
    assert best["same_person_accuracy"] >= 0.95 and best["different_person_accuracy"] >= 0.95
    assert report["euclidean"]["same_person"]["mean"] < report["euclidean"]["different_person"]["mean"]


@pytest.mark.shared
def test_face_id_scores_nan_without_a_face(shared_dir, dlib_backend):
    face_id = load_metric("face-id", embedder=dlib_backend)
    person = sorted((shared_dir / "faces" / "person_b").glob("*.jpg"))
    scores = face_id.score([person[0], STAR.photos(n=1)[0]], person[1:])
    assert scores[0] > 0.9 and torch.isnan(scores[1])
    assert no_face_rate(scores) == 0.5
    with pytest.raises(InputError, match="no face was found in any"):
        face_id.score(person, STAR.photos(n=2))
