"""Captions of the toy world: writing them, parsing them back, and streaming captioned images.

The grammar (SPEC.md), all lower case:

    appearance := {c1} | {c1} and {c2} {pattern}
    object     := a [{size} ]{appearance} {shape}[ at the {position}]
    caption    := {object} on a {bg} background | {object} and {object} on a {bg} background

What a caption leaves out (size, position) is drawn at random, so `parse_caption` returns a
`PromptSpec` whose objects may have no size or position; `PromptSpec.to_scene` fills them in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pimg.errors import InputError
from pimg.toyworld.palette import COLOR_NAMES, PATTERNS, POSITIONS, SHAPES, SIZES
from pimg.toyworld.render import render_scene
from pimg.toyworld.scene import (
    SPLITS,
    ObjectSpec,
    Scene,
    check_choice,
    check_colours,
    check_layout,
    sample_scene,
)

#: Every word a caption can contain ("solid" never appears: a solid object is just "{c1}").
VOCABULARY: tuple[str, ...] = (
    ("a", "and", "at", "the", "on", "background")
    + tuple(SIZES)
    + COLOR_NAMES
    + tuple(p for p in PATTERNS if p != "solid")
    + SHAPES
    + tuple(POSITIONS)
)


@dataclass(frozen=True)
class PromptObject:
    """An object as a caption states it: like `ObjectSpec`, but size and position may be left out."""

    shape: str
    c1: str
    c2: str | None
    pattern: str
    size: str | None = None
    position: str | None = None

    def __post_init__(self):
        check_choice("shape", self.shape, SHAPES)
        check_choice("c1", self.c1, COLOR_NAMES)
        check_choice("pattern", self.pattern, PATTERNS)
        check_choice("size", self.size, (*SIZES, None))
        check_choice("position", self.position, (*POSITIONS, None))
        check_colours(self.c1, self.c2, self.pattern)

    @property
    def colours(self) -> tuple[str, ...]:
        """The palette colours the object uses: (c1,) or (c1, c2)."""
        return (self.c1,) if self.c2 is None else (self.c1, self.c2)


@dataclass(frozen=True)
class PromptSpec:
    """What a caption asks for: a background and 1 or 2 `PromptObject`s (validated like `Scene`)."""

    background: str
    objects: tuple[PromptObject, ...]

    def __post_init__(self):
        check_choice("background", self.background, COLOR_NAMES)
        object.__setattr__(self, "objects", tuple(self.objects))
        check_layout([o.size for o in self.objects], [o.position for o in self.objects])
        for obj in self.objects:
            if self.background in obj.colours:
                raise InputError(
                    f"an object never uses the background colour; the {obj.shape} with colours "
                    f"{obj.colours} is on a {self.background} background"
                )

    @classmethod
    def from_scene(cls, scene: Scene) -> PromptSpec:
        """The spec stating everything about `scene`."""
        objects = tuple(
            PromptObject(o.shape, o.c1, o.c2, o.pattern, o.size, o.position) for o in scene.objects
        )
        return cls(scene.background, objects)

    def to_scene(self, rng: np.random.Generator) -> Scene:
        """A `Scene` with every left-out size and position drawn uniformly at random."""
        objects = []
        for obj in self.objects:
            size = obj.size
            if size is None:  # two-object scenes only allow small objects
                size = "small" if len(self.objects) == 2 else tuple(SIZES)[rng.integers(len(SIZES))]
            position = obj.position
            if position is None:
                position = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
            objects.append(ObjectSpec(obj.shape, obj.c1, obj.c2, obj.pattern, size, position))
        return Scene(self.background, tuple(objects))


def _describe(obj: ObjectSpec | PromptObject, keep_size: bool, keep_position: bool) -> str:
    words = ["a"]
    if keep_size and obj.size is not None:
        words.append(obj.size)
    words.append(obj.c1 if obj.c2 is None else f"{obj.c1} and {obj.c2} {obj.pattern}")
    words.append(obj.shape)
    if keep_position and obj.position is not None:
        words.append(f"at the {obj.position}")
    return " ".join(words)


def caption(scene: Scene | PromptSpec, rng: np.random.Generator | None = None, drop_prob: float = 0.0) -> str:
    """The caption of a scene (or prompt spec), in the SPEC.md grammar.

    Args:
        scene: what to describe; a `PromptSpec`'s left-out fields stay left out.
        rng: needed when drop_prob > 0.
        drop_prob: probability of leaving out each object's size, and (one-object scenes only; a
            two-object caption always names both positions) its position, independently.
    Returns:
        The caption.

    Example:
        >>> caption(scene)
        'a large red and yellow striped star at the left on a blue background'
    """
    if not 0.0 <= drop_prob <= 1.0:
        raise InputError(f"drop_prob must be in [0, 1]; got {drop_prob}")
    if drop_prob > 0 and rng is None:
        raise InputError("caption needs an rng when drop_prob > 0 (it draws which words to leave out)")
    parts = []
    for obj in scene.objects:
        keep_size = keep_position = True
        if drop_prob > 0:
            # Always draw both numbers, so the rng advances the same way whatever is kept.
            keep_size, keep_position = rng.random(2) >= drop_prob
            keep_position = keep_position or len(scene.objects) == 2
        parts.append(_describe(obj, bool(keep_size), bool(keep_position)))
    return f"{' and '.join(parts)} on a {scene.background} background"


class _Words:
    """A cursor over a caption's words that raises `InputError` saying what it expected where."""

    def __init__(self, text: str):
        self.text, self.words, self.at = text, text.split(), 0

    def peek(self, ahead: int = 0) -> str | None:
        index = self.at + ahead
        return self.words[index] if index < len(self.words) else None

    def take(self, expected, what: str) -> str:
        word = self.peek()
        if word not in expected:
            found = "the end of the caption" if word is None else f"{word!r} (word {self.at + 1})"
            raise InputError(
                f"caption {self.text!r} is outside the toy-world grammar: expected {what}, found {found}. "
                "Captions read like 'a large red and yellow striped star at the left on a blue "
                "background' (lower case; size and position optional)"
            )
        self.at += 1
        return word


