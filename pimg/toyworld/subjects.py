"""Subjects: the objects users personalize, whose look the caption grammar cannot express (SPEC.md).

A `Subject` is a shape painted with a three-colour scheme and a small emblem at its centre. Its
"photos" show it at random size, position and background, and the checker scores how faithfully a
generated object reproduces it with `subject_fidelity` against `reference_histogram`.

`EVAL_SUBJECTS` is the fixed evaluation set; `random_subject` and `subject_stream` (training data for
methods that learn across subjects, such as hypernetworks) never produce a subject with the shape
and colour set of an evaluation subject. `held_out_stream` gives the other subjects of that held-out
space (other colour orders, schemes and emblems): many fresh evaluation subjects that no
cross-subject training has seen.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache, lru_cache

import numpy as np

from pimg.errors import InputError
from pimg.toyworld.checker import colour_histogram, object_mask
from pimg.toyworld.palette import COLOR_NAMES, IMAGE_SIZE, PALETTE_ARRAY, SHAPES
from pimg.toyworld.render import (
    blank_canvas,
    colour_layer,
    finish,
    inside_shape,
    paste,
    pixel_centres,
    shape_mask,
)
from pimg.toyworld.scene import check_choice

#: Colour schemes: concentric rings of the shape, three vertical bands, three diagonal bands.
SCHEMES: tuple[str, ...] = ("rings", "bands", "diagonal")

#: Emblem name -> the colours it is drawn in (first = outer part). A subject's own three colours
#: never include its emblem's colours, so the emblem always shows.
EMBLEMS: dict[str, tuple[str, ...]] = {
    "eye": ("white", "black"),  # a white dot with a black pupil
    "bar": ("black",),  # a short horizontal bar
    "cross": ("white",),  # a plus sign
    "dot": ("black",),  # a plain dot
}

#: Size range (bounding-box side, px) of a subject in its photos; the canonical rendering uses 34.
PHOTO_SIZES = (22, 34)
CANONICAL_SIZE = 34

# Rings are the shape and two copies scaled about the box centre; scales sqrt(2/3) and sqrt(1/3)
# give the three rings equal areas. Bands and diagonal bands are likewise cut at equal-area lines.
# Equal shares keep every colour near a third, so a one-colour imitation scores far below a
# faithful render.
_RING_SCALES = (np.sqrt(2 / 3), np.sqrt(1 / 3))

# Grid on which band cut lines are found, independent of the size a subject is drawn at.
_CUT_GRID = 256

_SCHEME_WORDS = {"rings": "ringed", "bands": "banded", "diagonal": "diagonal"}
_INITIALS = {"red": "r", "green": "g", "blue": "b", "yellow": "y", "purple": "p", "orange": "o"}
_INITIALS |= {"white": "w", "black": "k"}


@dataclass(frozen=True)
class Subject:
    """A personalization subject.

    Attributes:
        name: identifier, e.g. "ringed_star_rgb".
        shape: one of `SHAPES` (also its class noun).
        colours: three distinct palette colours, outer-to-inner for "rings", left-to-right for
            "bands", top-left-to-bottom-right for "diagonal".
        scheme: one of `SCHEMES`.
        emblem: one of `EMBLEMS`; its colours may not be among `colours`.

    Example:
        >>> photos = EVAL_SUBJECTS["ringed_star_rgb"].photos(n=4, seed=0)
    """

    name: str
    shape: str
    colours: tuple[str, str, str]
    scheme: str
    emblem: str

    def __post_init__(self):
        check_choice("shape", self.shape, SHAPES)
        check_choice("scheme", self.scheme, SCHEMES)
        check_choice("emblem", self.emblem, EMBLEMS)
        object.__setattr__(self, "colours", tuple(self.colours))
        for colour in self.colours:
            check_choice("subject colour", colour, COLOR_NAMES)
        if len(self.colours) != 3 or len(set(self.colours)) != 3:
            raise InputError(f"a subject has three distinct colours; got {self.colours}")
        clash = set(self.colours) & set(EMBLEMS[self.emblem])
        if clash:
            raise InputError(
                f"subject {self.name!r}: its {self.emblem} emblem is drawn in {EMBLEMS[self.emblem]}, "
                f"so its colours may not include {sorted(clash)}; pick other colours or another emblem"
            )

    @property
    def class_noun(self) -> str:
        """The word for what the subject is: its shape."""
        return self.shape

    @property
    def backgrounds(self) -> tuple[str, ...]:
        """Palette colours it may be photographed on: none of its own or its emblem's colours."""
        used = set(self.colours) | set(EMBLEMS[self.emblem])
        return tuple(c for c in COLOR_NAMES if c not in used)

    def photos(self, n: int = 4, seed: int = 0, noise: int = 6) -> list[np.ndarray]:
        """n seeded photos at random size (22-34 px box), position (inside the frame) and background.

        Returns:
            A list of n uint8 images (64, 64, 3).
        """
        if n < 1:
            raise InputError(f"photos needs n >= 1; got {n}")
        rng = np.random.default_rng(seed)
        images = []
        for _ in range(n):
            size = int(rng.integers(PHOTO_SIZES[0], PHOTO_SIZES[1] + 1))
            # Keep a 1-px margin so the border the checker reads stays mostly background.
            top, left = rng.integers(1, IMAGE_SIZE - size, size=2)
            center = (int(left) + size // 2, int(top) + size // 2)
            background = self.backgrounds[rng.integers(len(self.backgrounds))]
            images.append(render_subject(self, size, center, background, rng, noise))
        return images


def _band_coordinate(scheme: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Bands run across x; diagonal bands across x + y (top-left to bottom-right).
    return x if scheme == "bands" else x + y


@cache
def _band_cuts(shape: str, scheme: str) -> np.ndarray:
    # The two values of the band coordinate that split the shape's area into equal thirds.
    x, y = pixel_centres(_CUT_GRID, _CUT_GRID)
    inside = inside_shape(shape, x, y)
    return np.quantile(_band_coordinate(scheme, x, y)[inside], [1 / 3, 2 / 3])


def _scheme_index(subject: Subject, size_px: int) -> np.ndarray:
    # Which of the three colours each pixel takes, read at pixel centres so regions never mix.
    x, y = pixel_centres(size_px, size_px)
    if subject.scheme == "rings":
        index = np.zeros((size_px, size_px), dtype=np.int64)
        for ring, scale in enumerate(_RING_SCALES, start=1):
            inner = inside_shape(subject.shape, (x - 0.5) / scale + 0.5, (y - 0.5) / scale + 0.5)
            index[inner] = ring
        return index
    cuts = _band_cuts(subject.shape, subject.scheme)
    return np.searchsorted(cuts, _band_coordinate(subject.scheme, x, y))


def _emblem_index(emblem: str, size_px: int) -> np.ndarray:
    # -1 = no emblem, otherwise the index into EMBLEMS[emblem]; sizes scale with the box.
    x, y = pixel_centres(size_px, size_px)
    dx, dy = np.abs(x - 0.5), np.abs(y - 0.5)
    radius = np.hypot(dx, dy)
    index = np.full((size_px, size_px), -1, dtype=np.int64)
    if emblem == "eye":
        index[radius <= 0.15] = 0
        index[radius <= 0.07] = 1
    elif emblem == "bar":
        index[(dx <= 0.25) & (dy <= 0.06)] = 0
    elif emblem == "cross":
        index[((dx <= 0.05) & (dy <= 0.2)) | ((dy <= 0.05) & (dx <= 0.2))] = 0
    else:  # dot
        index[radius <= 0.11] = 0
    return index


@lru_cache(maxsize=2048)
def subject_layer(subject: Subject, size_px: int) -> tuple[np.ndarray, np.ndarray]:
    """The cached colour layer (see `render.colour_layer`) of a subject in a size_px box."""
    index = _scheme_index(subject, size_px)
    emblem = _emblem_index(subject.emblem, size_px)
    names = subject.colours + EMBLEMS[subject.emblem]
    index = np.where(emblem >= 0, emblem + 3, index)
    table = PALETTE_ARRAY[[COLOR_NAMES.index(name) for name in names]]
    # Hard edges (coverage rounded to 0 or 1; SPEC.md allows either): anti-aliased edge pixels
    # blend with the background into third colours, which would make a subject's histogram depend
    # on the background and on its size instead of on the subject alone.
    outline = (shape_mask(subject.shape, size_px) > 0.5).astype(np.float32)
    return colour_layer(table[index], outline)


def render_subject(
    subject: Subject,
    size_px: int,
    center: tuple[int, int],
    background: str,
    rng: np.random.Generator | None = None,
    noise: int = 6,
) -> np.ndarray:
    """Draw one subject as a 64 x 64 x 3 uint8 image.

    Args:
        subject: what to draw.
        size_px: side of its bounding box in pixels (8 to 64).
        center: (x, y) of the box centre; the box's top-left pixel is center - size_px // 2.
        background: one of `subject.backgrounds`.
        rng: source of pixel noise (None: unseeded).
        noise: noise amplitude, 0 to 6.
    Returns:
        uint8 array (64, 64, 3).

    Example:
        >>> img = render_subject(subject, 30, (32, 32), "white", np.random.default_rng(0))
    """
    if not isinstance(subject, Subject):
        raise InputError(f"render_subject needs a Subject; got {type(subject).__name__}")
    if not 8 <= size_px <= IMAGE_SIZE:
        raise InputError(f"size_px must be from 8 to {IMAGE_SIZE}; got {size_px}")
    if background not in subject.backgrounds:
        raise InputError(
            f"subject {subject.name!r} cannot be shown on {background!r} (one of its own or its emblem's "
            f"colours); use one of {', '.join(subject.backgrounds)}"
        )
    canvas = blank_canvas(background)
    x, y = center
    paste(canvas, subject_layer(subject, int(size_px)), int(y) - size_px // 2, int(x) - size_px // 2)
    return finish(canvas, rng, noise)


@cache
def reference_histogram(subject: Subject) -> np.ndarray:
    """Share of each palette colour among the object pixels of the subject's canonical rendering.

    The canonical rendering is 34 px at the centre, noise 0, on the first allowed background in
    palette order; it is read with the checker's own `object_mask` and `colour_histogram`, so a
    faithful render scores close to 1 with `subject_fidelity`.

    Returns:
        Read-only float64 array (8,), `COLOR_NAMES` order.
    """
    background = subject.backgrounds[0]
    img = render_subject(subject, CANONICAL_SIZE, (IMAGE_SIZE // 2, IMAGE_SIZE // 2), background, None, 0)
    histogram = colour_histogram(img, object_mask(img, background))
    histogram.setflags(write=False)
    return histogram


def _subject_name(shape: str, colours: tuple[str, ...], scheme: str, emblem: str | None = None) -> str:
    parts = [_SCHEME_WORDS[scheme], shape, "".join(_INITIALS[c] for c in colours)]
    return "_".join(parts + ([emblem] if emblem else []))


def _eval_subject(shape: str, colours: tuple[str, str, str], scheme: str, emblem: str) -> Subject:
    return Subject(_subject_name(shape, colours, scheme), shape, colours, scheme, emblem)


#: The fixed evaluation subjects, covering every shape, scheme and emblem.
EVAL_SUBJECTS: dict[str, Subject] = {
    s.name: s
    for s in (
        _eval_subject("star", ("red", "green", "blue"), "rings", "eye"),
        _eval_subject("circle", ("purple", "orange", "yellow"), "bands", "bar"),
        _eval_subject("heart", ("yellow", "purple", "green"), "rings", "cross"),
        _eval_subject("triangle", ("red", "blue", "white"), "bands", "dot"),
        _eval_subject("diamond", ("orange", "blue", "black"), "diagonal", "cross"),
        _eval_subject("star", ("yellow", "green", "black"), "bands", "cross"),
        _eval_subject("circle", ("white", "red", "purple"), "diagonal", "dot"),
        _eval_subject("square", ("green", "orange", "blue"), "rings", "eye"),
    )
}

# A training subject with an evaluation subject's shape and colour set (in any order, scheme or
# emblem) would leak that subject's look into training, so those are never generated.
_EVAL_KEYS = frozenset((s.shape, frozenset(s.colours)) for s in EVAL_SUBJECTS.values())


def _is_evaluation_like(shape: str, colours: tuple[str, ...]) -> bool:
    return (shape, frozenset(colours)) in _EVAL_KEYS


@cache
def _subject_space(evaluation_like: bool) -> tuple[Subject, ...]:
    # Every subject of one side of the split, in a fixed order: the training side is what
    # random_subject may return (about 13,000); the held-out side, less EVAL_SUBJECTS, about 500.
    fixed = {(s.shape, s.colours, s.scheme, s.emblem) for s in EVAL_SUBJECTS.values()}
    subjects = []
    for shape, scheme, emblem in itertools.product(SHAPES, SCHEMES, EMBLEMS):
        allowed = [c for c in COLOR_NAMES if c not in EMBLEMS[emblem]]
        for colours in itertools.permutations(allowed, 3):
            if _is_evaluation_like(shape, colours) != evaluation_like:
                continue
            if (shape, colours, scheme, emblem) not in fixed:
                subjects.append(
                    Subject(_subject_name(shape, colours, scheme, emblem), shape, colours, scheme, emblem)
                )
    return tuple(subjects)


def _training_subjects() -> tuple[Subject, ...]:
    return _subject_space(evaluation_like=False)


def random_subject(rng: np.random.Generator) -> Subject:
    """A uniformly random subject that does not share an evaluation subject's shape and colour set."""
    subjects = _training_subjects()
    return subjects[rng.integers(len(subjects))]


def subject_stream(seed: int) -> Iterator[Subject]:
    """Every distinct training subject once, in a seeded random order.

    The space is finite (about 13,000 subjects: 6 shapes x 3 schemes x 4 emblems x ordered colour
    triples, less those resembling an evaluation subject); the iterator ends after the last one.

    Example:
        >>> first_100 = list(itertools.islice(subject_stream(seed=0), 100))
    """
    subjects = _training_subjects()
    for index in np.random.default_rng(seed).permutation(len(subjects)):
        yield subjects[index]


def held_out_stream(seed: int) -> Iterator[Subject]:
    """Every held-out subject except `EVAL_SUBJECTS` once, in a seeded random order.

    These share an evaluation subject's shape and colour set, which training never produces, but
    not its colour order, scheme or emblem: fresh subjects for evaluating a model trained across
    subjects (a hypernetwork, an ID adapter) on subjects it cannot have seen, beyond the fixed eight.

    Example:
        >>> fresh = list(itertools.islice(held_out_stream(seed=0), 8))
    """
    subjects = _subject_space(evaluation_like=True)
    for index in np.random.default_rng(seed).permutation(len(subjects)):
        yield subjects[index]
