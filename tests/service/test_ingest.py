"""Image ingest: every upload case of issue 5 that is decided by the bytes and the filename."""
from __future__ import annotations

import hashlib
import io
import time
import unicodedata

import numpy as np
import pytest
from PIL import Image, ImageFile

from app import errors
from app.colour import NEUTRAL_BACKGROUND
from app.ingest import (DEFAULT_MAX_PIXELS, MAX_DISPLAY_NAME_CHARS,
                        IngestedImage, ingest_image, safe_display_name)
from tests.service import images

GREY = NEUTRAL_BACKGROUND


def pixel(result: IngestedImage, xy: tuple[int, int]) -> tuple[int, int, int]:
    return result.image.getpixel(xy)


def close(actual, expected, tolerance=3) -> bool:
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected))


def assert_user_safe(error: errors.ConvscopeError) -> None:
    message = error.message
    assert message.endswith(".") and "\n" not in message
    assert "Traceback" not in message and "/" not in message  # no paths
    assert len(message) < 200


# --- accepted formats, decided by content --------------------------------------------------

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"])
@pytest.mark.parametrize("lying_name", ["photo.jpg", "photo.png", "notes.txt", "noextension"])
def test_every_allowed_format_is_recognized_by_content_not_name(fmt, lying_name):
    data = images.every_format()[fmt]
    result = ingest_image(data, lying_name)
    assert result.source_format == fmt
    assert (result.width, result.height) == (48, 40)
    assert result.image.mode == "RGB"


def test_result_is_a_normalized_png_whose_hash_is_the_id():
    data = images.encode(images.noise(), "JPEG")
    result = ingest_image(data, "a.jpg")
    assert result.png_bytes.startswith(b"\x89PNG\r\n\x1a\n")
    assert result.sha256 == hashlib.sha256(result.png_bytes).hexdigest()
    decoded = Image.open(io.BytesIO(result.png_bytes))
    assert decoded.mode == "RGB" and decoded.size == (result.width, result.height)
    assert np.array_equal(np.asarray(decoded), np.asarray(result.image))
    assert ingest_image(data, "other-name.png").sha256 == result.sha256  # same bytes, same id


def test_same_pixels_in_different_lossless_formats_get_the_same_id():
    image = images.noise()
    ids = {ingest_image(images.encode(image, fmt), "x").sha256 for fmt in ("PNG", "BMP", "TIFF")}
    assert len(ids) == 1


def test_trailing_payload_does_not_survive_normalization():
    data = images.encode(images.noise(), "PNG") + b"<script>alert(1)</script>" + b"PK\x03\x04"
    result = ingest_image(data, "polyglot.png")
    assert b"<script" not in result.png_bytes and b"PK\x03\x04" not in result.png_bytes


# --- refused by content --------------------------------------------------------------------

