"""Scenes of the toy world: what one image shows, validated against SPEC.md, and how to sample them.

A `Scene` is a background colour and one or two `ObjectSpec`s. `sample_scene` draws valid scenes at
random; the `split` argument keeps a fixed set of (shape, colour, background) compositions,
`HELD_OUT`, out of training so that compositional generalization can be measured on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pimg.errors import InputError
from pimg.toyworld.palette import COLOR_NAMES, PATTERNS, POSITIONS, SHAPES, SIZES

#: Position pairs a two-object scene may use (always with small objects).
TWO_OBJECT_LAYOUTS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))

#: Values of `sample_scene(split=...)`.
SPLITS: tuple[str, ...] = ("train", "heldout", "any")

# sample_scene redraws an object this many times before deciding the filter rejects everything.
_MAX_TRIES = 1000


def check_choice(argument: str, value, choices) -> None:
    """Raise `InputError` naming `argument` and the valid `choices` unless `value` is one of them."""
    if value not in choices:
        raise InputError(f"{argument} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_layout(sizes: list[str | None], positions: list[str | None]) -> None:
    """Raise `InputError` unless one object, or two small objects at left+right or top+bottom."""
    if len(positions) not in (1, 2):
        raise InputError(f"a toy-world image shows 1 or 2 objects; got {len(positions)}")
    if len(positions) == 1:
        return
    if any(size not in (None, "small") for size in sizes):
        raise InputError(f"both objects of a two-object scene must be small; got sizes {sizes}")
    if tuple(sorted(positions, key=str)) not in {tuple(sorted(pair)) for pair in TWO_OBJECT_LAYOUTS}:
        raise InputError(
            "two objects must sit at left + right or at top + bottom (each position given); "
            f"got positions {positions}"
        )


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a scene.

    Attributes:
        shape: one of `SHAPES`.
        c1: main colour, one of `COLOR_NAMES`.
        c2: second colour of a pattern (a `COLOR_NAMES` entry other than `c1`); None iff solid.
        pattern: one of `PATTERNS`.
        size: one of `SIZES` ("small", "large").
        position: one of `POSITIONS`.
    """

    shape: str
    c1: str
    c2: str | None
    pattern: str
    size: str
    position: str

    def __post_init__(self):
        check_choice("shape", self.shape, SHAPES)
        check_choice("c1", self.c1, COLOR_NAMES)
        check_choice("pattern", self.pattern, PATTERNS)
        check_choice("size", self.size, SIZES)
        check_choice("position", self.position, POSITIONS)
        check_colours(self.c1, self.c2, self.pattern)

    @property
    def colours(self) -> tuple[str, ...]:
        """The palette colours the object uses: (c1,) or (c1, c2)."""
        return (self.c1,) if self.c2 is None else (self.c1, self.c2)


def check_colours(c1: str, c2: str | None, pattern: str) -> None:
    """Raise `InputError` unless c2 is None exactly for "solid" and otherwise a colour other than c1."""
    if pattern == "solid":
        if c2 is not None:
            raise InputError(f"a solid object has no second colour; got c2={c2!r} (set c2=None)")
        return
    if c2 is None:
        raise InputError(f"a {pattern} object needs a second colour c2, one of {', '.join(COLOR_NAMES)}")
    check_choice("c2", c2, COLOR_NAMES)
    if c2 == c1:
        raise InputError(f"c2 must differ from c1 for a {pattern} object; both are {c1!r}")


@dataclass(frozen=True)
class Scene:
    """What one toy-world image shows: a flat background colour and 1 or 2 objects.

    Two-object scenes hold small objects at left + right or top + bottom, and no object uses the
    background colour.

    Example:
        >>> Scene("blue", (ObjectSpec("star", "red", "yellow", "striped", "large", "left"),))
    """

    background: str
    objects: tuple[ObjectSpec, ...]

    def __post_init__(self):
        check_choice("background", self.background, COLOR_NAMES)
        object.__setattr__(self, "objects", tuple(self.objects))
        if not all(isinstance(obj, ObjectSpec) for obj in self.objects):
            raise InputError("Scene.objects must hold ObjectSpec instances")
        check_layout([o.size for o in self.objects], [o.position for o in self.objects])
        for obj in self.objects:
            if self.background in obj.colours:
                raise InputError(
                    f"an object never uses the background colour; {obj.shape} with colours "
                    f"{obj.colours} is on a {self.background} background"
                )


