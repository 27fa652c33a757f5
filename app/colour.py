"""Colour normalization for ingest: any decoded Pillow mode to 8-bit sRGB, on purpose.

Pure functions on Pillow images (no I/O). An embedded ICC profile is applied with Pillow's
ImageCms (littlecms) and never kept: what leaves here is plain sRGB pixels.
"""
from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np
from PIL import Image, ImageCms

from app.errors import ImageCorrupt, ImageUnsupported

log = logging.getLogger(__name__)

# Transparent pixels are composited onto mid-grey: with the usual mean-0.5 (or ImageNet-mean)
# normalization it is close to zero input, i.e. "no evidence", unlike black or white.
NEUTRAL_BACKGROUND = (128, 128, 128)


def embedded_profile(image: Image.Image) -> ImageCms.ImageCmsProfile | None:
    """The file's ICC profile, or None when it has none or it cannot be parsed."""
    data = image.info.get("icc_profile")
    if not data or not isinstance(data, bytes):
        return None
    try:
        return ImageCms.ImageCmsProfile(io.BytesIO(data))
    except Exception as error:  # noqa: BLE001 -- a broken profile means "assume sRGB"
        log.debug("ignoring an unreadable ICC profile: %r", error)
        return None


_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_LAB = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB", 6500))
# The Pillow mode an ICC transform reads for each profile colour space.
_PROFILE_MODES = {"RGB ": ("RGB", "RGBA", "RGBX"), "GRAY": ("L", "LA"), "CMYK": ("CMYK",)}


def _to_srgb(image: Image.Image, profile: ImageCms.ImageCmsProfile | None) -> Image.Image | None:
    """Colour data converted from the embedded profile to sRGB (alpha kept), or None when the
    profile does not apply to this mode (then the pixels are taken as sRGB already)."""
    if profile is None:
        return None
    space = profile.profile.xcolor_space
    if image.mode not in _PROFILE_MODES.get(space, ()):
        log.debug("ignoring a %r ICC profile on a %s image", space, image.mode)
        return None
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    colour = image.convert("L" if image.mode == "LA" else "RGB") if alpha is not None else image
    if colour.mode == "RGBX":
        colour = colour.convert("RGB")
    try:
        converted = ImageCms.applyTransform(colour, _transform(profile, colour.mode, "RGB"))
    except Exception as error:  # noqa: BLE001 -- lcms refuses some profiles: assume sRGB
        log.debug("ignoring an ICC profile lcms cannot use: %r", error)
        return None
    if alpha is not None:
        converted.putalpha(alpha)
    return converted


def _transform(profile: ImageCms.ImageCmsProfile, in_mode: str, out_mode: str) -> Any:
    return ImageCms.buildTransform(profile, _SRGB, in_mode, out_mode,
                                   renderingIntent=ImageCms.Intent.PERCEPTUAL)


# Modes that are expanded before anything else: palette indices and single bits cannot be
# averaged, high bit depths become 8-bit, and Lab's signed channels go to sRGB.
_EXPANDED_MODES = frozenset({"P", "PA", "1", "LAB", "I", "F"})


def needs_expanding(mode: str) -> bool:
    return mode in _EXPANDED_MODES or mode.startswith("I;16")


def expand(image: Image.Image, value_range: tuple[float, float] | None = None) -> Image.Image:
    """The image in a mode whose pixels can be averaged and resized: palette -> RGB (RGBA with
    transparency), 1-bit -> L, I;16/I/F -> 8-bit L (see :func:`_high_depth_to_uint8`), Lab ->
    sRGB; other modes are returned as they are. No ICC profile is applied here."""
    mode = image.mode
    if not needs_expanding(mode):
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        grey = _high_depth_to_uint8(image, value_range or high_depth_range(image))
        return Image.fromarray(grey, mode="L")
    if mode == "LAB":
        return ImageCms.applyTransform(image, _transform(_LAB, "LAB", "RGB"))
    transparent = mode == "PA" or "transparency" in image.info
    return image.convert("RGBA" if transparent else "L" if mode == "1" else "RGB")


