"""A memory budget for decoding uploads, shared by all the requests of one process.

A 143 KB PNG can claim 49 megapixels, which Pillow decodes into about 200 MB; eight of them at
once would add gigabytes. Each decode first reserves its estimated size here and waits while
others hold the budget; past ``wait_s`` the upload is refused with 503 ``E_BUSY`` and a
``Retry-After``, so memory stays bounded instead of swapping. An image larger than the whole
budget still decodes, alone.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

from app.errors import Busy


class DecodeBudget:
    """At most ``total_bytes`` of estimated decoding memory in use at once."""

    def __init__(self, total_bytes: int, *, wait_s: float = 30.0, retry_after_s: int = 5) -> None:
        if total_bytes <= 0:
            raise ValueError("the decode budget must be positive")
        self.total_bytes, self.wait_s, self.retry_after_s = total_bytes, wait_s, retry_after_s
        self._used = 0
        self._condition = threading.Condition()

    @property
    def used_bytes(self) -> int:
        with self._condition:
            return self._used

    @contextlib.contextmanager
    def reserve(self, cost_bytes: int) -> Iterator[None]:
        """Hold ``cost_bytes`` of the budget for the duration of the block."""
        cost = max(0, min(int(cost_bytes), self.total_bytes))
        deadline = time.monotonic() + self.wait_s
        with self._condition:
            while self._used + cost > self.total_bytes:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise Busy("The server is busy decoding other uploads; try again shortly.",
                               headers={"Retry-After": str(self.retry_after_s)})
                self._condition.wait(remaining)
            self._used += cost
        try:
            yield
        finally:
            with self._condition:
                self._used -= cost
                self._condition.notify_all()


# glibc's M_MMAP_THRESHOLD (malloc.h). Blocks at least this large are mapped on their own and
# unmapped when freed. By default glibc raises the threshold (up to 32 MB) after each such free,
# so Pillow's 16 MB image blocks soon come from the per-thread heaps instead, which keep what
# was freed: eight request threads that each decoded a 49-megapixel image once held 1.3 GB.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


def return_large_frees_to_the_os() -> bool:
    """Fix glibc's mmap threshold (process-wide), so freed image buffers leave the process.
    False where the C library is not glibc (nothing to do there)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False
