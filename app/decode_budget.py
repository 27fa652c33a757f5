"""A memory budget for decoding uploads, shared by all the requests of one process.

A 143 KB PNG can claim 49 megapixels, which Pillow decodes into about 200 MB; eight of them at
once would add gigabytes. Each decode first reserves its estimated size here and waits while
others hold the budget; past ``wait_s`` the upload is refused with 503 ``E_BUSY`` and a
``Retry-After``, so memory stays bounded instead of swapping. An image larger than the whole
budget still decodes, alone. After a large decode, the freed memory is handed back to the
system (glibc's ``malloc_trim``), or the request threads' allocator arenas would keep it.
"""
from __future__ import annotations

import contextlib
import threading
import time
from typing import Callable, Iterator

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
            if cost >= TRIM_AFTER_BYTES:
                release_free_memory()


# glibc keeps memory freed by a thread in that thread's arena for its next allocations, and
# after the first large free it serves Pillow's 16 MB image blocks from those arenas too: eight
# request threads that each decoded a 49-megapixel image once held 1.3 GB. A decode this large
# or larger gives its freed memory back to the system when it ends.
TRIM_AFTER_BYTES = 32 * 1024 * 1024


def _load_malloc_trim() -> Callable[[], None]:
    """glibc's ``malloc_trim(0)``, or a no-op where the C library has none."""
    import ctypes
    import ctypes.util

    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return lambda: trim(0)


release_free_memory = _load_malloc_trim()
