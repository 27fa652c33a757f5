"""Property-based fuzzing of image ingest: damaged valid files and random bytes.

The property: ``ingest_image`` either returns a well-formed ``IngestedImage`` or raises a
``ConvscopeError`` subclass. Any other exception, or a hang, is a bug (it would be a 500 or a
stuck HTTP thread). Bounded for the default suite (~20 s); for a long run:

    CONVSCOPE_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest tests/service/test_ingest_fuzz.py

Checkpoint loading is fuzzed beside the adapters (tests/adapters/), which own loading.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.errors import ConvscopeError
from app.ingest import ingest_image
from tests.service import images

EXAMPLES = int(os.environ.get("CONVSCOPE_FUZZ_EXAMPLES", "1500"))
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=2000,           # ms per example: a parser loop or a huge allocation shows up here
    database=None,           # nothing written into the working tree
    derandomize=not os.environ.get("CONVSCOPE_FUZZ_EXAMPLES"),  # reproducible unless asked
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _seeds() -> dict[str, bytes]:
    seeds = {f"{fmt}": data for fmt, data in images.every_format(images.noise((40, 32))).items()}
    seeds["GIF-animated"] = images.animated_gif(6, size=(24, 24))
    seeds["PNG-animated"] = images.animated("PNG", size=(24, 24))
    seeds["WEBP-animated"] = images.animated("WEBP", size=(24, 24))
    seeds["TIFF-multipage"] = images.multipage_tiff(size=(24, 24))
    seeds["JPEG-exif"] = images.jpeg_with_exif_orientation(6)
    seeds["PNG-16bit"] = images.png_16bit_grey(np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
                                               * 250)
    seeds["TIFF-lzw"] = images.encode(images.noise((32, 32), seed=1), "TIFF",
                                      compression="tiff_lzw")
    seeds["TIFF-jpeg"] = images.encode(images.noise((32, 32), seed=2), "TIFF",
                                       compression="jpeg")
    seeds["WEBP-lossless"] = images.encode(images.noise((32, 32), seed=3), "WEBP", lossless=True)
    seeds["JPEG-progressive"] = images.encode(images.noise((32, 32), seed=4), "JPEG",
                                              progressive=True)
    return seeds


SEEDS = _seeds()


@st.composite
def corrupted(draw, seed: bytes) -> bytes:
    """A valid file after a few random edits: truncate, flip, overwrite, insert, delete, repeat."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        edit = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "delete",
                                     "repeat", "max_out"]))
        if edit == "truncate":
            del data[position:]
        elif edit == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif edit == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            data[position:position + len(chunk)] = chunk
        elif edit == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        elif edit == "delete":
            del data[position:position + draw(st.integers(1, 64))]
        elif edit == "repeat":
            span = bytes(data[position:position + draw(st.integers(1, 256))])
            data[position:position] = span * draw(st.integers(1, 8))
        else:  # sizes, counts and offsets at their maximum are a classic parser trap
            width = draw(st.sampled_from([2, 4]))
            data[position:position + width] = b"\xff" * width
    return bytes(data)


def check_outcome(data: bytes) -> str:
    """The fuzz property, plus the invariants of an accepted image; returns the outcome."""
    with warnings.catch_warnings():
        # Pillow warns about e.g. corrupt EXIF; ingest must cope either way.
        warnings.simplefilter("ignore")
        try:
            result = ingest_image(data, "fuzz.png", max_pixels=4_000_000)
        except ConvscopeError as error:
            assert error.code.startswith("E_IMAGE_"), error
            assert "Traceback" not in error.message and "/work" not in error.message
            return "refused"
    assert result.image.mode == "RGB"
    assert (result.width, result.height) == result.image.size
    assert 8 <= min(result.image.size) and result.width * result.height <= 4_000_000
    assert result.sha256 == hashlib.sha256(result.png_bytes).hexdigest()
    assert Image.open(io.BytesIO(result.png_bytes)).size == result.image.size
    return "accepted"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed_name", sorted(SEEDS))
def test_corrupted_valid_images_never_crash_or_hang(seed_name):
    outcomes = {"accepted": 0, "refused": 0}

    @FUZZ_SETTINGS
    @given(data=corrupted(SEEDS[seed_name]))
    def run(data: bytes) -> None:
        outcomes[check_outcome(data)] += 1

    run()
    if EXAMPLES >= 500:  # the fuzzer must reach both sides, or it is not exploring
        assert outcomes["accepted"] > 0 and outcomes["refused"] > 0, outcomes


@pytest.mark.timeout(300)
@FUZZ_SETTINGS
@given(prefix=st.sampled_from([b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a",
                               b"RIFF\x00\x01\x00\x00WEBPVP8 ", b"II*\x00", b"MM\x00*",
                               b"BM" + b"\x00" * 12 + b"\x28\x00\x00\x00"]),
       body=st.binary(max_size=2048))
def test_random_bytes_behind_every_signature_never_crash_or_hang(prefix, body):
    check_outcome(prefix + body)
