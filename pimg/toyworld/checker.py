"""Reading toy-world images by pixel arithmetic alone (SPEC.md, "What a checker reads").

Nothing here knows how an image was made: the same functions score renders, generated samples and
personalized outputs. Background = palette colour nearest the median border pixel; object pixels =
pixels more than 60 (Euclidean RGB) from that colour; everything else is read from those pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pimg.errors import InputError
from pimg.toyworld.captions import PromptSpec
from pimg.toyworld.palette import (
    COLOR_NAMES,
    PALETTE_ARRAY,
    POSITIONS,
    SHAPES,
    SIZES,
    nearest_palette_index,
)
from pimg.toyworld.render import shape_mask
from pimg.toyworld.scene import Scene

#: A pixel farther than this (Euclidean RGB) from the background colour is an object pixel.
OBJECT_DISTANCE = 60.0


def _check_image(img: np.ndarray) -> np.ndarray:
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 3:
        raise InputError(f"expected an RGB image of shape (H, W, 3), values 0-255; got shape {img.shape}")
    return img


def read_background(img: np.ndarray) -> str:
    """The palette colour nearest to the per-channel median of the image's 1-pixel border."""
    img = _check_image(img)
    border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])
    return COLOR_NAMES[int(nearest_palette_index(np.median(border, axis=0)))]


def object_mask(img: np.ndarray, background: str) -> np.ndarray:
    """Bool (H, W) mask of pixels farther than `OBJECT_DISTANCE` from the background colour."""
    img = _check_image(img)
    if background not in COLOR_NAMES:
        raise InputError(f"background must be one of {', '.join(COLOR_NAMES)}; got {background!r}")
    difference = img.astype(np.float32) - PALETTE_ARRAY[COLOR_NAMES.index(background)]
    return (difference**2).sum(axis=-1) > OBJECT_DISTANCE**2


