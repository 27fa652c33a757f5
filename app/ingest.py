"""Image ingest: turn untrusted upload bytes into one normalized RGB image, or a clear error.

Every image that enters convscope (web upload, API, CLI) passes through :func:`ingest_image`.
It is pure (no Flask, no disk) and decides everything from the bytes themselves:

1. Size of the body (``max_bytes``), then the format by its magic bytes: PNG, JPEG, WebP, BMP,
   GIF and TIFF are allowed; anything else (SVG, HTML, text, ZIP, executables, PSD, ICO, PDF,
   AVIF, ...) is refused whatever its name or content type says.
2. The header only: width x height against our own pixel limit, which is never above Pillow's
   ``MAX_IMAGE_PIXELS``. Pillow itself merely *warns* between 1x and 2x that limit; here any image
   over the limit is refused before a single pixel is decoded (a 100-byte PNG claiming
   30000x30000 costs nothing). Tiny images and extreme aspect ratios are refused here too.
3. The first frame (animated GIF/WebP/PNG) or first page (TIFF) is decoded, within a memory
   budget shared by concurrent uploads (:class:`app.decode_budget.DecodeBudget`): the decode
   reserves its estimated size first (:func:`decode_cost_bytes`). JPEGs are decoded at a
   reduced scale when they are far larger than ``max_side``; other large images are reduced by
   an integer factor straight after decoding, before any conversion, so no full-size copy is
   ever made.
4. Every colour mode is converted to 8-bit sRGB deliberately (:mod:`app.colour`): an embedded
   ICC profile is applied (Pillow's ImageCms), and then dropped. The image is downscaled to
   ``max_side`` and the EXIF orientation applied (broken EXIF means "no rotation").
5. The result is re-encoded as a PNG of pixels only (IHDR, IDAT, IEND: no ICC profile, text or
   EXIF chunk); its SHA-256 is the image id, so the same file always gets the same id and
   nothing from the original file (metadata, profiles, trailing payloads) survives.

Pillow raises a wide, undocumented set of exceptions on malformed input (OSError, SyntaxError,
ValueError, struct.error, EOFError, IndexError, ...); all of them become ``ImageCorrupt``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import re
import unicodedata
from dataclasses import dataclass, field

from PIL import (BmpImagePlugin, GifImagePlugin, Image, ImageFile, JpegImagePlugin,
                 PngImagePlugin, TiffImagePlugin, WebPImagePlugin)

from app.colour import embedded_profile, expand, high_depth_range, needs_expanding, to_rgb
from app.decode_budget import DecodeBudget
from app.errors import (ImageAspectRatio, ImageCorrupt, ImageEmpty, ImageTooLarge, ImageTooSmall,
                        ImageUnsupported)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# 50 MP admits a 50 MP phone photo (8160 x 6120) and stays well under Pillow's 89 MP warning
# threshold. Pillow holds RGB in 4 bytes a pixel, so decoding one costs about 200 MB: concurrent
# decodes share a budget (app.decode_budget).
DEFAULT_MAX_PIXELS = 50_000_000
# Stored images are downscaled to this longest side: models look at a few hundred pixels, and a
# full-resolution PNG of a phone photo costs seconds to encode and tens of MB to keep.
DEFAULT_MAX_SIDE = 2048
MIN_SIDE_PX = 8
# Beyond 50:1 the "resize shortest side, centre-crop" preprocessing keeps a sliver of the image
# (and resizing a 10000x10 strip to a 256-pixel short side would allocate 256000x256 pixels).
MAX_ASPECT_RATIO = 50.0
MAX_DISPLAY_NAME_CHARS = 100


# Format -> the Pillow class that parses it. The class is called directly (not ``Image.open``)
# so only the sniffed format's parser ever sees the bytes, and so Pillow's own decompression-bomb
# check cannot fire a mere warning before ours refuses the image.
_PARSERS: dict[str, type[ImageFile.ImageFile]] = {
    "PNG": PngImagePlugin.PngImageFile,
    "JPEG": JpegImagePlugin.JpegImageFile,
    "WEBP": WebPImagePlugin.WebPImageFile,
    "BMP": BmpImagePlugin.BmpImageFile,
    "GIF": GifImagePlugin.GifImageFile,
    "TIFF": TiffImagePlugin.TiffImageFile,
}

_TIFF_PREFIXES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_BMP_DIB_HEADER_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclass(frozen=True)
class IngestedImage:
    """A validated upload: 8-bit RGB, upright, first frame, at most ``max_side`` on its long side."""

    image: Image.Image = field(repr=False, compare=False)
    png_bytes: bytes = field(repr=False)
    sha256: str                 # hex digest of png_bytes; the image id
    width: int
    height: int
    filename: str               # safe display name, never a path
    source_format: str          # a key of _PARSERS


def ingest_image(data: bytes, filename: str, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_side: int = DEFAULT_MAX_SIDE,
                 budget: DecodeBudget | None = None) -> IngestedImage:
    """Validate and normalize one uploaded image.

    Raises ``ImageEmpty``, ``ImageTooLarge`` (bytes, or pixels read from the header),
    ``ImageUnsupported`` (not an allowed format by content), ``ImageCorrupt`` (truncated or
    damaged), ``ImageTooSmall`` (a side under ``MIN_SIDE_PX``), ``ImageAspectRatio``, or
    ``Busy`` when ``budget`` stays taken by other decodes for too long.
    """
    display_name = safe_display_name(filename)
    rgb, source_format = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes,
                                      max_side=max_side, budget=budget)
    png_bytes = _encode_png(rgb)
    return IngestedImage(image=rgb, png_bytes=png_bytes,
                         sha256=hashlib.sha256(png_bytes).hexdigest(), width=rgb.width,
                         height=rgb.height, filename=display_name, source_format=source_format)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES, max_side: int = DEFAULT_MAX_SIDE,
                 budget: DecodeBudget | None = None) -> tuple[Image.Image, str]:
    """Every check of :func:`ingest_image` and the normalization to upright 8-bit RGB, without
    the PNG re-encoding: (the image, its source format). Dataset evaluation reads thousands of
    files it never stores, and encoding the PNG costs ~20x the JPEG decode. Raises the same
    errors as ``ingest_image``, and gives the same pixels as its ``image``."""
    source_format = _check_bytes(data, max_bytes)
    return _decode_normalized(data, source_format, max_pixels, max_side, budget), source_format


def header_pixels(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> int:
    """Width x height from the file's header, without decoding; 0 when the header is not
    readable (decoding it then fails with the proper error)."""
    try:
        source_format = _check_bytes(data, max_bytes)
        if source_format == "WEBP":
            canvas = _webp_canvas_size(data)
            return canvas[0] * canvas[1] if canvas else 0
        with _PARSERS[source_format](io.BytesIO(data)) as parsed:
            return parsed.width * parsed.height
    except Exception:  # noqa: BLE001 -- any unreadable header counts as nothing here
        return 0


def _check_bytes(data: bytes, max_bytes: int) -> str:
    if not data:
        raise ImageEmpty()
    if len(data) > max_bytes:
        raise ImageTooLarge(f"The file is {_megabytes(len(data))}; the limit is "
                            f"{_megabytes(max_bytes)}.")
    return sniff_format(data)


def sniff_format(data: bytes) -> str:
    """The allowed format the bytes are, by magic number; ``ImageUnsupported`` otherwise."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data.startswith(_TIFF_PREFIXES):
        return "TIFF"
    # "BM" alone is too weak a signature (any text starting "BM..."): require a known DIB header.
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in _BMP_DIB_HEADER_SIZES:
        return "BMP"
    raise ImageUnsupported("The file is not an image in a supported format "
                           "(PNG, JPEG, WebP, BMP, GIF or TIFF).")


