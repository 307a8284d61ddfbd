"""User photos: a corpus of awkward and broken files gives named warnings or a clear refusal, never a traceback."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pimg.errors import InputError, TrainingError
from pimg.photos import PhotoWarning, load_photos, read_photo, resize_and_crop, save_photos

SIZE = 64


def _split_image(width: int, height: int) -> Image.Image:
    """Left half red, right half blue: a rotation shows where the halves went."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:, : width // 2] = (220, 40, 40)
    pixels[:, width // 2 :] = (40, 80, 220)
    return Image.fromarray(pixels)


def write_bad_corpus(folder: Path) -> dict[str, str]:
    """The issue's corpus; returns file name -> "ok" or "skip"."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    jpeg = io.BytesIO()
    _split_image(96, 96).save(jpeg, "JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (folder / "notes.jpg").write_text("this is a text file, not a photo\n")
    wide = (np.linspace(0, 65535, 80 * 80).reshape(80, 80)).astype(np.uint16)
    Image.fromarray(wide).save(folder / "sixteen_bit.png")
    _split_image(80, 80).convert("CMYK").save(folder / "cmyk.jpg", "JPEG", quality=95)
    rgba = np.zeros((72, 72, 4), np.uint8)
    rgba[16:56, 16:56] = (40, 170, 60, 255)  # opaque green square on a transparent field
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    rotated = _split_image(96, 64)  # stored landscape, EXIF says: rotate 90 degrees clockwise
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.jpg", "JPEG", quality=95, exif=exif.tobytes())
    _split_image(8, 8).save(folder / "tiny.png")
    _split_image(64, 64).save(folder / "plain.webp", "WEBP", lossless=True)
    _split_image(70, 70).convert("L").save(folder / "grey.bmp")
    (folder / "plain.txt").write_text("  a sks star\n on a blue background \n")
    (folder / "readme.md").write_text("not a photo, ignored")
    return {
        "empty.jpg": "skip",
        "truncated.jpg": "skip",
        "notes.jpg": "skip",
        "tiny.png": "skip",
        "sixteen_bit.png": "ok",
        "cmyk.jpg": "ok",
        "alpha.png": "ok",
        "rotated.jpg": "ok",
        "plain.webp": "ok",
        "grey.bmp": "ok",
    }


def test_bad_corpus_gives_named_warnings(tmp_path):
    expected = write_bad_corpus(tmp_path / "photos")
    with pytest.warns(PhotoWarning) as caught:
        photos = load_photos(tmp_path / "photos", SIZE)
    used = {p.name for p in photos.paths}
    assert used == {name for name, outcome in expected.items() if outcome == "ok"}
    skipped = dict(photos.skipped)
    assert set(skipped) == {name for name, outcome in expected.items() if outcome == "skip"}
    messages = " ".join(str(w.message) for w in caught)
    for name in skipped:
        assert name in messages
    assert "0 bytes" in skipped["empty.jpg"]
    assert "truncated" in skipped["truncated.jpg"]
    assert "8x8" in skipped["tiny.png"] and "smaller than the training size" in skipped["tiny.png"]
    assert photos.images.shape == (len(used), SIZE, SIZE, 3) and photos.images.dtype == np.uint8
    assert "tiny.png" in photos.report()

    by_name = {p.name: (im, c) for p, im, c in zip(photos.paths, photos.images, photos.captions, strict=True)}
    assert by_name["plain.webp"][1] == "a sks star on a blue background"
    assert by_name["cmyk.jpg"][1] is None
    # 16-bit: a ramp from black to white, scaled (not clipped to white).
    ramp = by_name["sixteen_bit.png"][0]
    assert ramp[0, 0].max() < 30 and ramp[-1, -1].min() > 225
    # RGBA: the transparent field is flattened onto white, the opaque square keeps its colour.
    alpha = by_name["alpha.png"][0]
    assert (
        tuple(alpha[2, 2]) == (255, 255, 255) and np.abs(alpha[32, 32].astype(int) - (40, 170, 60)).max() < 4
    )
    assert by_name["grey.bmp"][0].shape == (SIZE, SIZE, 3)


def test_exif_rotation_is_honoured(tmp_path):
    write_bad_corpus(tmp_path)
    image = read_photo(tmp_path / "rotated.jpg")
    assert image.size == (64, 96)  # portrait after the 90-degree turn
    pixels = np.asarray(image)
    # The red left half of the stored image is the top half once turned clockwise.
    assert pixels[10, 32, 0] > 150 and pixels[-10, 32, 2] > 150


def test_refuses_when_no_usable_photo(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "empty.jpg").write_bytes(b"")
    _split_image(8, 8).save(folder / "tiny.png")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhotoWarning)
        with pytest.raises(TrainingError, match=r"(?s)0 usable photo.*empty\.jpg.*tiny\.png"):
            load_photos(folder, SIZE)
    with pytest.raises(InputError, match="not a folder"):
        load_photos(tmp_path / "missing", SIZE)


def test_resize_and_centre_crop():
    image = _split_image(200, 100)
    cropped, (top, left) = resize_and_crop(image, 50)
    assert cropped.size == (50, 50) and (top, left) == (0, 25)
    same, offset = resize_and_crop(_split_image(64, 64), 64)
    assert offset == (0, 0) and np.array_equal(np.asarray(same), np.asarray(_split_image(64, 64)))


def test_save_photos_round_trip(tmp_path):
    images = [np.full((64, 64, 3), i * 40, np.uint8) for i in range(3)]
    save_photos(tmp_path / "p", images, [f"caption {i}" for i in range(3)])
    photos = load_photos(tmp_path / "p", 64)
    assert np.array_equal(photos.images, np.stack(images)) and photos.captions[2] == "caption 2"


def _huge_png_header(path: Path, width: int = 12000, height: int = 12000) -> Path:
    """A PNG whose header says width x height, cut short after the first bytes of its data.

    Decoding it would fail as truncated (or take gigabytes, were it whole); the pixel limit must refuse
    it from the header alone, before decoding.
    """
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, "PNG")  # 1 bit per pixel: 18 MB in memory, ~20 KB as PNG
    path.write_bytes(buffer.getvalue()[:200])
    return path


def test_pixel_limit_is_checked_from_the_header(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    _huge_png_header(folder / "bomb.png")
    _split_image(80, 80).save(folder / "fine.png")
    with pytest.warns(
        PhotoWarning,
        match=r"bomb\.png: 12000x12000 px \(144\.0 megapixels\) is over the limit of 40 megapixels",
    ):
        photos = load_photos(folder, SIZE)
    assert [p.name for p in photos.paths] == ["fine.png"]
    with pytest.raises(
        InputError, match=r"photo bomb\.png: 12000x12000 px .* limit of 40 megapixels per photo; .*resize"
    ):
        read_photo(folder / "bomb.png")


def test_pixel_limit_is_a_setting(tmp_path):
    _split_image(80, 80).save(tmp_path / "a.png")
    with pytest.raises(
        InputError, match=r"a\.png: 80x80 px \(0\.0 megapixels\) is over the limit of 0\.005 megapixels"
    ):
        read_photo(tmp_path / "a.png", max_pixels=5000)
    assert read_photo(tmp_path / "a.png", max_pixels=6400).size == (80, 80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PhotoWarning)
        with pytest.raises(TrainingError, match=r"(?s)0 usable photo.*a\.png: 80x80 px .* over the limit"):
            load_photos(tmp_path, SIZE, max_pixels=5000)
    with pytest.raises(InputError, match="below one training-size photo"):
        load_photos(tmp_path, SIZE, max_pixels=SIZE * SIZE - 1)
