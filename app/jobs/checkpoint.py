"""Where a running job meets the other server processes, the same for every kind of job: it
saves its record (so they see its progress) and picks up a cancel asked through any of them."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

from app.errors import Cancelled
from app.jobs.record import Job, cancel_reason_text

if TYPE_CHECKING:
    from app.jobs.resources import JobResources


class JobCheckpoint:
    """One running job's checkpoint; ``stopping`` says whether the server is shutting down."""

    INTERVAL_S = 1.0        # the job record is written at most this often

    def __init__(self, services: "JobResources", job: Job,
                 stopping: Callable[[], bool]) -> None:
        self.services = services
        self.job = job
        self.stopping = stopping
        self._last = time.monotonic()

    def sync(self, force: bool = False) -> None:
        """At most every ``INTERVAL_S`` (now, with ``force``): save the job and set its cancel
        event when a cancel was asked through any server process."""
        now = time.monotonic()
        if not force and now - self._last < self.INTERVAL_S:
            return
        self._last = now
        if self.services.jobs.cancel_requested(self.job):
            self.job.cancel_event.set()
        self.services.jobs.save(self.job)

    def raise_if_cancelled(self, force: bool = False) -> None:
        """``sync``, then end the run with ``Cancelled`` when a cancel or a shutdown asked."""
        self.sync(force)
        if self.stopping():
            self.job.cancel_event.set()
        if self.job.cancel_event.is_set():
            raise Cancelled(cancel_reason_text(self.stopping()))
