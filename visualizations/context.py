"""What a running method may use besides its inputs (progress, cancellation, batch size).

A module of its own so the helpers in ``batching`` and ``common`` can name it without importing
``base``, which imports them."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from app.errors import Cancelled


@dataclass
class RunContext:
    """What a running method may use besides its inputs: progress reporting, cancellation, and
    the batch size for perturbation/step batches (``None``: the method decides)."""

    progress: Callable[[float], None] | None = None
    cancel_event: threading.Event | None = None
    batch_size: int | None = None

    def report(self, fraction: float) -> None:
        if self.progress is not None:
            self.progress(min(1.0, max(0.0, float(fraction))))

    def check_cancelled(self) -> None:
        if self.cancel_event is not None and self.cancel_event.is_set():
            raise Cancelled("The visualization was cancelled.")
