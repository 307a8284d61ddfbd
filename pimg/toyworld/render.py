"""Rendering toy-world scenes to 64 x 64 RGB images, fast enough to stream millions for training.

Each shape is an inside/outside test on its unit bounding box. Its anti-aliased coverage mask (4 x 4
supersampled) is computed once per (shape, box size) and cached, and so is each object's colour
layer, so drawing a scene is a few array slices, one blend per object and one noise draw. Patterns
and colours are pixel-aligned inside the object, so the shape's outline is the only place where
colours mix (SPEC.md: "edges are the only mixed pixels").
"""

from __future__ import annotations

from functools import cache, lru_cache

import numpy as np

from pimg.errors import InputError
from pimg.toyworld.palette import COLOR_NAMES, IMAGE_SIZE, PALETTE_ARRAY, PATTERNS, POSITIONS, SHAPES, SIZES
from pimg.toyworld.scene import Scene, check_choice

# Samples per pixel side for coverage masks: 16 samples give 17 coverage levels, smooth enough edges.
SUPERSAMPLE = 4

# Star: ratio of inner to outer radius. A regular pentagram has 0.382; a slightly fuller star keeps
# small (18 px) stars from losing their thin tips to the checker's colour-distance threshold.
_STAR_INNER_RATIO = 0.45

# Pattern geometry from SPEC.md, in pixels.
_STRIPE = 4
_CHECKER = 4
_DOT_GRID, _DOT_RADIUS = 6, 2


def _star_polygon() -> np.ndarray:
    # Ten vertices, outer points at -90 + 72k degrees (image y points down, so -90 is straight up),
    # then stretched to fill the unit box exactly so the bounding box is the nominal size.
    angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER_RATIO)
    points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - low) / (high - low)