UNSUPPORTED = {
    "text named .png": b"just some text, not an image\n",
    "html named .jpg": b"<!doctype html><html><body><script>alert(1)</script></body></html>",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
           b'<script>alert(1)</script></svg>',
    "svg with xml declaration": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>',
    "zip": b"PK\x03\x04" + b"\x00" * 60,
    "elf executable": b"\x7fELF\x02\x01\x01" + b"\x00" * 60,
    "windows executable": b"MZ\x90\x00" + b"\x00" * 60,
    "shell script": b"#!/bin/sh\nrm -rf /\n",
    "pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
    "psd": b"8BPS\x00\x01" + b"\x00" * 60,
    "ico": images.encode(images.solid((16, 16)), "ICO"),
    "jpeg 2000": b"\x00\x00\x00\x0cjP  \r\n\x87\n" + b"\x00" * 40,
    "avif/heic box": b"\x00\x00\x00\x1cftypavif" + b"\x00" * 40,
    "text starting BM": b"BMW and other words that are not a bitmap header at all",
    "utf-16 text": "hello".encode("utf-16"),
    "single byte": b"\x89",
    "riff but not webp": b"RIFF\x10\x00\x00\x00WAVEfmt " + b"\x00" * 20,
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_non_images_and_other_formats_are_unsupported(name):
    with pytest.raises(errors.ImageUnsupported) as caught:
        ingest_image(UNSUPPORTED[name], "innocent.png")
    assert caught.value.code == "E_IMAGE_UNSUPPORTED" and caught.value.http_status == 415
    assert_user_safe(caught.value)


def test_empty_file():
    with pytest.raises(errors.ImageEmpty) as caught:
        ingest_image(b"", "empty.png")
    assert caught.value.code == "E_IMAGE_EMPTY" and caught.value.http_status == 400


def test_body_over_max_bytes_is_refused_before_parsing():
    data = images.encode(images.noise((64, 64)), "PNG")
    with pytest.raises(errors.ImageTooLarge) as caught:
        ingest_image(data, "x.png", max_bytes=len(data) - 1)
    assert caught.value.http_status == 413
    assert_user_safe(caught.value)
    ingest_image(data, "x.png", max_bytes=len(data))


# --- truncated and damaged -----------------------------------------------------------------

def _truncations() -> list:
    # 18 bytes is just enough for every format's signature (BMP's includes its DIB header size).
    return [pytest.param(data[:cut], id=f"{fmt}-{label}")
            for fmt, data in images.every_format().items()
            for label, cut in (("signature only", 18), ("quarter", len(data) // 4),
                               ("half", len(data) // 2))]


@pytest.mark.parametrize("data", _truncations())
def test_truncated_files_are_corrupt(data):
    with pytest.raises(errors.ImageCorrupt) as caught:
        ingest_image(data, "cut.bin")
    assert caught.value.code == "E_IMAGE_CORRUPT"
    assert_user_safe(caught.value)


def test_damaged_png_data_is_corrupt():
    data = bytearray(images.encode(images.noise(), "PNG"))
    idat = data.index(b"IDAT")
    data[idat + 20:idat + 40] = bytes(20)  # the chunk CRC no longer matches
    with pytest.raises(errors.ImageCorrupt):
        ingest_image(bytes(data), "x.png")


def test_truncated_load_is_not_silently_accepted():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # a global someone might be tempted to flip


# --- decompression bombs: refused from the header, never decoded ----------------------------

BOMBS = {
    "png 30000x30000 (Pillow raises)": images.png_claiming(30000, 30000),
    "png 10000x10000 (Pillow only warns)": images.png_claiming(10000, 10000),
    "png 8000x8000 (under Pillow's limit, over ours)": images.png_claiming(8000, 8000),
    "gif 65535x65535": images.gif_claiming(65535, 65535),
    "jpeg 30000x30000": images.jpeg_claiming(30000, 30000),
    "bmp 30000x30000": images.bmp_claiming(30000, 30000),
    "tiff 30000x30000": images.tiff_claiming(30000, 30000),
    "webp 16384x16384": images.webp_claiming(16384, 16384),
}


@pytest.fixture
def forbid_decoding(monkeypatch):
    """Fail the test if any pixel data is decoded."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("ingest decoded pixels of an image it should have refused")
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    monkeypatch.setattr(Image.Image, "load", refuse)


@pytest.mark.parametrize("name", BOMBS)
def test_decompression_bombs_are_refused_before_decoding(name, forbid_decoding, recwarn):
    data = BOMBS[name]
    assert len(data) < 2000
    started = time.perf_counter()
    with pytest.raises(errors.ImageTooLarge) as caught:
        ingest_image(data, "bomb.png")
    assert time.perf_counter() - started < 1.0
    assert caught.value.code == "E_IMAGE_TOO_LARGE" and caught.value.http_status == 413
    assert "megapixels" in caught.value.message
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_pillow_warning_range_is_an_error_even_with_a_generous_own_limit(forbid_decoding):
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(errors.ImageTooLarge):
        ingest_image(images.png_claiming(10000, 10000), "x.png", max_pixels=10**12)


def test_own_pixel_limit_is_configurable():
    data = images.encode(images.noise((100, 100)), "PNG")
    with pytest.raises(errors.ImageTooLarge):
        ingest_image(data, "x.png", max_pixels=9999)
    assert ingest_image(data, "x.png", max_pixels=10000).width == 100
    assert DEFAULT_MAX_PIXELS <= Image.MAX_IMAGE_PIXELS


# --- size and shape ------------------------------------------------------------------------

@pytest.mark.parametrize("size, error", [
    ((1, 1), errors.ImageTooSmall),
    ((4, 4), errors.ImageTooSmall),
    ((7, 300), errors.ImageTooSmall),
    ((1000, 10), errors.ImageAspectRatio),
    ((10, 2000), errors.ImageAspectRatio),
])
def test_tiny_and_extreme_aspect_ratio_images_are_refused(size, error):
    with pytest.raises(error) as caught:
        ingest_image(images.encode(images.solid(size), "PNG"), "x.png")
    assert caught.value.http_status == 400
    assert f"{size[0]}\u00d7{size[1]}" in caught.value.message
    assert_user_safe(caught.value)


@pytest.mark.parametrize("size", [(8, 8), (400, 8), (8, 400)])
def test_smallest_and_longest_accepted_shapes(size):
    result = ingest_image(images.encode(images.solid(size), "PNG"), "x")
    assert (result.width, result.height) == size


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_large_images_are_downscaled_to_max_side(fmt):
    data = images.encode(images.solid((4100, 1000), (10, 200, 30)), fmt)
    result = ingest_image(data, "wide")
    assert max(result.width, result.height) == 2048
    assert abs(result.width / result.height - 4.1) < 0.01
    assert close(pixel(result, (1000, 200)), (10, 200, 30), tolerance=6)
    assert ingest_image(data, "wide", max_side=512).width == 512


# --- first frame / first page -------------------------------------------------------------

@pytest.mark.parametrize("data", [
    pytest.param(images.animated_gif(400), id="gif-400-frames"),
    pytest.param(images.animated("PNG"), id="apng"),
    pytest.param(images.animated("WEBP"), id="animated-webp"),
    pytest.param(images.multipage_tiff(), id="multipage-tiff"),
])
def test_animations_and_multipage_files_use_the_first_frame(data):
    started = time.perf_counter()
    result = ingest_image(data, "anim")
    assert close(pixel(result, (5, 5)), images.RED, tolerance=8)
    assert time.perf_counter() - started < 1.0


# --- colour modes --------------------------------------------------------------------------

def test_cmyk_jpeg_and_tiff_become_rgb():
    cyan_cmyk = images.solid((16, 16), (255, 0, 0, 0), mode="CMYK")
    for fmt in ("JPEG", "TIFF"):
        result = ingest_image(images.encode(cyan_cmyk, fmt), "cmyk")
        assert result.image.mode == "RGB"
        assert close(pixel(result, (4, 4)), (0, 255, 255), tolerance=6), fmt


def test_16bit_greyscale_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535, 1000]] * 8, dtype=np.uint16).repeat(4, axis=1)
    result = ingest_image(images.png_16bit_grey(values), "deep.png")
    row = [pixel(result, (x, 0))[0] for x in (0, 4, 8, 12)]
    assert row == [0, 128, 255, 4]  # Pillow's convert("L") would give [0, 255, 255, 255]


def test_16bit_rgb_png_keeps_its_colours():
    values = np.zeros((8, 8, 3), dtype=np.uint16)
    values[..., 0] = 65535
    values[..., 2] = 32768
    result = ingest_image(images.png_16bit_rgb(values), "deep.png")
    assert close(pixel(result, (2, 2)), (255, 0, 128), tolerance=1)


@pytest.mark.parametrize("array, expected", [
    pytest.param(np.array([[0, 65535]], dtype=np.int32), (0, 255), id="I-16bit-range"),
    pytest.param(np.array([[-100, 100]], dtype=np.int32), (0, 255), id="I-signed-stretched"),
    pytest.param(np.array([[0.0, 1.0]], dtype=np.float32), (0, 255), id="F-unit-range"),
    pytest.param(np.array([[0.0, 0.5]], dtype=np.float32), (0, 128), id="F-unit-not-stretched"),
    pytest.param(np.array([[-5.0, 5.0]], dtype=np.float32), (0, 255), id="F-stretched"),
    pytest.param(np.array([[np.nan, 1.0]], dtype=np.float32), (255, 255), id="F-nan"),
])
def test_integer_and_float_tiffs_become_rgb_deliberately(array, expected):
    mode = "I" if array.dtype == np.int32 else "F"
    image = Image.fromarray(array.repeat(8, axis=0).repeat(8, axis=1), mode=mode)
    result = ingest_image(images.encode(image, "TIFF"), "deep.tif")
    if np.isnan(array).any():  # NaN takes the smallest finite value
        expected = (255, 255)
    assert (pixel(result, (0, 0))[0], pixel(result, (8, 0))[0]) == expected
    assert result.image.mode == "RGB"


def test_float_tiff_without_any_finite_value_is_corrupt():
    image = Image.fromarray(np.full((8, 8), np.inf, dtype=np.float32), mode="F")
    with pytest.raises(errors.ImageCorrupt):
        ingest_image(images.encode(image, "TIFF"), "inf.tif")


def test_alpha_is_composited_on_neutral_grey():
    result = ingest_image(images.rgba_png([(255, 0, 0, 255), (255, 0, 0, 0),
                                           (255, 0, 0, 128)]), "alpha.png")
    assert pixel(result, (2, 2)) == (255, 0, 0)
    assert pixel(result, (10, 2)) == GREY  # transparent: grey, not black or the hidden red
    assert close(pixel(result, (18, 2)), (192, 64, 64), tolerance=2)


def test_greyscale_with_alpha_is_composited_on_neutral_grey():
    image = Image.new("LA", (16, 8), (0, 255))
    image.paste((0, 0), (8, 0, 16, 8))
    result = ingest_image(images.encode(image, "PNG"), "la.png")
    assert pixel(result, (2, 2)) == (0, 0, 0) and pixel(result, (12, 2)) == GREY


def test_palette_transparency_is_composited_on_neutral_grey():
    result = ingest_image(images.palette_png_with_transparency(), "p.png")
    assert pixel(result, (2, 2)) == GREY and pixel(result, (12, 2)) == images.RED


def test_transparent_gif_is_composited_on_neutral_grey():
    image = Image.new("P", (16, 8), 0)
    image.putpalette([0, 255, 0] + list(images.RED) + [0, 0, 0] * 254)
    image.paste(1, (8, 0, 16, 8))
    result = ingest_image(images.encode(image, "GIF", transparency=0), "t.gif")
    assert pixel(result, (2, 2)) == GREY and pixel(result, (12, 2)) == images.RED


@pytest.mark.parametrize("mode, colour, expected", [
    ("1", 1, (255, 255, 255)),
    ("1", 0, (0, 0, 0)),
    ("L", 77, (77, 77, 77)),
    ("P", 3, (9, 10, 11)),
])
def test_one_bit_grey_and_palette_modes(mode, colour, expected):
    image = Image.new(mode, (16, 16), colour)
    if mode == "P":
        image.putpalette([0, 0, 0] * 3 + [9, 10, 11] + [0, 0, 0] * 252)
    for fmt in ("PNG", "BMP", "TIFF"):
        result = ingest_image(images.encode(image, fmt), "m")
        assert pixel(result, (3, 3)) == expected, fmt


# --- EXIF -----------------------------------------------------------------------------------

@pytest.mark.parametrize("orientation, size, red_at", [
    (1, (40, 20), (5, 10)),     # upright: red on the left
    (3, (40, 20), (35, 10)),    # rotated 180: red on the right
    (6, (20, 40), (10, 5)),     # rotate 90 clockwise to view: red on top
    (8, (20, 40), (10, 35)),    # rotate 90 counter-clockwise to view: red at the bottom
])
def test_exif_orientation_is_applied(orientation, size, red_at):
    result = ingest_image(images.jpeg_with_exif_orientation(orientation), "phone.jpg")
    assert (result.width, result.height) == size
    assert close(pixel(result, red_at), images.RED, tolerance=40)


BROKEN_EXIF = {
    "garbage after header": b"Exif\x00\x00" + b"\xde\xad\xbe\xef" * 16,
    "bad byte order": b"Exif\x00\x00XX*\x00\x08\x00\x00\x00",
    "ifd offset past end": b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",
    "entry count huge": b"Exif\x00\x00II*\x00\x08\x00\x00\x00\xff\xff",
    "header only": b"Exif\x00\x00",
    # One IFD entry: Orientation (0x0112) stored as the ASCII text "6" instead of a SHORT.
    "orientation as text": b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00"
                           b"\x12\x01\x02\x00\x02\x00\x00\x006\x00\x00\x00\x00\x00\x00\x00",
}


@pytest.mark.parametrize("name", BROKEN_EXIF)
def test_broken_exif_falls_back_to_no_rotation(name):
    result = ingest_image(images.jpeg_with_app1(BROKEN_EXIF[name]), "exif.jpg")
    assert (result.width, result.height) == (32, 24)


@pytest.mark.parametrize("orientation", [0, 9, 1000])
def test_out_of_range_orientation_is_ignored(orientation):
    result = ingest_image(images.jpeg_with_exif_orientation(orientation), "phone.jpg")
    assert (result.width, result.height) == (40, 20)


# --- filenames -----------------------------------------------------------------------------

FILENAMES = [
    ("cat.jpg", "cat.jpg"),
    ("../../etc/passwd", "passwd"),
    ("..\\..\\windows\\win.ini", "win.ini"),
    ("/var/lib/convscope/secret.png", "secret.png"),
    ("C:\\Users\\me\\Desktop\\dog.png", "dog.png"),
    ("<img src=x onerror=alert(1)>.png", "<img src=x onerror=alert(1)>.png"),
    ("a\x00b\r\nc\x1b[31m.png", "ab c[31m.png"),
    ("evil\u202egnp.exe", "evilgnp.exe"),
    ("zero\u200bwidth.png", "zerowidth.png"),
    ("  tabs\tand   spaces .png ", "tabs and spaces .png"),
    (".htaccess", "htaccess"),
    ("..", "image"),
    ("", "image"),
    (None, "image"),
    ("/", "image"),
    ("\x00\x01\x02", "image"),
    ("\ud800.png", "png"),
    ("chat \u732b.png", "chat \u732b.png"),
    ("cafe\u0301.png", "caf\u00e9.png"),
]


@pytest.mark.parametrize("raw, expected", FILENAMES)
def test_safe_display_name(raw, expected):
    assert safe_display_name(raw) == expected


@pytest.mark.parametrize("raw", [
    "x" * 5000 + ".png",
    "y" * 5000,
    "../" * 2000 + "z" * 3000 + ".jpeg",
    "\u732b" * 5000 + ".webp",
    "a." + "b" * 5000,
])
def test_very_long_names_become_short_and_keep_a_short_extension(raw):
    name = safe_display_name(raw)
    assert 1 <= len(name) <= MAX_DISPLAY_NAME_CHARS
    assert "\u2026" in name
    if raw.endswith((".png", ".jpeg", ".webp")):
        assert name.endswith(raw.rsplit(".", 1)[1])


@pytest.mark.parametrize("raw", [raw for raw, _ in FILENAMES if raw] + ["\x7f" * 10])
def test_display_names_never_contain_separators_or_control_characters(raw):
    name = safe_display_name(raw)
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert not any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in name)


def test_ingest_uses_the_safe_display_name():
    data = images.encode(images.noise(), "PNG")
    assert ingest_image(data, "../../x/\x00evil.png").filename == "evil.png"
