"""User photos for training: read what people actually upload, say what was skipped and why.

Photos arrive from phones and editors: JPEGs rotated by an EXIF tag, PNGs with alpha, greyscale,
CMYK and 16-bit files, the odd 0-byte or half-copied file. `load_photos` turns a folder of them into
equally sized RGB arrays (resize so the short side fits, then centre crop), honours EXIF orientation,
reads optional sidecar captions (`photo.jpg` + `photo.txt`), and skips unusable files with a named
warning instead of a traceback. It never upscales: a photo smaller than the training size is skipped.
A photo of more than `MAX_PHOTO_PIXELS` is skipped too, judged from its header before it is decoded: a
420 KB PNG can hold 12000x12000 pixels and take gigabytes to decode (PIL only warns below its own
bomb limit of about 179 megapixels).

Example:
    >>> photos = load_photos("my_cat/", size=512)
    >>> photos.images.shape, photos.captions[0], photos.skipped
    ((5, 512, 512, 3), 'a sks cat on a sofa', [('IMG_2.jpg', 'unreadable: ...')])
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pimg.errors import InputError, TrainingError

#: File endings read as photos (lower case); anything else in the folder is ignored, `.txt` are captions.
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"

#: Largest photo read, in pixels (width x height), checked before decoding. Training sizes are 64-1024 px,
#: so a photo needs no more than a few megapixels; 40 MP still takes every phone's normal output (12-24 MP)
#: and most cameras' (24-36 MP), and decodes in about 120 MB (RGB) rather than a 12000x12000 PNG's 430 MB
#: plus conversions. The demo's upload limit is the same (`pimg.frontends.uploads.UploadLimits`).
MAX_PHOTO_PIXELS = 40_000_000

# PIL modes holding more than 8 bits per sample; they are scaled to 8 bits, not clipped.
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class PhotoWarning(UserWarning):
    """A photo was skipped; the message names it and says why."""


@dataclass
class PhotoSet:
    """Photos ready for training.

    Attributes:
        images: uint8 [N, size, size, 3].
        captions: the sidecar caption of each photo, or None where there is none.
        paths: the file each image came from.
        original_sizes: (height, width) of each photo after EXIF rotation, before resizing.
        crop_offsets: (top, left) of the centre crop in the resized photo (SDXL conditions on both).
        skipped: (file name, reason) for every file that was not used.
    """

    images: np.ndarray
    captions: list[str | None]
    paths: list[Path]
    original_sizes: list[tuple[int, int]] = field(default_factory=list)
    crop_offsets: list[tuple[int, int]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def report(self) -> str:
        """One line per skipped file, or a line saying none was."""
        if not self.skipped:
            return f"{len(self)} photo(s) used, none skipped."
        lines = [f"{len(self)} photo(s) used, {len(self.skipped)} skipped:"]
        lines += [f"  {name}: {reason}" for name, reason in self.skipped]
        return "\n".join(lines)


def read_photo(path: str | Path, *, max_pixels: int = MAX_PHOTO_PIXELS) -> Image.Image:
    """Open one photo as an 8-bit RGB PIL image, upright (EXIF orientation applied).

    RGBA, LA and palette images with transparency are flattened onto white; greyscale, CMYK and
    16-bit images are converted (16-bit values are scaled to 8 bits, not clipped).

    Args:
        path: the photo.
        max_pixels: refuse images of more pixels than this (read from the header, before decoding).

    Raises:
        InputError: the file is empty, truncated, not an image, or over `max_pixels`; the message names it.

    Example:
        >>> read_photo("cat.jpg").size
        (3024, 4032)
    """
    path = Path(path)
    image, problem = _open_photo(path, max_pixels)
    if problem is not None:
        raise InputError(f"photo {path.name}: {problem}")
    return image


def _open_photo(path: Path, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """(RGB image, None), or (None, why the file cannot be used)."""
    if path.stat().st_size == 0:
        return None, "the file is empty (0 bytes); copy the photo again"
    try:
        with _open_quietly(path) as opened:  # reads the header only
            width, height = opened.size
            if width * height > max_pixels:
                return None, _too_many_pixels(
                    f"{width}x{height} px ({width * height / 1e6:.1f} megapixels)", max_pixels
                )
            opened.load()  # decode now: a truncated file fails here, not later in training
            image = ImageOps.exif_transpose(opened)
    except UnidentifiedImageError:
        return None, "not an image PIL can read (is it another kind of file, renamed?)"
    except Image.DecompressionBombError as exc:  # over PIL's own limit: refused by Image.open itself
        return None, _too_many_pixels(f"the image is far too large for PIL ({exc}), so it", max_pixels)
    except (OSError, SyntaxError, ValueError) as exc:
        return None, f"cannot be decoded ({exc}); the file is truncated or damaged"
    return _to_rgb(image), None


def _open_quietly(path: Path) -> Image.Image:
    """`Image.open` without PIL's warning of images over ~89 megapixels: the pixel limit says more."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def _too_many_pixels(size: str, max_pixels: int) -> str:
    return (
        f"{size} is over the limit of {max_pixels / 1e6:g} megapixels per photo; training needs only a "
        "few, so resize it (e.g. to 4096 px on the long side)"
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _WIDE_MODES:
        values = np.asarray(image).astype(np.float64)
        # 16-bit files span 0-65535; float and 32-bit ones are scaled by their own maximum.
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        values = np.clip(values / top * 255.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(values).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def resize_and_crop(image: Image.Image, size: int) -> tuple[Image.Image, tuple[int, int]]:
    """Resize so the short side is `size` (Lanczos), then crop the centre square.

    Returns:
        The size x size image and the crop's (top, left) in the resized image.
    """
    width, height = image.size
    scale = size / min(width, height)
    if scale != 1.0:
        image = image.resize(
            (max(size, round(width * scale)), max(size, round(height * scale))), Image.LANCZOS
        )
    width, height = image.size
    top, left = (height - size) // 2, (width - size) // 2
    return image.crop((left, top, left + size, top + size)), (top, left)


def load_photos(
    folder: str | Path, size: int, *, min_photos: int = 1, max_pixels: int = MAX_PHOTO_PIXELS
) -> PhotoSet:
    """Read every photo in `folder` for training at `size` x `size` pixels.

    Files ending in one of `PHOTO_SUFFIXES` are read (in name order); a `.txt` file with the same
    stem is the photo's caption. Unreadable files, photos smaller than `size` and photos of more than
    `max_pixels` are skipped, each with a `PhotoWarning` naming the file and the reason.

    Args:
        folder: the folder of photos.
        size: training resolution in pixels (square).
        min_photos: refuse when fewer usable photos remain.
        max_pixels: largest photo in pixels (width x height), checked from the header before decoding.

    Returns:
        A `PhotoSet`.

    Raises:
        InputError: `folder` is not a folder.
        TrainingError: fewer than `min_photos` usable photos; the message lists what was skipped.

    Example:
        >>> load_photos("photos/", size=64).images.shape
        (4, 64, 64, 3)
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"--photos {str(folder)!r} is not a folder; pass the folder that holds the photos.")
    if size < 8:
        raise InputError(f"the training size must be at least 8 pixels, got {size}.")
    if max_pixels < size * size:
        raise InputError(
            f"max_pixels {max_pixels} is below one training-size photo ({size}x{size} = {size * size} pixels)."
        )
    images, captions, paths, originals, offsets = [], [], [], [], []
    skipped: list[tuple[str, str]] = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() not in PHOTO_SUFFIXES:
            continue
        image, problem = _open_photo(path, max_pixels)
        if problem is not None:
            skipped.append((path.name, problem))
            continue
        width, height = image.size
        if min(width, height) < size:
            skipped.append(
                (
                    path.name,
                    f"{width}x{height} px is smaller than the training size {size} px; photos are "
                    "never upscaled, so use a larger photo or train at a smaller resolution",
                )
            )
            continue
        cropped, offset = resize_and_crop(image, size)
        images.append(np.asarray(cropped, dtype=np.uint8))
        captions.append(_read_caption(path))
        paths.append(path)
        originals.append((height, width))
        offsets.append(offset)
    for name, reason in skipped:
        warnings.warn(f"skipped photo {name}: {reason}", PhotoWarning, stacklevel=2)
    if len(images) < min_photos:
        listing = (
            "".join(f"\n  {name}: {reason}" for name, reason in skipped) or " (no .jpg/.png/.webp/.bmp files)"
        )
        raise TrainingError(
            f"{folder} holds {len(images)} usable photo(s), fewer than the {min_photos} needed. "
            f"Skipped:{listing}\nAdd photos of at least {size}x{size} px in {', '.join(PHOTO_SUFFIXES)}."
        )
    return PhotoSet(np.stack(images), captions, paths, originals, offsets, skipped)


def _read_caption(path: Path) -> str | None:
    sidecar = path.with_suffix(CAPTION_SUFFIX)
    if not sidecar.is_file():
        return None
    text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
    return " ".join(text.split()) or None


def save_photos(folder: str | Path, images: list[np.ndarray], captions: list[str] | None = None) -> Path:
    """Write uint8 HxWx3 arrays as `photo_00.png`, ... (and sidecar captions), e.g. toy-world subject photos.

    Example:
        >>> save_photos("runs/star/photos", subject.photos(4, seed=0))
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if captions is not None and len(captions) != len(images):
        raise InputError(f"save_photos got {len(images)} images but {len(captions)} captions.")
    for i, image in enumerate(images):
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / f"photo_{i:02d}.png")
        if captions is not None:
            (folder / f"photo_{i:02d}{CAPTION_SUFFIX}").write_text(captions[i] + "\n", encoding="utf-8")
    return folder


def photo_inputs(photos) -> tuple[list, list[str]]:
    """Photos given as a folder, paths or arrays -> (the photos, a name for each, for messages).

    A folder gives its photo files in name order (`PHOTO_SUFFIXES`); an empty folder or list is refused.
    """
    if isinstance(photos, str | Path):
        folder = Path(photos)
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder of photos.")
        photos = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
        if not photos:
            raise InputError(f"{folder} holds no photos ({', '.join(PHOTO_SUFFIXES)}).")
    photos = list(photos)
    if not photos:
        raise InputError("no photos given: give 1 or more photos of the subject.")
    return photos, [str(p) if isinstance(p, str | Path) else f"photo {i + 1}" for i, p in enumerate(photos)]
