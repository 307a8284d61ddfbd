"""Photos that people upload through a form: check them before anything trains on them.

A browser upload can be anything with any name: a text file renamed `.png`, an empty file from a
failed copy, a 50 MB scan, a decompression bomb. `check_uploads` reads each file's bytes (never
trusting its name), collects every problem, and raises one `InputError` that names each bad file
and says what to do, so the demo shows a sentence instead of a traceback. `copy_uploads` then copies
the accepted files into a folder the caller owns, under names it chooses, so nothing later reads
from where the upload landed. `check_quota` keeps what one session, and all sessions together, may
keep of uploaded photos on disk.

Example:
    >>> paths = check_uploads(["a.png", "b.jpg"], UploadLimits(max_files=10))
    >>> copy_uploads(paths, "sessions/3f2a/subjects/star/photos")
    [PosixPath('.../photo_00.png'), PosixPath('.../photo_01.jpg')]
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from pimg.errors import InputError
from pimg.photos import MAX_PHOTO_PIXELS

#: File endings accepted as photos (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Bytes that start common non-image files people upload by mistake, for a more precise message.
_KNOWN_SIGNATURES = {
    b"%PDF": "a PDF document",
    b"PK\x03\x04": "a zip archive (or an Office document)",
    b"GIF8": "a GIF animation (save a frame as PNG or JPEG)",
    b"\x1f\x8b": "a gzip archive",
}


@dataclass(frozen=True)
class UploadLimits:
    """What one upload of photos may hold.

    Attributes:
        min_files: fewest photos accepted.
        max_files: most photos accepted.
        max_bytes: largest file, in bytes (checked before the file is decoded).
        max_pixels: largest image, in pixels (width x height; guards against decompression bombs,
            tiny files that decode to gigabytes).
        min_side: smallest accepted short side in pixels (the training size: photos are never upscaled).
        max_session_bytes: photos one session may keep, all its subjects together. 100 MiB holds two or
            three trainings on ten full-size phone photos (3-5 MB each).
        max_total_bytes: photos all sessions together may keep (2 GiB: twenty sessions at their limit,
            a hundred or more typical ones); sessions' files go when their page closes or sits unused.
    """

    min_files: int = 1
    max_files: int = 10
    max_bytes: int = 20 * 2**20
    # The CLI's limit (the choice is explained at `pimg.photos.MAX_PHOTO_PIXELS`).
    max_pixels: int = MAX_PHOTO_PIXELS
    min_side: int = 0
    max_session_bytes: int = 100 * 2**20
    max_total_bytes: int = 2 * 2**30

    def __post_init__(self):
        if not 1 <= self.min_files <= self.max_files:
            raise InputError(
                f"upload limits need 1 <= min_files <= max_files, got {self.min_files} and {self.max_files}."
            )
        if self.max_bytes < 1 or self.max_pixels < 1 or self.min_side < 0:
            raise InputError(
                f"upload limits must be positive, got max_bytes={self.max_bytes}, max_pixels={self.max_pixels}, "
                f"min_side={self.min_side}."
            )
        if not 1 <= self.max_session_bytes <= self.max_total_bytes:
            raise InputError(
                "upload limits need 1 <= max_session_bytes <= max_total_bytes, got "
                f"{self.max_session_bytes} and {self.max_total_bytes}."
            )


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def _describe_non_image(head: bytes) -> str:
    for signature, what in _KNOWN_SIGNATURES.items():
        if head.startswith(signature):
            return what
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "not an image"
    if all(c.isprintable() or c in "\r\n\t" for c in text):
        return "a text file, not an image"
    return "not an image"


def image_problem(path: str | Path, limits: UploadLimits = UploadLimits()) -> str | None:
    """Why the file at `path` cannot be used as a photo, or None when it can.

    The file is judged by its bytes: its name only has to end in one of `IMAGE_SUFFIXES`.
    """
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"only photos can be uploaded ({', '.join(IMAGE_SUFFIXES)}), not '{path.suffix or 'no ending'}' files"
    if not path.is_file():
        return "the upload did not arrive (no file); upload it again"
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes); copy the photo again and re-upload it"
    if size > limits.max_bytes:
        return (
            f"the file is {_megabytes(size)}, over the {_megabytes(limits.max_bytes)} limit per photo; "
            "save it smaller (e.g. as a JPEG of at most 2048 px)"
        )
    with path.open("rb") as f:
        head = f.read(64)
    try:
        with warnings.catch_warnings():  # PIL warns of images over ~89 megapixels: the limit below says more
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened as image:
            width, height = image.size
            if width * height > limits.max_pixels:
                return (
                    f"the image is {width}x{height} px, over the {limits.max_pixels / 1e6:.0f} megapixel limit; "
                    "resize it"
                )
            image.load()  # decode now: a truncated file fails here, not in the middle of training
    except UnidentifiedImageError:
        return f"the file is {_describe_non_image(head)} although its name ends in {path.suffix}"
    except Image.DecompressionBombError as exc:  # over PIL's own limit: refused by Image.open itself
        return f"the image is far too large ({exc}), over the {limits.max_pixels / 1e6:.0f} megapixel limit; resize it"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"the image cannot be decoded ({exc}); the file is truncated or damaged"
    if min(width, height) < limits.min_side:
        return (
            f"the image is {width}x{height} px, smaller than the training size {limits.min_side} px "
            "(photos are never upscaled); use a larger photo"
        )
    return None


def check_uploads(
    paths: list[str | Path] | None,
    limits: UploadLimits = UploadLimits(),
    *,
    names: list[str] | None = None,
) -> list[Path]:
    """Check an upload of photos as a whole; return their paths when every one can be used.

    Args:
        paths: the uploaded files (None or empty: nothing was uploaded).
        limits: counts, sizes and pixel limits.
        names: what to call each file in messages (default: its file name).

    Returns:
        The paths, in order.

    Raises:
        InputError: too few or too many files, or any unusable file; the message lists every bad
            file with its reason and says how to fix it.

    Example:
        >>> check_uploads(["notes.png"])
        InputError: 1 of 1 uploaded file(s) cannot be used: notes.png: the file is a text file, ...
    """
    paths = [Path(p) for p in paths or []]
    names = names or [p.name for p in paths]
    if len(paths) < limits.min_files:
        raise InputError(
            f"{len(paths)} photo(s) uploaded; upload at least {limits.min_files} (up to {limits.max_files}) "
            "photos of the subject."
        )
    if len(paths) > limits.max_files:
        raise InputError(
            f"{len(paths)} photos uploaded, more than the {limits.max_files} allowed; pick the "
            f"{limits.max_files} best (varied backgrounds and angles help most)."
        )
    problems = [(name, image_problem(path, limits)) for name, path in zip(names, paths, strict=True)]
    bad = [(name, why) for name, why in problems if why is not None]
    if bad:
        listing = "; ".join(f"{name}: {why}" for name, why in bad)
        raise InputError(
            f"{len(bad)} of {len(paths)} uploaded file(s) cannot be used: {listing}. Remove or replace "
            f"{'it' if len(bad) == 1 else 'them'} and try again."
        )
    return paths


def check_quota(
    paths: list[Path], session_bytes: int, total_bytes: int, limits: UploadLimits = UploadLimits()
) -> int:
    """Refuse an upload that would take a session's, or all sessions', kept photos over their limits.

    Args:
        paths: the upload's (checked) files.
        session_bytes: bytes of photos the session keeps already.
        total_bytes: bytes of photos all sessions keep already (this one's included).
        limits: `max_session_bytes` and `max_total_bytes`.

    Returns:
        The upload's size in bytes.

    Raises:
        InputError: saying which limit, what is kept already, the upload's size, and what to do.

    Example:
        >>> check_quota([Path("a.png")], session_bytes=99 * 2**20, total_bytes=2**30)
        InputError: this upload (2.1 MB) would bring the photos this session keeps to 101.1 MB, ...
    """
    size = sum(p.stat().st_size for p in paths)
    if session_bytes + size > limits.max_session_bytes:
        raise InputError(
            f"this upload ({_megabytes(size)}) would bring the photos this session keeps to "
            f"{_megabytes(session_bytes + size)}, over the {_megabytes(limits.max_session_bytes)} limit per "
            "session; upload fewer or smaller photos (the training size is small: 1024 px is plenty), or "
            "reload the page to start a new session (its subjects are then removed)."
        )
    if total_bytes + size > limits.max_total_bytes:
        raise InputError(
            f"the demo holds {_megabytes(total_bytes)} of photos from all sessions, and this upload "
            f"({_megabytes(size)}) would pass its {_megabytes(limits.max_total_bytes)} limit; try again "
            "later (a session's files are removed when its page is closed or left unused)."
        )
    return size


def copy_uploads(paths: list[Path], folder: str | Path) -> list[Path]:
    """Copy checked uploads into `folder` as `photo_00.png`, `photo_01.jpg`, ... (the name's ending kept).

    The uploaded names are never used as paths, so a name such as `../../x.png` cannot escape `folder`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for i, path in enumerate(paths):
        target = folder / f"photo_{i:02d}{path.suffix.lower()}"
        shutil.copyfile(path, target)
        copied.append(target)
    return copied