def colour_histogram(img: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Share of each palette colour (`COLOR_NAMES` order) among the masked pixels' nearest colours.

    Returns:
        float64 array (8,) summing to 1, or all zeros when the mask is empty.
    """
    img = _check_image(img)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != img.shape[:2]:
        raise InputError(f"mask shape {mask.shape} does not match image shape {img.shape[:2]}")
    counts = np.bincount(nearest_palette_index(img[mask]).ravel(), minlength=len(COLOR_NAMES))
    total = counts.sum()
    return counts / total if total else np.zeros(len(COLOR_NAMES))


@dataclass(frozen=True, eq=False)
class ObjectReading:
    """What the checker reads about the object pixels of an image (or of one half of it).

    Attributes:
        colours: palette colours present among the object pixels, largest share first.
        histogram: shares of every palette colour, `COLOR_NAMES` order.
        centroid: mean (x, y) of the object pixels; pixel i spans [i, i+1), so its centre is i + 0.5.
        bbox: (left, top, width, height) of the object pixels, in pixels.
        size: "small" or "large", whichever of 18 / 34 px is nearer to the bbox's longer side.
        position: the `POSITIONS` entry nearest to the centroid.
        shape: the shape whose template (`shape_mask` fitted to the bbox) has the best IoU.
        shape_iou: that best IoU.
        pixel_count: number of object pixels.
    """

    colours: tuple[str, ...]
    histogram: np.ndarray
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    size: str
    position: str
    shape: str
    shape_iou: float
    pixel_count: int


def read_shape(crop: np.ndarray) -> tuple[str, float]:
    """The shape whose template best matches (IoU) a bool object mask cropped to its bounding box."""
    height, width = crop.shape
    best, best_iou = SHAPES[0], -1.0
    for shape in SHAPES:
        # Templates are stretched to the measured box: the colour threshold trims anti-aliased
        # edges by up to a pixel or two (thin star tips most), so the box is rarely exactly nominal.
        template = shape_mask(shape, width, height) > 0.5
        iou = (crop & template).sum() / (crop | template).sum()
        if iou > best_iou:
            best, best_iou = shape, float(iou)
    return best, best_iou


def read_object(img: np.ndarray, mask: np.ndarray | None = None) -> ObjectReading | None:
    """Read colours, centroid, size, position and shape of the object pixels.

    Args:
        img: RGB image (H, W, 3).
        mask: object pixels to read; default `object_mask(img, read_background(img))`.
    Returns:
        An `ObjectReading`, or None when there are no object pixels.

    Example:
        >>> read_object(render_scene(scene, noise=0)).shape
        'star'
    """
    img = _check_image(img)
    if mask is None:
        mask = object_mask(img, read_background(img))
    mask = np.asarray(mask, dtype=bool)
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return None
    histogram = colour_histogram(img, mask)
    order = np.argsort(-histogram, kind="stable")
    colours = tuple(COLOR_NAMES[i] for i in order if histogram[i] > 0)
    centroid = (float(cols.mean()) + 0.5, float(rows.mean()) + 0.5)
    top, left = int(rows.min()), int(cols.min())
    height, width = int(rows.max()) - top + 1, int(cols.max()) - left + 1
    size = min(SIZES, key=lambda name: abs(SIZES[name] - max(width, height)))
    position = min(POSITIONS, key=lambda name: np.hypot(*np.subtract(POSITIONS[name], centroid)))
    shape, shape_iou = read_shape(mask[top : top + height, left : left + width])
    return ObjectReading(
        colours=colours,
        histogram=histogram,
        centroid=centroid,
        bbox=(left, top, width, height),
        size=size,
        position=position,
        shape=shape,
        shape_iou=shape_iou,
        pixel_count=int(rows.size),
    )


def _colours_match(reading: ObjectReading | None, colours: tuple[str, ...]) -> bool:
    # Solid: the dominant colour is c1. Patterned: the two dominant colours are {c1, c2}.
    return reading is not None and set(reading.colours[: len(colours)]) == set(colours)


def object_regions(mask: np.ndarray, objects) -> list[np.ndarray]:
    """Split an object mask [H, W] into the region each object is read in, one per object.

    One object owns the whole mask; two small objects sit left + right or top + bottom, so the image is
    cut across that axis and each object owns the object pixels on its named half.
    """
    if len(objects) == 1:
        return [mask]
    axis = 1 if {o.position for o in objects} == {"left", "right"} else 0
    # True on the left (or top) half, broadcast along the other axis.
    low = np.expand_dims(np.arange(mask.shape[axis]) < mask.shape[axis] // 2, 1 - axis)
    return [mask & low if o.position in ("left", "top") else mask & ~low for o in objects]


def check_prompt(img: np.ndarray, spec: PromptSpec | Scene) -> dict[str, bool]:
    """Whether an image shows what a prompt (or scene) states, field by field.

    Keys: "background" always; "colour", "shape", and "size" / "position" where the spec states
    them; for two-object specs also "two_object", True only if each object's colours read right in
    its own half of the image (split across the layout axis). For two objects, "colour", "shape",
    "size" and "position" are True only if they hold for both objects, each read in its half.
    No object pixels make every object key False.

    Example:
        >>> check_prompt(img, parse_caption("a red star on a blue background"))
        {'background': True, 'colour': True, 'shape': True}
    """
    img = _check_image(img)
    if isinstance(spec, Scene):
        spec = PromptSpec.from_scene(spec)
    if not isinstance(spec, PromptSpec):
        raise InputError(f"check_prompt needs a PromptSpec or Scene; got {type(spec).__name__}")
    background = read_background(img)
    # Read objects against the background actually seen, so each key is judged on its own.
    regions = object_regions(object_mask(img, background), spec.objects)
    readings = [read_object(img, region) for region in regions]

    result = {"background": background == spec.background}
    pairs = list(zip(spec.objects, readings, strict=True))
    colour_ok = [_colours_match(reading, obj.colours) for obj, reading in pairs]
    result["colour"] = all(colour_ok)
    if len(spec.objects) == 2:
        result["two_object"] = all(colour_ok)
    result["shape"] = all(r is not None and r.shape == o.shape for o, r in pairs)
    if any(o.size is not None for o in spec.objects):
        result["size"] = all(o.size is None or (r is not None and r.size == o.size) for o, r in pairs)
    if any(o.position is not None for o in spec.objects):
        result["position"] = all(
            o.position is None or (r is not None and r.position == o.position) for o, r in pairs
        )
    return result


def subject_fidelity(img: np.ndarray, subject_or_hist) -> float:
    """Histogram intersection of the image's object colours with a subject's reference histogram.

    Args:
        img: RGB image (H, W, 3).
        subject_or_hist: a `Subject`, or its reference histogram (8 shares, `COLOR_NAMES` order).
    Returns:
        sum_i min(h_img[i], h_ref[i]) in [0, 1]; 1.0 = same colours in the same shares, 0.0 when
        the image has no object pixels.
    """
    if isinstance(subject_or_hist, np.ndarray | list | tuple):
        reference = np.asarray(subject_or_hist, dtype=np.float64)
        if reference.shape != (len(COLOR_NAMES),):
            raise InputError(
                f"a reference histogram has {len(COLOR_NAMES)} shares; got shape {reference.shape}"
            )
    else:
        # Imported here: subjects render their reference through this module, so a top-level
        # import would be circular.
        from pimg.toyworld.subjects import reference_histogram

        reference = reference_histogram(subject_or_hist)
    img = _check_image(img)
    histogram = colour_histogram(img, object_mask(img, read_background(img)))
    return float(np.minimum(histogram, reference).sum())
