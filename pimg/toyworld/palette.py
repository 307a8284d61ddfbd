"""The toy world's fixed vocabulary of colours, shapes, patterns, sizes and positions (SPEC.md).

Everything else in `pimg.toyworld` (scenes, rendering, captions, the checker) reads these names from
here, so the spec's tables exist in code exactly once.
"""

from __future__ import annotations

import numpy as np

from pimg.errors import InputError

#: Palette colours in spec order (name -> RGB).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}

#: Colour names in palette order; a colour's index here is its row in `PALETTE_ARRAY`.
COLOR_NAMES: tuple[str, ...] = tuple(PALETTE)

#: The palette as an 8 x 3 float32 array, row i = `COLOR_NAMES[i]`.
PALETTE_ARRAY: np.ndarray = np.array([PALETTE[name] for name in COLOR_NAMES], dtype=np.float32)
PALETTE_ARRAY.setflags(write=False)

#: Shapes, i.e. the class nouns of the toy world.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "heart", "diamond")

#: Fill patterns; every one but "solid" uses a second colour.
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")

#: Size name -> side of the object's (square) bounding box in pixels.
SIZES: dict[str, int] = {"small": 18, "large": 34}

#: Position name -> object centre (x, y) in pixels, x to the right and y down.
POSITIONS: dict[str, tuple[int, int]] = {
    "left": (18, 32),
    "right": (46, 32),
    "top": (32, 18),
    "bottom": (32, 46),
    "center": (32, 32),
}

#: Side of every toy-world image in pixels.
IMAGE_SIZE = 64


def nearest_palette_index(pixels: np.ndarray) -> np.ndarray:
    """Index (into `COLOR_NAMES`) of the palette colour nearest to each RGB pixel (Euclidean).

    Args:
        pixels: array of shape (..., 3), any numeric dtype, values 0-255.
    Returns:
        Integer array of shape (...,).

    Example:
        >>> nearest_palette_index(np.array([[250, 250, 250], [200, 30, 50]]))
        array([6, 0])
    """
    pixels = np.asarray(pixels)
    if pixels.shape[-1:] != (3,):
        raise InputError(f"pixels must have a last axis of 3 (RGB values), got shape {pixels.shape}")
    # |p - c|^2 = |p|^2 - 2 p.c + |c|^2; |p|^2 is the same for every c, so it drops out of the argmin.
    # One matrix product instead of an (..., 8, 3) difference array keeps this fast on whole images.
    flat = pixels.reshape(-1, 3).astype(np.float32)
    scores = flat @ (-2.0 * PALETTE_ARRAY.T) + (PALETTE_ARRAY**2).sum(axis=1)
    return scores.argmin(axis=1).reshape(pixels.shape[:-1])
