"""``JobBackend``: what the web layer needs from whatever runs jobs.

The embedded backend is ``app.jobs.executor.Executor`` (one thread per process that owns the
device). A distributed backend implements the same methods; views and the pipeline stay as they
are.
"""
from __future__ import annotations

from typing import Any, Protocol

from app.jobs.record import Job
from app.jobs.spec import JobSpec


class JobBackend(Protocol):
    def start(self) -> None:
        """Begin taking jobs (and scanning the checkpoint directory)."""

    def submit(self, spec: JobSpec) -> Job:
        """Record and enqueue a validated job; raises Busy (503 + Retry-After) when full."""

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job, wherever it runs; returns its current state."""

    def queued(self) -> int:
        """Jobs waiting to run."""

    def workers(self) -> list[dict[str, Any]]:
        """Live workers: ``{"id", "host", "pid", "device", "concurrency", "running": [{"id",
        "kind"}], "seen"}`` each (this process alone for the embedded executor)."""

    def wait_for_catalog(self, timeout: float) -> bool:
        """Whether the checkpoint directory has been scanned (waiting up to ``timeout`` s)."""

    @property
    def ready(self) -> bool:
        """Whether jobs submitted now will run (readiness probe)."""

    @property
    def stopping(self) -> bool:
        """Whether the backend is shutting down."""

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel queued and running jobs with a recorded status, and stop."""