def safe_display_name(name: str | None) -> str:
    """A short, printable name to show for an upload; never used as a path.

    Keeps only the last path component (``../../etc/passwd`` -> ``passwd``), drops control,
    format (bidi overrides, zero-width) and unassigned characters, collapses whitespace, strips
    leading dots and caps the length at ``MAX_DISPLAY_NAME_CHARS`` keeping the extension. HTML
    characters are kept on purpose: the name is user data, escaped wherever it is shown.
    """
    text = unicodedata.normalize("NFC", str(name or ""))
    text = re.split(r"[/\\]", text)[-1]
    kept = []
    for char in text:
        category = unicodedata.category(char)
        if category.startswith("Z") or char.isspace():  # tabs and newlines become spaces
            kept.append(" ")
        elif category not in ("Cc", "Cf", "Cs", "Co", "Cn"):
            kept.append(char)
    text = " ".join("".join(kept).split()).lstrip(". ")
    if not text:
        return "image"
    if len(text) <= MAX_DISPLAY_NAME_CHARS:
        return text
    stem, dot, extension = text.rpartition(".")
    if dot and stem and 0 < len(extension) <= 10 and extension.isalnum():
        extension = "." + extension
    else:
        stem, extension = text, ""
    return stem[:MAX_DISPLAY_NAME_CHARS - len(extension) - 1].rstrip() + "\u2026" + extension


