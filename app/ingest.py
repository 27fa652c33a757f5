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
3. The first frame (animated GIF/WebP/PNG) or first page (TIFF) is decoded, every colour mode is
   converted to 8-bit RGB deliberately (see :func:`_to_rgb`), the EXIF orientation is applied
   (broken EXIF means "no rotation", never a crash), and the image is downscaled to ``max_side``.
4. The result is re-encoded as PNG; its SHA-256 is the image id, so the same upload always gets
   the same id and nothing from the original file (metadata, trailing payloads) survives.

Pillow raises a wide, undocumented set of exceptions on malformed input (OSError, SyntaxError,
ValueError, struct.error, EOFError, IndexError, ...); all of them become ``ImageCorrupt``.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np
from PIL import (BmpImagePlugin, GifImagePlugin, Image, ImageFile, JpegImagePlugin,
                 PngImagePlugin, TiffImagePlugin, WebPImagePlugin)

from app.errors import (ImageAspectRatio, ImageCorrupt, ImageEmpty, ImageTooLarge, ImageTooSmall,
                        ImageUnsupported)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 32 * 1024 * 1024
# 50 MP admits a 50 MP phone photo (8160 x 6120) and stays well under Pillow's 89 MP warning
# threshold; decoding one costs ~150 MB of RGB, so it is also the per-upload memory bound.
DEFAULT_MAX_PIXELS = 50_000_000
# Stored images are downscaled to this longest side: models look at a few hundred pixels, and a
# full-resolution PNG of a phone photo costs seconds to encode and tens of MB to keep.
DEFAULT_MAX_SIDE = 2048
MIN_SIDE_PX = 8
# Beyond 50:1 the "resize shortest side, centre-crop" preprocessing keeps a sliver of the image
# (and resizing a 10000x10 strip to a 256-pixel short side would allocate 256000x256 pixels).
MAX_ASPECT_RATIO = 50.0
MAX_DISPLAY_NAME_CHARS = 100

# Transparent pixels are composited onto mid-grey: with the usual mean-0.5 (or ImageNet-mean)
# normalization it is close to zero input, i.e. "no evidence", unlike black or white.
NEUTRAL_BACKGROUND = (128, 128, 128)

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
                 max_bytes: int = DEFAULT_MAX_BYTES,
                 max_side: int = DEFAULT_MAX_SIDE) -> IngestedImage:
    """Validate and normalize one uploaded image.

    Raises ``ImageEmpty``, ``ImageTooLarge`` (bytes, or pixels read from the header),
    ``ImageUnsupported`` (not an allowed format by content), ``ImageCorrupt`` (truncated or
    damaged), ``ImageTooSmall`` (a side under ``MIN_SIDE_PX``) or ``ImageAspectRatio``.
    """
    display_name = safe_display_name(filename)
    rgb, source_format = decode_image(data, max_pixels=max_pixels, max_bytes=max_bytes,
                                      max_side=max_side)
    png_bytes = _encode_png(rgb)
    return IngestedImage(image=rgb, png_bytes=png_bytes,
                         sha256=hashlib.sha256(png_bytes).hexdigest(), width=rgb.width,
                         height=rgb.height, filename=display_name, source_format=source_format)


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_bytes: int = DEFAULT_MAX_BYTES,
                 max_side: int = DEFAULT_MAX_SIDE) -> tuple[Image.Image, str]:
    """Steps 1-3 of :func:`ingest_image` -- every check and the normalization to upright 8-bit
    RGB -- without the PNG re-encoding: (the image, its source format). Dataset evaluation reads
    thousands of files it never stores, and encoding the PNG costs ~20x the JPEG decode. Raises
    the same errors as ``ingest_image``, and gives the same pixels as its ``image``."""
    if not data:
        raise ImageEmpty()
    if len(data) > max_bytes:
        raise ImageTooLarge(f"The file is {_megabytes(len(data))}; the limit is "
                            f"{_megabytes(max_bytes)}.")
    source_format = sniff_format(data)
    if source_format == "WEBP" and (canvas := _webp_canvas_size(data)) is not None:
        # Pillow's WebP parser allocates the whole canvas when it opens the file: check first.
        _check_dimensions(*canvas, max_pixels)
    image, orientation = _decode_first_frame(data, source_format, max_pixels, max_side)
    image = _apply_exif_orientation(image, orientation)
    return _downscale(_to_rgb(image), max_side), source_format


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