def _parse_object(words: _Words) -> PromptObject:
    words.take(("a",), "'a'")
    size = words.take(SIZES, "a size") if words.peek() in SIZES else None
    c1 = words.take(COLOR_NAMES, f"a colour ({', '.join(COLOR_NAMES)})")
    c2, pattern = None, "solid"
    # "and" followed by a colour continues the appearance; followed by "a" it starts a second object.
    if words.peek() == "and" and words.peek(1) in COLOR_NAMES:
        words.take(("and",), "'and'")
        c2 = words.take(COLOR_NAMES, "a second colour")
        patterns = tuple(p for p in PATTERNS if p != "solid")
        pattern = words.take(patterns, f"a pattern ({', '.join(patterns)})")
    shape = words.take(SHAPES, f"a shape ({', '.join(SHAPES)})")
    position = None
    if words.peek() == "at":
        words.take(("at",), "'at'")
        words.take(("the",), "'the'")
        position = words.take(POSITIONS, f"a position ({', '.join(POSITIONS)})")
    return PromptObject(shape, c1, c2, pattern, size, position)


def parse_caption(text: str) -> PromptSpec:
    """Read a caption back into what it states.

    Args:
        text: a caption in the SPEC.md grammar (words separated by whitespace, lower case).
    Returns:
        A `PromptSpec`; sizes and positions the caption leaves out are None.
    Raises:
        InputError: the text is outside the grammar, or states an impossible scene (an object in
            the background colour, two objects not at left + right / top + bottom, ...).

    Example:
        >>> parse_caption("a red star on a blue background").objects[0].shape
        'star'
    """
    if not isinstance(text, str):
        raise InputError(f"parse_caption needs a str; got {type(text).__name__}")
    words = _Words(text)
    objects = [_parse_object(words)]
    if words.peek() == "and":
        words.take(("and",), "'and'")
        objects.append(_parse_object(words))
    words.take(("on",), "'on', 'at the' or 'and'")
    words.take(("a",), "'a'")
    background = words.take(COLOR_NAMES, "a background colour")
    words.take(("background",), "'background'")
    if words.peek() is not None:
        words.take((), "the end of the caption")
    return PromptSpec(background, tuple(objects))


class SceneStream:
    """An endless, seeded stream of `(image, caption, scene)` for training and evaluation.

    The same seed and arguments give the same sequence. One generator drives scene sampling,
    caption word dropping and pixel noise; to shard across data-loader workers, give each worker
    its own seed.

    Args:
        seed: stream seed.
        split: "train" (no `HELD_OUT` composition), "heldout" (only those) or "any".
        two_object_prob: share of two-object scenes.
        drop_prob: probability of leaving size / position out of a caption (see `caption`).
        noise: pixel noise amplitude, 0 to 6.

    Example:
        >>> images, captions, scenes = SceneStream(seed=0).batch(32)
    """

    def __init__(
        self,
        seed: int,
        split: str = "train",
        two_object_prob: float = 0.3,
        drop_prob: float = 0.3,
        noise: int = 6,
    ):
        check_choice("split", split, SPLITS)
        if not 0.0 <= two_object_prob <= 1.0:
            raise InputError(f"two_object_prob must be in [0, 1]; got {two_object_prob}")
        if not 0.0 <= drop_prob <= 1.0:
            raise InputError(f"drop_prob must be in [0, 1]; got {drop_prob}")
        if not 0 <= noise <= 6:
            raise InputError(f"noise must be an integer from 0 to 6; got {noise}")
        self.seed, self.split = seed, split
        self.two_object_prob, self.drop_prob, self.noise = two_object_prob, drop_prob, noise
        self._rng = np.random.default_rng(seed)

    def __iter__(self) -> SceneStream:
        return self

    def __next__(self) -> tuple[np.ndarray, str, Scene]:
        scene = sample_scene(self._rng, self.two_object_prob, split=self.split)
        text = caption(scene, self._rng, self.drop_prob)
        return render_scene(scene, self._rng, self.noise), text, scene

    def batch(self, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
        """The next n items as (uint8 array (n, 64, 64, 3), captions, scenes)."""
        if n < 1:
            raise InputError(f"batch size n must be at least 1; got {n}")
        items = [next(self) for _ in range(n)]
        return np.stack([item[0] for item in items]), [item[1] for item in items], [item[2] for item in items]
