"""Conversions between images as people hold them (PIL, uint8 arrays) and as models want them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def to_model_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], the range SD's VAE works in."""
    x = torch.as_tensor(np.asarray(images))
    return x.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3] (rounded, clipped)."""
    x = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: list[np.ndarray] | np.ndarray, columns: int, pad: int = 2) -> Image.Image:
    """Tile equally sized uint8 HxWx3 images into one PIL image, row by row."""
    images = [np.asarray(im) for im in images]
    h, w = images[0].shape[:2]
    rows = (len(images) + columns - 1) // columns
    canvas = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        canvas[y : y + h, x : x + w] = im[..., :3]
    return Image.fromarray(canvas)


def row_grid(rows: list[list[np.ndarray]], pad: int = 2) -> Image.Image:
    """`grid` with one row per list; shorter rows end in white cells."""
    width = max(len(r) for r in rows)
    blank = np.full_like(np.asarray(rows[0][0]), 255)
    return grid([im for r in rows for im in list(r) + [blank] * (width - len(r))], columns=width, pad=pad)
