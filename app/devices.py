"""Which device the models run on, and how many CPU threads torch may use."""
from __future__ import annotations

import logging
import os
import re

import torch

from app.errors import DeviceUnavailable

log = logging.getLogger(__name__)

_CUDA_SPEC = re.compile(r"cuda(?::(\d+))?")


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises DeviceUnavailable for an unknown spec or a CUDA device this machine does not have,
    so a bad ``--device`` fails at start-up rather than on the first request.
    """
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_SPEC.fullmatch(text)
    if match is None:
        raise DeviceUnavailable(f"Unknown device {spec[:40]!r}; use auto, cpu, cuda or cuda:N.",
                                fields={"device": "auto, cpu, cuda or cuda:N"})
    if not torch.cuda.is_available():
        raise DeviceUnavailable("CUDA was requested but no CUDA device is available.")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise DeviceUnavailable(f"CUDA device {index} does not exist; this machine has "
                                f"{torch.cuda.device_count()}.")
    return torch.device("cuda", index)


def configure_threads() -> int | None:
    """Apply ``CONVSCOPE_TORCH_THREADS`` (a positive integer) to torch; return it, or None."""
    value = os.environ.get("CONVSCOPE_TORCH_THREADS", "").strip()
    if not value:
        return None
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        log.warning("Ignoring CONVSCOPE_TORCH_THREADS=%r: not a positive integer.", value[:20])
        return None
    torch.set_num_threads(threads)
    return threads