def _held_out_rule(shape: str, c1: str, background: str) -> bool:
    # A fixed linear rule mod 8 rather than a seeded draw, so the set can never change with a NumPy
    # release. For any two fixed members of the triple, the coefficients (3, 5, 7 are units mod 8)
    # leave at most one value of the third member held out, so every (shape, c1), (shape, bg) and
    # (c1, bg) pair keeps training partners.
    index = 3 * SHAPES.index(shape) + 5 * COLOR_NAMES.index(c1) + 7 * COLOR_NAMES.index(background)
    return index % 8 == 0


#: (shape, c1, background) compositions never shown in training: 40 of the 336 valid ones (11.9%).
HELD_OUT: frozenset[tuple[str, str, str]] = frozenset(
    (shape, c1, bg)
    for shape in SHAPES
    for c1 in COLOR_NAMES
    for bg in COLOR_NAMES
    if c1 != bg and _held_out_rule(shape, c1, bg)
)


def is_held_out(obj: ObjectSpec, background: str) -> bool:
    """Whether the object's (shape, main colour) on this background is a held-out composition."""
    return (obj.shape, obj.c1, background) in HELD_OUT


def _sample_object(
    rng: np.random.Generator,
    background: str,
    size: str | None,
    position: str | None,
    reject: Callable[[ObjectSpec, str], bool],
) -> ObjectSpec:
    colours = [c for c in COLOR_NAMES if c != background]
    for _ in range(_MAX_TRIES):
        pattern = PATTERNS[rng.integers(len(PATTERNS))]
        c1 = colours[rng.integers(len(colours))]
        c2 = None
        if pattern != "solid":
            others = [c for c in colours if c != c1]
            c2 = others[rng.integers(len(others))]
        obj = ObjectSpec(
            shape=SHAPES[rng.integers(len(SHAPES))],
            c1=c1,
            c2=c2,
            pattern=pattern,
            size=size if size is not None else tuple(SIZES)[rng.integers(len(SIZES))],
            position=position if position is not None else tuple(POSITIONS)[rng.integers(len(POSITIONS))],
        )
        if not reject(obj, background):
            return obj
    raise InputError(
        f"sample_scene drew {_MAX_TRIES} objects on a {background} background and the split/exclude "
        "filter rejected all of them; the filter probably rejects every object"
    )


def sample_scene(
    rng: np.random.Generator,
    two_object_prob: float = 0.3,
    exclude: Callable[[ObjectSpec, str], bool] | None = None,
    split: str = "any",
) -> Scene:
    """Draw a random valid scene.

    The background is uniform over the palette; each object's shape, pattern, colours (never the
    background), size and position are uniform over their valid values.

    Args:
        rng: the random generator (the only source of randomness).
        two_object_prob: probability of a two-object scene (small objects, left+right or top+bottom,
            each layout and object order equally likely).
        exclude: optional `exclude(obj, background) -> bool`; True redraws that object.
        split: "train" never draws a `HELD_OUT` composition, "heldout" draws only those (every
            object of the scene), "any" has no constraint.
    Returns:
        A `Scene`.

    Example:
        >>> scene = sample_scene(np.random.default_rng(0), split="train")
    """
    check_choice("split", split, SPLITS)
    if not 0.0 <= two_object_prob <= 1.0:
        raise InputError(f"two_object_prob must be in [0, 1]; got {two_object_prob}")

    def reject(obj: ObjectSpec, background: str) -> bool:
        if split == "train" and is_held_out(obj, background):
            return True
        if split == "heldout" and not is_held_out(obj, background):
            return True
        return exclude is not None and bool(exclude(obj, background))

    background = COLOR_NAMES[rng.integers(len(COLOR_NAMES))]
    if rng.random() < two_object_prob:
        positions = TWO_OBJECT_LAYOUTS[rng.integers(len(TWO_OBJECT_LAYOUTS))]
        if rng.random() < 0.5:  # both caption orders ("left ... and ... right" and the reverse)
            positions = positions[::-1]
        objects = tuple(_sample_object(rng, background, "small", p, reject) for p in positions)
    else:
        objects = (_sample_object(rng, background, None, None, reject),)
    return Scene(background, objects)