def _decode_first_frame(data: bytes, source_format: str, max_pixels: int,
                        max_side: int) -> tuple[Image.Image, int]:
    """The first frame, detached from the file, and its EXIF orientation."""
    try:
        parsed = _PARSERS[source_format](io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLarge(f"The image has too many pixels; the limit is "
                            f"{_pixel_limit(max_pixels) / 1e6:.0f} megapixels.") from None
    except Exception as error:  # Pillow's parsers raise many types on malformed headers
        log.debug("header of %s upload rejected: %r", source_format, error)
        raise ImageCorrupt("The image file is damaged or incomplete.") from None
    with parsed:
        _check_dimensions(parsed.width, parsed.height, max_pixels)
        if source_format == "JPEG":
            _request_jpeg_draft(parsed, max_side)
        try:
            parsed.load()  # the first frame/page only: we never seek further
            # Detach from the file: everything after this point works on pixels in memory.
            frame = parsed.copy()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageTooLarge(f"The image has too many pixels; the limit is "
                                f"{_pixel_limit(max_pixels) / 1e6:.0f} megapixels.") from None
        except MemoryError:
            raise ImageTooLarge("The image is too large to decode.") from None
        except Exception as error:
            log.debug("%s upload failed to decode: %r", source_format, error)
            raise ImageCorrupt("The image file is damaged or incomplete.") from None
        # Read from the parsed file, not the copy: TIFF keeps orientation in its own tags.
        return frame, _read_orientation(parsed)


def _check_dimensions(width: int, height: int, max_pixels: int) -> None:
    """Refuse from the header alone, before any pixel is decoded."""
    limit = _pixel_limit(max_pixels)
    if width * height > limit:
        raise ImageTooLarge(f"The image is {width}\u00d7{height} pixels "
                            f"({width * height / 1e6:.1f} megapixels); the limit is "
                            f"{limit / 1e6:.0f} megapixels.")
    if min(width, height) < MIN_SIDE_PX:
        raise ImageTooSmall(f"The image is {width}\u00d7{height} pixels; each side must be at "
                            f"least {MIN_SIDE_PX} pixels.")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageAspectRatio(f"The image is {width}\u00d7{height} pixels; its long side may be "
                               f"at most {MAX_ASPECT_RATIO:.0f} times its short side, so crop it "
                               f"closer to the subject.")


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


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB, deliberately per mode.

    - Alpha (RGBA, LA, PA, P with transparency, premultiplied RGBa/La): composited onto
      ``NEUTRAL_BACKGROUND``.
    - 16-bit greyscale (I;16*): scaled by 255/65535, not clipped as Pillow's ``convert`` does.
    - 32-bit integer (I): treated as 16-bit when it fits 0..65535, else stretched min..max.
    - Float (F): [0, 1] data scaled to 0..255, anything else stretched min..max; NaN/inf -> min.
    - 1-bit, L, P, CMYK, YCbCr, RGBX: Pillow's conversion (colour profiles are not applied).
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        return Image.fromarray(_high_depth_to_uint8(image), mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, NEUTRAL_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:  # e.g. LAB or HSV TIFFs, which Pillow cannot convert to RGB
        raise ImageUnsupported(f"Images in the {mode} colour mode are not supported.") from None


def _high_depth_to_uint8(image: Image.Image) -> np.ndarray:
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        return _scale_to_uint8(values, 0.0, 65535.0)
    finite = np.isfinite(values)
    if not finite.any():
        raise ImageCorrupt("The image has no valid pixel values.")
    low, high = float(values[finite].min()), float(values[finite].max())
    values = np.where(finite, values, low)
    if image.mode == "I" and low >= 0 and high <= 65535:
        return _scale_to_uint8(values, 0.0, 65535.0)
    if image.mode == "F" and low >= 0 and high <= 1:
        return _scale_to_uint8(values, 0.0, 1.0)
    return _scale_to_uint8(values, low, high)


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    span = high - low if high > low else 1.0
    scaled = (values - low) * (255.0 / span)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _downscale(image: Image.Image, max_side: int) -> Image.Image:
    if max(image.size) <= max_side:
        return image
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    # compress_level 6 is zlib's default trade-off; no metadata is written, so equal pixels give
    # equal bytes and therefore equal ids.
    image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB"