# --- decoding ------------------------------------------------------------------------------------

# Bytes a pixel takes once decoded, by Pillow mode (the modes not listed take 4).
_DECODED_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2,
                            "I;16N": 2}
# Large images are reduced in bands of about this many pixels, so expanding a mode (palette to
# RGB, 16-bit to 8-bit) or premultiplying alpha never makes a full-size copy.
BAND_PIXELS = 2_000_000
# Per pixel of the final (at most max_side) image: its copies through colour conversion and
# compositing onto the background.
_FINAL_BYTES_PER_PIXEL = 16


def decode_cost_bytes(mode: str, width: int, height: int,
                      max_side: int = DEFAULT_MAX_SIDE) -> int:
    """Estimated peak memory to decode and normalize a ``width`` x ``height`` image in ``mode``
    (checked against measured peaks in tests/service/test_ingest_memory.py): the decoded
    pixels; a full-size expanded or premultiplied copy when the image is not reduced, or two
    bands and the reduced image when it is; and the final image's copies."""
    pixels = width * height
    factor = max(1, max(width, height) // max_side)
    cost = pixels * _DECODED_BYTES_PER_PIXEL.get(mode, 4)
    if factor >= 2:
        cost += 2 * BAND_PIXELS * 4 * 2 + -(-width // factor) * -(-height // factor) * 4
    elif needs_expanding(mode) or "A" in mode:
        cost += pixels * 4
    scale = min(1.0, max_side / max(width, height))
    return cost + int(pixels * scale * scale) * _FINAL_BYTES_PER_PIXEL


def _decode_normalized(data: bytes, source_format: str, max_pixels: int, max_side: int,
                       budget: DecodeBudget | None) -> Image.Image:
    """The first frame as an upright 8-bit sRGB image of at most ``max_side``, metadata-free."""
    if source_format == "WEBP" and (canvas := _webp_canvas_size(data)) is not None:
        # Pillow's WebP parser allocates the whole canvas when it opens the file: check the
        # header and reserve the budget before opening it.
        _check_dimensions(*canvas, max_pixels)
        cost = decode_cost_bytes("RGBA", *canvas)
        with budget.reserve(cost) if budget is not None else contextlib.nullcontext():
            return _decode_opened(data, source_format, max_pixels, max_side)
    return _decode_opened(data, source_format, max_pixels, max_side, budget)


def _decode_opened(data: bytes, source_format: str, max_pixels: int, max_side: int,
                   budget: DecodeBudget | None = None) -> Image.Image:
    try:
        parsed = _PARSERS[source_format](io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(_too_many_pixels(max_pixels)) from None
    except Exception as error:  # Pillow's parsers raise many types on malformed headers
        log.debug("header of %s upload rejected: %r", source_format, error)
        raise ImageCorrupt("The image file is damaged or incomplete.") from None
    with parsed:
        _check_dimensions(parsed.width, parsed.height, max_pixels)
        if source_format == "JPEG":
            _request_jpeg_draft(parsed, max_side)
        cost = decode_cost_bytes(parsed.mode, *parsed.size, max_side)
        with budget.reserve(cost) if budget is not None else contextlib.nullcontext():
            # Everything happens while the file is open: closing it frees the decoded pixels,
            # so the full-size image is never copied.
            try:
                parsed.load()  # the first frame/page only: we never seek further
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise ImageTooLarge(_too_many_pixels(max_pixels)) from None
            except MemoryError:
                raise ImageTooLarge("The image is too large to decode.") from None
            except Exception as error:
                log.debug("%s upload failed to decode: %r", source_format, error)
                raise ImageCorrupt("The image file is damaged or incomplete.") from None
            # Read from the parsed file: TIFF keeps orientation in its own tags.
            orientation = _read_orientation(parsed)
            profile = embedded_profile(parsed)
            try:
                image = _reduced(parsed, max_side)
                image = _downscale(image, max_side)
                rgb = to_rgb(image, profile)
                rgb = _apply_exif_orientation(rgb, orientation)
                return _pixels_only(rgb)
            except MemoryError:
                raise ImageTooLarge("The image is too large to decode.") from None


def _too_many_pixels(max_pixels: int) -> str:
    return (f"The image has too many pixels; the limit is "
            f"{_megapixel_text(_pixel_limit(max_pixels))} megapixels.")


def _check_dimensions(width: int, height: int, max_pixels: int) -> None:
    """Refuse from the header alone, before any pixel is decoded."""
    limit = _pixel_limit(max_pixels)
    if width * height > limit:
        shown, limit_shown = megapixels_apart(width * height, limit)
        raise ImageTooLarge(f"The image is {width}\u00d7{height} pixels ({shown} megapixels); "
                            f"the limit is {limit_shown} megapixels.")
    if min(width, height) < MIN_SIDE_PX:
        raise ImageTooSmall(f"The image is {width}\u00d7{height} pixels; each side must be at "
                            f"least {MIN_SIDE_PX} pixels.")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageAspectRatio(f"The image is {width}\u00d7{height} pixels; its long side may be "
                               f"at most {MAX_ASPECT_RATIO:.0f} times its short side, so crop it "
                               f"closer to the subject.")


def _megapixel_text(pixels: int, decimals: int = 1) -> str:
    text = f"{pixels / 1e6:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def megapixels_apart(pixels: int, limit: int) -> tuple[str, str]:
    """Both counts in megapixels, with as many decimals as it takes to tell them apart
    (7072 x 7072 is "50.013184 megapixels", not "50.0", against a limit of "50")."""
    for decimals in range(1, 7):
        shown, limit_shown = _megapixel_text(pixels, decimals), _megapixel_text(limit, decimals)
        if float(shown) > float(limit_shown):
            return shown, limit_shown
    return _megapixel_text(pixels, 6), _megapixel_text(limit, 6)


def _pixel_limit(max_pixels: int) -> int:
    # Never decode what Pillow would only warn about: its warning range becomes our error.
    if Image.MAX_IMAGE_PIXELS is None:
        return max_pixels
    return min(max_pixels, Image.MAX_IMAGE_PIXELS)


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from a WebP header (simple lossy, lossless or extended), if present."""
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return (int.from_bytes(data[26:28], "little") & 0x3FFF,
                int.from_bytes(data[28:30], "little") & 0x3FFF)
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        return (int.from_bytes(data[24:27], "little") + 1,
                int.from_bytes(data[27:30], "little") + 1)
    return None


def _request_jpeg_draft(parsed: ImageFile.ImageFile, max_side: int) -> None:
    """Let libjpeg decode a big JPEG at 1/2, 1/4 or 1/8 scale (still >= max_side): much faster."""
    scale = max_side / max(parsed.width, parsed.height)
    if scale < 0.5:
        parsed.draft(None, (max(1, round(parsed.width * scale)),
                            max(1, round(parsed.height * scale))))


def _read_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8), or 1 when absent, malformed or unreadable."""
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception as error:  # broken EXIF must never fail an upload
        log.debug("ignoring unreadable EXIF: %r", error)
        return 1
    return orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def _apply_exif_orientation(image: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return image.transpose(method) if method is not None else image


def _reduced(image: Image.Image, max_side: int) -> Image.Image:
    """Shrunk by the largest integer factor that keeps the long side at least ``max_side`` (a
    box filter: cheap; LANCZOS makes the exact size afterwards), in a mode that can be averaged
    and resized (see :func:`app.colour.expand`).

    A large image is reduced band by band, each band expanded first where its mode needs it:
    nothing of full size is allocated besides the decoded pixels themselves."""
    factor = max(image.size) // max_side
    if factor < 2:
        return expand(image)
    value_range = high_depth_range(image, BAND_PIXELS)
    width, height = image.size
    rows = factor * max(1, BAND_PIXELS // (width * factor))
    reduced: Image.Image | None = None
    for top in range(0, height, rows):
        band = expand(image.crop((0, top, width, min(height, top + rows))), value_range)
        band = band.reduce(factor)
        if reduced is None:
            reduced = Image.new(band.mode, (-(-width // factor), -(-height // factor)))
        reduced.paste(band, (0, top // factor))
    assert reduced is not None
    return reduced


def _downscale(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def _pixels_only(image: Image.Image) -> Image.Image:
    """A fresh RGB image holding nothing but the pixels: no ``info`` (ICC profile, EXIF, text,
    DPI, gamma) can reach the stored PNG."""
    return Image.frombytes("RGB", image.size, image.tobytes())


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # compress_level 6 is zlib's default trade-off; only pixels are written (see _pixels_only),
    # so equal pixels give equal bytes and therefore equal ids.
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"
