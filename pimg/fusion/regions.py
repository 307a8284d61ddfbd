"""Where each subject of a composition goes: named regions, boxes and mask images, as weight maps.

A region is written the way a user says it:
- a name: `left`, `right`, `top`, `bottom`, `center`, or a quadrant (`top-left`, ...);
- a box `x0,y0,x1,y1` in 0-1 image coordinates (`0,0,0.5,1` is the left half);
- a mask image (white = the region; grey values are partial weights), any size: it is resized
  to the output size, and the resize is reported.

Optional soft edges (`feather`, a share of the image's shorter side) blur the border so that the
subjects blend into the background instead of ending at a hard line.

An empty region (a mask with no white pixel) is allowed and reported: its subject does not appear.
Overlaps are shared in proportion: where the weights of several regions add up to more than 1,
each is divided by their sum, so a pixel is never more than fully personalized; what is left
(1 - the sum) belongs to the global prompt and the base model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pimg.errors import InputError, did_you_mean

#: Named regions as boxes (x0, y0, x1, y1) in 0-1 image coordinates.
NAMED_REGIONS: dict[str, tuple[float, float, float, float]] = {
    "left": (0.0, 0.0, 0.5, 1.0),
    "right": (0.5, 0.0, 1.0, 1.0),
    "top": (0.0, 0.0, 1.0, 0.5),
    "bottom": (0.0, 0.5, 1.0, 1.0),
    "center": (0.25, 0.25, 0.75, 0.75),
    "top-left": (0.0, 0.0, 0.5, 0.5),
    "top-right": (0.5, 0.0, 1.0, 0.5),
    "bottom-left": (0.0, 0.5, 0.5, 1.0),
    "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "full": (0.0, 0.0, 1.0, 1.0),
}

#: The layout given to subjects that name no region, by how many there are.
DEFAULT_LAYOUTS: dict[int, tuple[str, ...]] = {
    1: ("full",),
    2: ("left", "right"),
    3: ("0,0,0.333,1", "0.333,0,0.667,1", "0.667,0,1,1"),
    4: ("top-left", "top-right", "bottom-left", "bottom-right"),
}

_BOX = re.compile(r"^\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Region:
    """One subject's place in the image.

    Attributes:
        box: (x0, y0, x1, y1) in 0-1 coordinates, or None when `mask` is given.
        mask: weights in [0, 1], [H, W] (any size; resized to the image), or None.
        feather: soft-edge width as a share of the image's shorter side (0 = hard edge).
        label: how the user wrote it, for messages and image metadata.
    """

    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None
    feather: float = 0.0
    label: str = ""

    def __post_init__(self):
        if (self.box is None) == (self.mask is None):
            raise InputError("a region is a box or a mask, exactly one of them.")
        if not (isinstance(self.feather, int | float) and math.isfinite(self.feather)) or not (
            0 <= self.feather <= 0.5
        ):
            raise InputError(
                f"feather must be between 0 and 0.5 (a share of the image side), got {self.feather!r}."
            )
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            if not all(math.isfinite(v) and 0 <= v <= 1 for v in self.box) or x1 <= x0 or y1 <= y0:
                raise InputError(
                    f"region box {self.label or self.box}: give x0,y0,x1,y1 in 0-1 with x0 < x1 and y0 < y1, "
                    "e.g. 0,0,0.5,1 for the left half."
                )
        else:
            mask = np.asarray(self.mask, dtype=np.float32)
            if mask.ndim != 2 or not np.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
                raise InputError(
                    f"region mask {self.label or ''}: give a 2-D array of weights in [0, 1]; got shape "
                    f"{mask.shape}, range [{np.nanmin(mask):g}, {np.nanmax(mask):g}]."
                )
            object.__setattr__(self, "mask", mask)

    def weights(self, height: int, width: int) -> tuple[torch.Tensor, list[str]]:
        """The region as weights [height, width] in [0, 1], and notes on what was changed (a resize)."""
        notes = []
        if self.box is not None:
            x0, y0, x1, y1 = self.box
            ys = (torch.arange(height, dtype=torch.float32) + 0.5) / height
            xs = (torch.arange(width, dtype=torch.float32) + 0.5) / width
            # A pixel belongs to the box when its centre does.
            inside_y = (ys >= y0) & (ys < y1)
            inside_x = (xs >= x0) & (xs < x1)
            weights = (inside_y[:, None] & inside_x[None, :]).float()
        else:
            weights = torch.from_numpy(self.mask)
            if weights.shape != (height, width):
                notes.append(
                    f"mask {self.label or ''} is {weights.shape[1]}x{weights.shape[0]}; resized to the image's "
                    f"{width}x{height}."
                )
                weights = F.interpolate(weights[None, None], size=(height, width), mode="bilinear")[0, 0]
                weights = weights.clamp(0, 1)
        if self.feather > 0:
            weights = _feather(weights, self.feather * min(height, width))
        if float(weights.max()) <= 0:
            notes.append(
                f"region {self.describe()} covers no pixel of the {width}x{height} image: its subject does not appear."
            )
        return weights, notes

    def describe(self) -> str:
        return self.label or (",".join(f"{v:g}" for v in self.box) if self.box else "mask")


def _feather(weights: torch.Tensor, width_px: float) -> torch.Tensor:
    # A Gaussian blur of the hard mask: sigma = width / 2 makes the ramp about `width` pixels wide.
    sigma = max(width_px / 2, 1e-3)
    radius = max(1, int(math.ceil(2 * sigma)))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    taps = taps / taps.sum()
    image = weights[None, None]
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="replicate"), taps.view(1, 1, 1, -1))
    image = F.conv2d(F.pad(image, (0, 0, radius, radius), mode="replicate"), taps.view(1, 1, -1, 1))
    return image[0, 0]


def parse_region(text: str | Path, feather: float = 0.0) -> Region:
    """A region from what a user typed: a name, a box `x0,y0,x1,y1`, or the path of a mask image.

    Example:
        >>> parse_region("left").box
        (0.0, 0.0, 0.5, 1.0)
        >>> parse_region("0.1,0.2,0.6,0.9", feather=0.05)
    """
    label = str(text).strip()
    if label.lower() in NAMED_REGIONS:
        return Region(box=NAMED_REGIONS[label.lower()], feather=feather, label=label.lower())
    if match := _BOX.match(label):
        return Region(box=tuple(float(v) for v in match.groups()), feather=feather, label=label)
    path = Path(label).expanduser()
    if path.is_file():
        return Region(mask=read_mask_image(path), feather=feather, label=str(path))
    raise InputError(
        f"region {label!r} is not a region name ({', '.join(NAMED_REGIONS)}), a box x0,y0,x1,y1 in 0-1, or "
        f"an existing mask image.{did_you_mean(label.lower(), NAMED_REGIONS)}"
    )


def read_mask_image(path: str | Path) -> np.ndarray:
    """A mask image as weights in [0, 1] (its luminance; an alpha channel, where present, multiplies it)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
            if "A" in image.getbands():
                grey = grey * np.asarray(image.getchannel("A"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as error:
        raise InputError(
            f"mask {path} is not an image pimg can read ({error}); give a PNG or JPEG."
        ) from error
    return grey


def default_regions(count: int, feather: float = 0.0) -> list[Region]:
    """The regions given to `count` subjects that name none (left/right, thirds, quadrants)."""
    if count not in DEFAULT_LAYOUTS:
        raise InputError(
            f"{count} subjects with no regions: pimg places 1 to {max(DEFAULT_LAYOUTS)} subjects by itself; give "
            "each subject a region (a name, a box or a mask image)."
        )
    return [parse_region(text, feather=feather) for text in DEFAULT_LAYOUTS[count]]


def region_weights(regions: list[Region], height: int, width: int) -> tuple[torch.Tensor, list[str]]:
    """Every region's weights [k, height, width], overlaps shared in proportion (see the module docstring).

    Returns the weights and notes (resized masks, overlaps) to show the user.
    """
    maps, notes = [], []
    for region in regions:
        weights, region_notes = region.weights(height, width)
        maps.append(weights)
        notes += region_notes
    stacked = torch.stack(maps)
    total = stacked.sum(0)
    overlap = total > 1 + 1e-6
    if bool(overlap.any()):
        share = 100 * float(overlap.float().mean())
        notes.append(
            f"regions overlap on {share:.1f}% of the image; there each subject's weight is divided by their sum."
        )
        stacked = stacked / total.clamp(min=1.0)
    return stacked, notes


def resize_weights(weights: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Region weights [k, H, W] averaged down to a UNet layer's [k, height, width]."""
    if weights.shape[-2:] == (height, width):
        return weights
    return F.adaptive_avg_pool2d(weights[None], (height, width))[0]
