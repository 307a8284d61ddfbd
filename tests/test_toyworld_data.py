"""The toy world's data side: scenes, rendering, captions, the pixel checker and subjects."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from pimg.errors import InputError
from pimg.toyworld.captions import VOCABULARY, PromptSpec, SceneStream, caption, parse_caption
from pimg.toyworld.checker import (
    check_prompt,
    colour_histogram,
    object_mask,
    read_background,
    read_object,
    subject_fidelity,
)
from pimg.toyworld.palette import COLOR_NAMES, PALETTE, PALETTE_ARRAY, SHAPES, SIZES, nearest_palette_index
from pimg.toyworld.render import render_scene, shape_mask
from pimg.toyworld.scene import HELD_OUT, ObjectSpec, Scene, is_held_out, sample_scene
from pimg.toyworld.subjects import (
    EMBLEMS,
    EVAL_SUBJECTS,
    SCHEMES,
    Subject,
    held_out_stream,
    random_subject,
    reference_histogram,
    render_subject,
    subject_stream,
)


def _scenes(n: int, seed: int, two_object_prob: float = 0.3, split: str = "any") -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, two_object_prob, split=split) for _ in range(n)]


def test_nearest_palette_index_maps_palette_to_itself():
    assert nearest_palette_index(PALETTE_ARRAY).tolist() == list(range(len(PALETTE)))
    assert nearest_palette_index(np.array([250, 250, 250])) == COLOR_NAMES.index("white")


def test_render_shape_size_and_noise():
    scene = Scene("blue", (ObjectSpec("square", "red", None, "solid", "large", "left"),))
    clean = render_scene(scene, noise=0)
    assert clean.shape == (64, 64, 3) and clean.dtype == np.uint8
    assert (clean[0, 0] == PALETTE["blue"]).all()
    # A square fills its 34 px box centred at (18, 32): columns 1..34, rows 15..48.
    red = (clean == PALETTE["red"]).all(axis=-1)
    rows, cols = np.nonzero(red)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (15, 48, 1, 34)
    noisy = render_scene(scene, np.random.default_rng(0), noise=6)
    difference = noisy.astype(int) - clean.astype(int)
    assert np.abs(difference).max() == 6 and difference.std() > 2
    with pytest.raises(InputError):
        render_scene(scene, noise=7)


def test_edges_are_the_only_mixed_pixels():
    scene = Scene("white", (ObjectSpec("star", "red", "blue", "checkered", "large", "center"),))
    img = render_scene(scene, noise=0)
    exact = (img[..., None, :] == PALETTE_ARRAY.astype(np.uint8)).all(axis=-1).any(axis=-1)
    coverage = np.zeros((64, 64))
    coverage[15:49, 15:49] = shape_mask("star", SIZES["large"])
    partial = (coverage > 0) & (coverage < 1)
    assert (~exact <= partial).all()


@pytest.mark.parametrize("noise", [0, 6])
def test_checker_reads_renders_right(noise):
    rng = np.random.default_rng(noise)
    seen = set()
    for scene in _scenes(500, seed=1):
        result = check_prompt(render_scene(scene, rng, noise), scene)
        seen |= set(result)
        assert all(result.values()), (scene, result)
    assert seen == {"background", "colour", "position", "size", "shape", "two_object"}


def test_checker_reads_each_field_of_one_object():
    obj = ObjectSpec("heart", "yellow", "purple", "dotted", "small", "top")
    img = render_scene(Scene("green", (obj,)), np.random.default_rng(0))
    assert read_background(img) == "green"
    reading = read_object(img)
    assert reading.colours[:2] == ("yellow", "purple")
    assert (reading.shape, reading.size, reading.position) == ("heart", "small", "top")
    assert reading.bbox[2:] == (18, 18)


def test_checker_flags_wrong_images():
    spec = parse_caption("a large red star at the left on a blue background")
    wrong = Scene("white", (ObjectSpec("circle", "green", None, "solid", "small", "right"),))
    result = check_prompt(render_scene(wrong, noise=0), spec)
    assert result == dict.fromkeys(["background", "colour", "shape", "size", "position"], False)
    # No object at all: object keys are False, not an exception.
    empty = np.full((64, 64, 3), PALETTE["blue"], dtype=np.uint8)
    result = check_prompt(empty, spec)
    assert result.pop("background") and not any(result.values())
    assert read_object(empty) is None
    assert colour_histogram(empty, object_mask(empty, "blue")).sum() == 0


def test_two_object_check_needs_each_object_in_its_half():
    left = ObjectSpec("circle", "red", None, "solid", "small", "left")
    right = ObjectSpec("square", "yellow", None, "solid", "small", "right")
    img = render_scene(Scene("blue", (left, right)), noise=0)
    assert check_prompt(
        img, parse_caption("a red circle at the left and a yellow square at the right on a blue background")
    )["two_object"]
    swapped = parse_caption("a red circle at the right and a yellow square at the left on a blue background")
    assert not check_prompt(img, swapped)["two_object"]


def test_captions_round_trip():
    rng = np.random.default_rng(2)
    for scene in _scenes(300, seed=3):
        text = caption(scene)
        assert parse_caption(text) == PromptSpec.from_scene(scene)
        assert set(text.split()) <= set(VOCABULARY)
        dropped = parse_caption(caption(scene, rng, drop_prob=0.5))
        for stated, full in zip(dropped.objects, scene.objects, strict=True):
            assert stated.size in (None, full.size) and stated.position in (None, full.position)
            assert (stated.shape, stated.c1, stated.c2, stated.pattern) == (
                full.shape,
                full.c1,
                full.c2,
                full.pattern,
            )
            if len(scene.objects) == 2:
                assert stated.position == full.position
        filled = dropped.to_scene(rng)
        assert [o.shape for o in filled.objects] == [o.shape for o in scene.objects]
        assert parse_caption(caption(dropped)) == dropped


def test_caption_example_from_spec():
    text = "a large red and yellow striped star at the left on a blue background"
    spec = parse_caption(text)
    obj = spec.objects[0]
    assert (obj.shape, obj.c1, obj.c2, obj.pattern, obj.size, obj.position) == (
        "star", "red", "yellow", "striped", "large", "left",
    )  # fmt: skip
    assert caption(spec) == text
    assert "solid" not in VOCABULARY and len(VOCABULARY) == len(set(VOCABULARY))


@pytest.mark.parametrize(
    "text",
    [
        "a red star",  # no background
        "a red star on a red background",  # object in the background colour
        "a red and red striped star on a blue background",  # c2 == c1
        "a red and green star on a blue background",  # no pattern
        "a red star at the left and a blue circle on a white background",  # second position missing
        "a red star at the left and a blue circle at the top on a white background",  # bad layout
        "a large red star at the left and a blue circle at the right on a white background",
        "a red star on a blue background please",
        "A red star on a blue background",
        "a red hexagon on a blue background",
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(InputError):
        parse_caption(text)


def test_scene_validation():
    with pytest.raises(InputError, match="circle"):
        ObjectSpec("hexagon", "red", None, "solid", "small", "left")
    with pytest.raises(InputError):
        ObjectSpec("star", "red", "blue", "solid", "small", "left")
    with pytest.raises(InputError):
        ObjectSpec("star", "red", None, "striped", "small", "left")
    star = ObjectSpec("star", "red", None, "solid", "small", "left")
    with pytest.raises(InputError):
        Scene("red", (star,))
    with pytest.raises(InputError):
        Scene("blue", (star, star))
    with pytest.raises(InputError):
        sample_scene(np.random.default_rng(0), exclude=lambda obj, bg: True)


def test_held_out_compositions():
    valid = [(s, c, b) for s in SHAPES for c in COLOR_NAMES for b in COLOR_NAMES if c != b]
    assert HELD_OUT <= set(valid)
    assert 0.10 <= len(HELD_OUT) / len(valid) <= 0.15
    train = set(valid) - HELD_OUT
    # Every shape, colour and background, and every pair of them, still has training partners.
    for i, j in itertools.combinations(range(3), 2):
        pairs = {(t[i], t[j]) for t in valid}
        assert pairs == {(t[i], t[j]) for t in train}
    for scene in _scenes(200, seed=4, split="heldout"):
        assert all(is_held_out(obj, scene.background) for obj in scene.objects)


def test_train_stream_never_emits_held_out():
    images, captions, scenes = SceneStream(seed=5, split="train", two_object_prob=0.5).batch(400)
    assert images.shape == (400, 64, 64, 3) and images.dtype == np.uint8 and len(captions) == 400
    assert not any(is_held_out(obj, s.background) for s in scenes for obj in s.objects)
    two = [s for s in scenes if len(s.objects) == 2]
    assert 150 < len(two) < 250


def test_streams_are_reproducible():
    a_images, a_captions, a_scenes = SceneStream(seed=7).batch(20)
    stream = SceneStream(seed=7)
    items = [next(stream) for _ in range(20)]
    assert np.array_equal(a_images, np.stack([item[0] for item in items]))
    assert a_captions == [item[1] for item in items] and a_scenes == [item[2] for item in items]
    assert SceneStream(seed=8).batch(20)[1] != a_captions


def test_subject_photos_match_their_reference():
    subjects = list(EVAL_SUBJECTS.values())
    for index, subject in enumerate(subjects):
        other = subjects[(index + 1) % len(subjects)]
        photos = subject.photos(n=6, seed=index)
        for photo in photos:
            assert read_background(photo) not in subject.colours + EMBLEMS[subject.emblem]
            assert subject_fidelity(photo, subject) >= 0.9
            assert subject_fidelity(photo, other) < 0.8
        # A plain one-colour object of the subject's shape and main colour is a poor imitation.
        hist = reference_histogram(subject)
        dominant = COLOR_NAMES[int(hist.argmax())]
        plain = Scene(
            subject.backgrounds[0], (ObjectSpec(subject.shape, dominant, None, "solid", "large", "center"),)
        )
        assert subject_fidelity(render_scene(plain, noise=0), hist) < 0.5


def test_subject_sets():
    subjects = list(EVAL_SUBJECTS.values())
    assert len(subjects) == 8 and all(name == s.name for name, s in EVAL_SUBJECTS.items())
    assert {s.shape for s in subjects} == set(SHAPES) and {s.scheme for s in subjects} == set(SCHEMES)
    assert all(s.class_noun == s.shape for s in subjects)
    eval_keys = {(s.shape, frozenset(s.colours)) for s in subjects}
    stream = list(itertools.islice(subject_stream(seed=0), 3000))
    assert len(set(stream)) == 3000
    assert stream[:50] == list(itertools.islice(subject_stream(seed=0), 50))
    rng = np.random.default_rng(0)
    for subject in stream + [random_subject(rng) for _ in range(200)]:
        assert (subject.shape, frozenset(subject.colours)) not in eval_keys
    assert abs(reference_histogram(subjects[0]).sum() - 1) < 1e-9
    # the held-out side: evaluation-like (never in training), not the fixed eight, every one once
    held_out = list(held_out_stream(seed=0))
    assert len(held_out) == len(set(held_out)) > 300
    first_20 = lambda seed: list(itertools.islice(held_out_stream(seed=seed), 20))  # noqa: E731
    assert held_out[:20] == first_20(0) != first_20(1)
    fixed = {(s.shape, s.colours, s.scheme, s.emblem) for s in subjects}
    for subject in held_out:
        assert (subject.shape, frozenset(subject.colours)) in eval_keys
        assert (subject.shape, subject.colours, subject.scheme, subject.emblem) not in fixed
    assert not set(held_out) & set(stream)


def test_subject_validation():
    with pytest.raises(InputError):
        Subject("x", "star", ("red", "red", "blue"), "rings", "dot")
    with pytest.raises(InputError, match="emblem"):
        Subject("x", "star", ("red", "white", "blue"), "rings", "eye")
    subject = EVAL_SUBJECTS["ringed_star_rgb"]
    with pytest.raises(InputError):
        render_subject(subject, 30, (32, 32), "red", None)
    with pytest.raises(InputError):
        render_subject(subject, 34, (5, 32), "yellow", None)
