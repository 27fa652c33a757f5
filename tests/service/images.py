"""Builders for valid, hostile and unusual image bytes used by the ingest tests.

Some files are written by hand (PNG chunks, headers patched to claim huge sizes) because Pillow
refuses to produce them, which is exactly why they make good test input.
"""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

RED = (255, 0, 0)
BLUE = (0, 0, 255)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def solid(size: tuple[int, int] = (32, 24), colour=RED, mode: str = "RGB") -> Image.Image:
    return Image.new(mode, size, colour)


def noise(size: tuple[int, int] = (48, 40), seed: int = 0) -> Image.Image:
    """A deterministic colour image that does not compress to nothing."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def every_format(image: Image.Image | None = None) -> dict[str, bytes]:
    image = image if image is not None else noise()
    return {"PNG": encode(image, "PNG"), "JPEG": encode(image, "JPEG", quality=90),
            "WEBP": encode(image, "WEBP", quality=90), "BMP": encode(image, "BMP"),
            "GIF": encode(image, "GIF"), "TIFF": encode(image, "TIFF")}


# --- hand-written PNGs ---------------------------------------------------------------------

def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None,
            extra_chunks: bytes = b"") -> bytes:
    """A PNG with the given IHDR; ``rows`` are unfiltered scanlines (a 0 filter byte is added).
    ``rows=None`` writes a tiny IDAT regardless of the claimed size (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    if rows is None:
        idat = zlib.compress(b"\x00" * 64)
    else:
        row_bytes = len(rows) // height
        idat = zlib.compress(b"".join(b"\x00" + rows[i * row_bytes:(i + 1) * row_bytes]
                                      for i in range(height)))
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra_chunks
            + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b""))


def png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose header claims ``width`` x ``height`` RGB pixels."""
    return raw_png(width, height, 8, 2, None)


def png_16bit_grey(values: np.ndarray) -> bytes:
    height, width = values.shape
    return raw_png(width, height, 16, 0, values.astype(">u2").tobytes())


def png_16bit_rgb(values: np.ndarray) -> bytes:
    height, width, _ = values.shape
    return raw_png(width, height, 16, 2, values.astype(">u2").tobytes())


# --- other formats claiming huge sizes -----------------------------------------------------

def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(solid((16, 16)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A valid small baseline JPEG whose SOF0 segment is patched to claim another size."""
    data = bytearray(encode(solid((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def bmp_claiming(width: int, height: int) -> bytes:
    data = bytearray(encode(solid((16, 16)), "BMP"))
    data[18:26] = struct.pack("<ii", width, height)
    return bytes(data)


def tiff_claiming(width: int, height: int) -> bytes:
    image = solid((16, 16))
    data = encode(image, "TIFF")
    # Rewrite the ImageWidth (256) and ImageLength (257) entries in the first IFD.
    buffer = bytearray(data)
    ifd = struct.unpack("<I", buffer[4:8])[0]
    count = struct.unpack("<H", buffer[ifd:ifd + 2])[0]
    for index in range(count):
        entry = ifd + 2 + 12 * index
        tag = struct.unpack("<H", buffer[entry:entry + 2])[0]
        if tag in (256, 257):
            value = width if tag == 256 else height
            buffer[entry + 2:entry + 12] = struct.pack("<HII", 4, 1, value)
    return bytes(buffer)


def webp_claiming(width: int, height: int) -> bytes:
    """An extended (VP8X) WebP header with a huge canvas and no image data worth decoding."""
    vp8x = struct.pack("<I", 0) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(
        3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


# --- colour modes, animation, EXIF ---------------------------------------------------------

def animated_gif(frames: int, first=RED, rest=BLUE, size=(32, 32)) -> bytes:
    images = [solid(size, first)] + [solid(size, rest if i % 2 else (0, 255, 0))
                                     for i in range(frames - 1)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=20,
                  loop=0)


def animated(fmt: str, first=RED, rest=BLUE, size=(32, 32)) -> bytes:
    return encode(solid(size, first), fmt, save_all=True,
                  append_images=[solid(size, rest), solid(size, rest)], duration=50)


def multipage_tiff(first=RED, rest=BLUE, size=(32, 32)) -> bytes:
    return encode(solid(size, first), "TIFF", save_all=True, append_images=[solid(size, rest)])


def jpeg_with_exif_orientation(orientation, size=(40, 20)) -> bytes:
    """Left half red, right half blue, with an EXIF orientation tag."""
    image = solid(size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1]))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def jpeg_with_app1(payload: bytes, size=(32, 24)) -> bytes:
    """A JPEG with a raw APP1 segment inserted after SOI (e.g. broken EXIF)."""
    data = encode(solid(size), "JPEG")
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + segment + data[2:]


def rgba_png(pixels: list[tuple[int, int, int, int]]) -> bytes:
    image = Image.new("RGBA", (len(pixels) * 8, 8))
    for index, colour in enumerate(pixels):
        image.paste(colour, (index * 8, 0, index * 8 + 8, 8))
    return encode(image, "PNG")


def palette_png_with_transparency() -> bytes:
    """Palette image: left half index 0 (fully transparent), right half index 1 (opaque red)."""
    image = Image.new("P", (16, 8), 0)
    image.putpalette([0, 255, 0] + list(RED) + [0, 0, 0] * 254)
    image.paste(1, (8, 0, 16, 8))
    return encode(image, "PNG", transparency=0)


# --- colour profiles and ancillary data ------------------------------------------------------

def srgb_profile_with_red_and_blue_swapped() -> bytes:
    """littlecms's sRGB profile with the red and blue colorant tags pointing at each other's
    data: an image tagged with it means blue by what its red channel says (and the other way
    round), so a converter that applies it turns pure red into sRGB blue."""
    from PIL import ImageCms

    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", profile[128:132])[0]
    entries = {bytes(profile[132 + 12 * i:136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    profile[red + 4:red + 12], profile[blue + 4:blue + 12] = (profile[blue + 4:blue + 12],
                                                              profile[red + 4:red + 12])
    return bytes(profile)


def png_chunk_types(data: bytes) -> list[bytes]:
    """The chunk types of a PNG, in order."""
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    types, offset = [], 8
    while offset < len(data):
        length = struct.unpack(">I", data[offset:offset + 4])[0]
        types.append(data[offset + 4:offset + 8])
        offset += 12 + length
    return types


def lab_tiff(size=(48, 40), seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, size[0], dtype=np.uint8)    # lightness left to right
    return encode(Image.frombytes("LAB", size, pixels.tobytes()), "TIFF")