def to_rgb(image: Image.Image, profile: ImageCms.ImageCmsProfile | None = None, *,
           value_range: tuple[float, float] | None = None) -> Image.Image:
    """Convert any decoded mode to 8-bit sRGB, deliberately per mode.

    - An embedded ICC profile (RGB, greyscale or CMYK) is applied: the colours become sRGB.
      Lab images are converted from CIE Lab (D65). Without a profile, pixels are taken as sRGB.
    - Alpha (RGBA, LA, PA, P with transparency, premultiplied RGBa/La): composited onto
      ``NEUTRAL_BACKGROUND``.
    - 16-bit greyscale (I;16*): scaled by 255/65535, not clipped as Pillow's ``convert`` does.
    - 32-bit integer (I): treated as 16-bit when it fits 0..65535, else stretched min..max.
    - Float (F): [0, 1] data scaled to 0..255, anything else stretched min..max; NaN/inf -> min.
    - 1-bit, L, P, CMYK without a profile, YCbCr, RGBX: Pillow's conversion.

    ``value_range`` is the whole image's (lowest, highest) finite value when ``image`` is one
    band of a high-depth image (see :func:`high_depth_range`).
    """
    image = expand(image, value_range)
    mode = image.mode
    converted = _to_srgb(image, profile)
    if converted is not None:
        image, mode = converted, converted.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, NEUTRAL_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except ValueError:  # e.g. HSV TIFFs, which Pillow cannot convert to RGB
        raise ImageUnsupported(f"Images in the {mode} colour mode are not supported.") from None


def high_depth_range(image: Image.Image,
                     band_pixels: int = 2_000_000) -> tuple[float, float]:
    """(lowest, highest) finite value of an I;16/I/F image, read a band of rows at a time;
    (0, 0) for other modes. ``ImageCorrupt`` when no value is finite."""
    mode = image.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return 0.0, 0.0
    width, height = image.size
    rows = max(1, band_pixels // max(1, width))
    low, high = float("inf"), float("-inf")
    for top in range(0, height, rows):
        values = np.asarray(image.crop((0, top, width, min(height, top + rows))))
        if values.dtype.kind == "f":
            values = values[np.isfinite(values)]
        if values.size:
            low, high = min(low, float(values.min())), max(high, float(values.max()))
    if low > high:
        raise ImageCorrupt("The image has no valid pixel values.")
    return low, high


def _high_depth_to_uint8(image: Image.Image, value_range: tuple[float, float]) -> np.ndarray:
    """8-bit greyscale from I;16/I/F pixels whose finite values span ``value_range``, converted
    a band of rows at a time (a float64 copy of 49 megapixels would take 400 MB).

    16-bit data keeps its scale (0..65535); I data within 0..65535 and F data within 0..1 too;
    anything else is stretched from the lowest to the highest value. NaN and inf become the
    lowest value."""
    values = np.asarray(image)
    lowest, highest = value_range
    if image.mode.startswith("I;16") or (image.mode == "I" and lowest >= 0 and highest <= 65535):
        low, high = 0.0, 65535.0
    elif image.mode == "F" and lowest >= 0 and highest <= 1:
        low, high = 0.0, 1.0
    else:
        low, high = lowest, highest
    out = np.empty(values.shape, dtype=np.uint8)
    rows = max(1, (1 << 20) // max(1, values.shape[1]))    # ~1M values (8 MB float64) a band
    for start in range(0, values.shape[0], rows):
        band = values[start:start + rows].astype(np.float64)
        if values.dtype.kind == "f":
            band[~np.isfinite(band)] = lowest
        out[start:start + rows] = _scale_to_uint8(band, low, high)
    return out


def _scale_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` (float64, overwritten) from [low, high] to 0..255."""
    span = high - low if high > low else 1.0
    values -= low
    values *= 255.0 / span
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)
