"""Images in (paths, PIL images, uint8 arrays) and each backbone's preprocessing, as data.

Every embedding metric turns images into model input the same way: shorter side resized, centre
crop, per-channel normalisation. Only the numbers differ between backbones, so they live in one
frozen `Preprocess` per backbone and the tests pin them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from pimg.errors import InputError

#: An image as a caller may hold it: a file path, a PIL image, or a uint8 (H, W, 3) array.
ImageLike = str | os.PathLike | Image.Image | np.ndarray

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: OpenAI CLIP's normalisation (open_clip's `OPENAI_DATASET_MEAN/STD`, CLIPImageProcessor's defaults).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: ImageNet normalisation, which DINO was trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Shorter side to `resize` px, centre crop `crop` x `crop`, scale to [0, 1], normalise.

    With `resize_mode="squash"` (SigLIP-style open_clip models) both sides go to `resize` instead.

    Resizing goes through torchvision on PIL images (antialiased), as open_clip's and DINO's own
    evaluation transforms do, so one implementation serves every backbone.

    Attributes:
        resize: target length of the shorter side, in pixels.
        crop: side of the centre crop, in pixels.
        mean, std: per-channel normalisation of [0, 1] values.
        interpolation: "bicubic" or "bilinear".
        resize_mode: "shortest" (keep the aspect ratio) or "squash".
    """

    resize: int
    crop: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"

    def __post_init__(self):
        if self.interpolation not in ("bicubic", "bilinear"):
            raise InputError(f"interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}.")
        if self.resize_mode not in ("shortest", "squash"):
            raise InputError(f"resize_mode must be 'shortest' or 'squash', got {self.resize_mode!r}.")
        if self.crop > self.resize:
            raise InputError(f"crop ({self.crop}) cannot be larger than resize ({self.resize}).")

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL RGB images -> float tensor [N, 3, crop, crop]."""
        import torchvision.transforms.functional as TF
        from torchvision.transforms import InterpolationMode

        mode = InterpolationMode.BICUBIC if self.interpolation == "bicubic" else InterpolationMode.BILINEAR
        out = []
        for image in images:
            size = self.resize if self.resize_mode == "shortest" else [self.resize, self.resize]
            image = TF.resize(image, size, interpolation=mode, antialias=True)
            image = TF.center_crop(image, [self.crop, self.crop])
            out.append(TF.pil_to_tensor(image))
        x = torch.stack(out).float().div(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def describe(self) -> dict:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize_mode": self.resize_mode,
        }


#: OpenAI CLIP ViT-B/32 (open_clip `ViT-B-32` / `openai`, transformers `openai/clip-vit-base-patch32`).
OPENAI_CLIP_224 = Preprocess(224, 224, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic")
#: The DreamBooth paper's DINO protocol: resize 256 bicubic, centre crop 224, ImageNet mean/std.
DINO_224 = Preprocess(256, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
#: The toy world's CLIP: 64x64 images in [-1, 1]; toy images pass unchanged, photos are shrunk.
TOY_CLIP_64 = Preprocess(64, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")


def load_image(image: ImageLike) -> Image.Image:
    """Any `ImageLike` as a PIL RGB image, fully decoded.

    Raises:
        InputError: the file is missing or not an image, or the array is not uint8 (H, W, 3).
    """
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (3, 4):
            raise InputError(
                f"an image array must be uint8 of shape (H, W, 3); got {image.dtype} {tuple(image.shape)}."
            )
        return Image.fromarray(np.ascontiguousarray(image[..., :3]))
    path = Path(image)
    if not path.is_file():
        raise InputError(f"image file {path} does not exist.")
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now: a truncated file fails here, not halfway through a batch
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"image file {path} cannot be read as an image ({exc}).") from exc


def load_images(images: Sequence[ImageLike]) -> list[Image.Image]:
    """`load_image` on each; the first failure raises InputError naming its path."""
    if isinstance(images, str | os.PathLike | Image.Image | np.ndarray):
        raise InputError("expected a list of images; wrap a single image in a list.")
    return [load_image(im) for im in images]


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside `folder` (by suffix, hidden files left out), sorted by name."""
    folder = Path(folder)
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