def _inside_polygon(x: np.ndarray, y: np.ndarray, polygon: np.ndarray) -> np.ndarray:
    # Even-odd crossing test, vectorized over points; a ray to +x crosses each edge at most once.
    inside = np.zeros(x.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(polygon, np.roll(polygon, -1, axis=0), strict=True):
        crosses = (y0 > y) != (y1 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at_y = x0 + (y - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (x < x_at_y)
    return inside


# Heart: two lobes (circles touching the top and the sides) joined to a point at the bottom centre
# by their tangent lines. A drawn heart reads far better at 18 px than an implicit heart curve, whose
# shallow notch makes it look like a circle.
_LOBE_RADIUS = 0.27


@cache
def _heart_polygon() -> np.ndarray:
    tip = np.array([0.5, 1.0])
    corners = []
    for side in (-1.0, 1.0):
        centre = np.array([0.5 + side * (0.5 - _LOBE_RADIUS), _LOBE_RADIUS])
        to_tip = tip - centre
        distance = np.hypot(*to_tip)
        # The tangent point sits at angle acos(r / d) from the centre-to-tip direction, outwards.
        turn = -side * np.arccos(_LOBE_RADIUS / distance)
        cos, sin = np.cos(turn), np.sin(turn)
        direction = to_tip / distance
        tangent = centre + _LOBE_RADIUS * np.array(
            [cos * direction[0] - sin * direction[1], sin * direction[0] + cos * direction[1]]
        )
        corners.append((tangent, centre))
    (left_tangent, left_centre), (right_tangent, right_centre) = corners
    return np.array([tip, left_tangent, left_centre, right_centre, right_tangent])


def _inside_heart(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    inside = _inside_polygon(x, y, _heart_polygon())
    for centre_x in (_LOBE_RADIUS, 1.0 - _LOBE_RADIUS):
        inside |= (x - centre_x) ** 2 + (y - _LOBE_RADIUS) ** 2 <= _LOBE_RADIUS**2
    return inside


def inside_shape(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Whether unit-box points (x right, y down, both in [0, 1]) fall inside `shape`.

    Every shape touches all four sides of the unit box, so its bounding box is the box.
    """
    if shape == "circle":
        return (x - 0.5) ** 2 + (y - 0.5) ** 2 <= 0.25
    if shape == "square":
        return (x >= 0) & (x <= 1) & (y >= 0) & (y <= 1)
    if shape == "triangle":  # apex at the top centre, base along the bottom
        return (y <= 1) & (np.abs(x - 0.5) <= 0.5 * y)
    if shape == "diamond":
        return np.abs(x - 0.5) + np.abs(y - 0.5) <= 0.5
    if shape == "star":
        return _inside_polygon(x, y, _star_polygon())
    if shape == "heart":
        return _inside_heart(x, y)
    raise InputError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}")


def pixel_centres(width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-box coordinates (x, y) of the pixel centres of a width x height box, each (height, width)."""
    return np.meshgrid((np.arange(width) + 0.5) / width, (np.arange(height) + 0.5) / height)


# Bounded: the checker asks for templates at whatever bbox it measures.
@lru_cache(maxsize=4096)
def shape_mask(shape: str, size_px: int, height: int | None = None) -> np.ndarray:
    """Anti-aliased coverage of `shape` filling a size_px x size_px box (or size_px wide x height).

    Args:
        shape: one of `SHAPES`.
        size_px: box width in pixels (and height, unless `height` is given).
        height: box height in pixels, for a non-square box (the checker fits templates to a bbox).
    Returns:
        Read-only float32 array (height, width) of coverage in [0, 1]; cached, do not modify.

    Example:
        >>> shape_mask("circle", 18).shape
        (18, 18)
    """
    check_choice("shape", shape, SHAPES)
    width, height = int(size_px), int(size_px if height is None else height)
    if width < 1 or height < 1:
        raise InputError(f"shape_mask needs a box of at least 1 x 1 pixel; got {width} x {height}")
    # Sample points at the centres of a SUPERSAMPLE x SUPERSAMPLE sub-grid of every pixel.
    x, y = pixel_centres(width * SUPERSAMPLE, height * SUPERSAMPLE)
    inside = inside_shape(shape, x, y).astype(np.float32)
    coverage = inside.reshape(height, SUPERSAMPLE, width, SUPERSAMPLE).mean(axis=(1, 3))
    coverage.setflags(write=False)
    return coverage


@cache
def pattern_mask(pattern: str, size_px: int) -> np.ndarray:
    """Where a pattern shows its second colour c2, in a size_px box anchored at its top-left pixel.

    Returns:
        Read-only bool array (size_px, size_px); all False for "solid".
    """
    check_choice("pattern", pattern, PATTERNS)
    rows, cols = np.mgrid[0:size_px, 0:size_px]
    if pattern == "solid":
        second = np.zeros((size_px, size_px), dtype=bool)
    elif pattern == "striped":  # horizontal bands, c1 first
        second = (rows // _STRIPE) % 2 == 1
    elif pattern == "checkered":  # c1 in the top-left square
        second = ((rows // _CHECKER) + (cols // _CHECKER)) % 2 == 1
    else:  # dotted: a dot centred on the pixel at (3, 3) of each 6 x 6 cell
        centre = _DOT_GRID // 2
        dy, dx = rows % _DOT_GRID - centre, cols % _DOT_GRID - centre
        second = dy**2 + dx**2 <= _DOT_RADIUS**2
    second.setflags(write=False)
    return second


def colour_layer(colours: np.ndarray, coverage: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Premultiplied colour and remaining-background weight of an object, ready for `paste`.

    Args:
        colours: float32 (h, w, 3) RGB of the object at each pixel (pixel-aligned, unmixed).
        coverage: float32 (h, w) anti-aliased coverage of the object's outline.
    Returns:
        (colours * coverage, 1 - coverage), shaped (h, w, 3) and (h, w, 1), read-only.
    """
    alpha = coverage[..., None].astype(np.float32)
    premultiplied, keep = colours.astype(np.float32) * alpha, 1.0 - alpha
    premultiplied.setflags(write=False)
    keep.setflags(write=False)
    return premultiplied, keep


@cache
def object_layer(shape: str, size_px: int, pattern: str, c1: str, c2: str | None):
    """The cached `colour_layer` of one patterned object (at most 6 x 2 x 176 distinct ones)."""
    colours = np.empty((size_px, size_px, 3), dtype=np.float32)
    colours[:] = PALETTE_ARRAY[COLOR_NAMES.index(c1)]
    if c2 is not None:
        colours[pattern_mask(pattern, size_px)] = PALETTE_ARRAY[COLOR_NAMES.index(c2)]
    return colour_layer(colours, shape_mask(shape, size_px))


def blank_canvas(background: str) -> np.ndarray:
    """A float32 64 x 64 x 3 canvas filled with the background colour."""
    check_choice("background", background, COLOR_NAMES)
    canvas = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    canvas[:] = PALETTE_ARRAY[COLOR_NAMES.index(background)]
    return canvas


def paste(canvas: np.ndarray, layer: tuple[np.ndarray, np.ndarray], top: int, left: int) -> None:
    """Blend a `colour_layer` onto the float canvas in place, its top-left pixel at (top, left)."""
    premultiplied, keep = layer
    height, width = keep.shape[:2]
    if top < 0 or left < 0 or top + height > canvas.shape[0] or left + width > canvas.shape[1]:
        raise InputError(
            f"a {width} x {height} object with its top-left at (x={left}, y={top}) does not fit in "
            f"the {canvas.shape[1]} x {canvas.shape[0]} image; move it inside the frame"
        )
    region = canvas[top : top + height, left : left + width]
    region *= keep
    region += premultiplied


def finish(canvas: np.ndarray, rng: np.random.Generator | None, noise: int) -> np.ndarray:
    """Add uniform integer noise in [-noise, noise] per pixel and channel, round and clip to uint8."""
    if not 0 <= noise <= 6:
        raise InputError(f"noise must be an integer from 0 to 6 (SPEC.md allows at most +-6); got {noise}")
    if noise:
        rng = rng if rng is not None else np.random.default_rng()
        canvas = canvas + rng.integers(-noise, noise + 1, size=canvas.shape, dtype=np.int8)
    canvas += 0.5  # round half up on the cast below
    np.clip(canvas, 0, 255, out=canvas)
    return canvas.astype(np.uint8)


def render_scene(scene: Scene, rng: np.random.Generator | None = None, noise: int = 6) -> np.ndarray:
    """Draw a scene as a 64 x 64 x 3 uint8 image.

    Each object's bounding box is `SIZES[size]` pixels on a side, centred at `POSITIONS[position]`;
    patterns are anchored at the box's top-left pixel.

    Args:
        scene: what to draw.
        rng: source of the pixel noise; None draws fresh, unseeded noise (irrelevant when noise=0).
        noise: per-pixel, per-channel uniform noise amplitude, 0 (clean) to 6.
    Returns:
        uint8 array (64, 64, 3).

    Example:
        >>> img = render_scene(sample_scene(np.random.default_rng(0)), np.random.default_rng(1))
    """
    if not isinstance(scene, Scene):
        raise InputError(f"render_scene needs a Scene; got {type(scene).__name__}")
    canvas = blank_canvas(scene.background)
    for obj in scene.objects:
        size = SIZES[obj.size]
        x, y = POSITIONS[obj.position]
        # Even sizes and integer centres put the box edges on pixel boundaries.
        paste(
            canvas, object_layer(obj.shape, size, obj.pattern, obj.c1, obj.c2), y - size // 2, x - size // 2
        )
    return finish(canvas, rng, noise)
