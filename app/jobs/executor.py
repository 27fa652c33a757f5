"""``Executor``: the embedded job backend -- one thread per process that owns the device.

It takes jobs from a bounded queue and runs them one at a time (``app.jobs.visualize``); HTTP
threads only validate, enqueue and read records, and never run a model. Between jobs it rescans
the checkpoint directory (a scan loads new files, which HTTP threads must not do) and keeps the
data directory within its time-to-live and quota (``app.retention``).
"""
from __future__ import annotations

import logging
import queue
import threading
from typing import TYPE_CHECKING

from app.errors import Busy, Cancelled
from app.jobs.record import CANCELLED, QUEUED, RUNNING, Job
from app.jobs.spec import JobSpec
from app.jobs.visualize import run_job
from app.retention import Retention

if TYPE_CHECKING:
    from app.services import Services

log = logging.getLogger(__name__)


class Executor:
    """One thread that owns the device and runs jobs, one at a time, from a bounded queue.

    Between jobs it also rescans the checkpoint directory, so a new checkpoint (a training run
    writing ``epoch_12.pt``) is listed within seconds while HTTP threads only read the listing.
    """

    CATALOG_REFRESH_S = 1.5

    def __init__(self, services: "Services") -> None:
        self.services = services
        self.settings = services.settings
        self.catalog = services.catalog
        self.jobs = services.jobs
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=self.settings.queue_size)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._catalog_ready = threading.Event()
        self._current: Job | None = None
        self.retention = Retention.from_settings(self.settings, images=services.images,
                                                 results=services.results, jobs=self.jobs)

    # lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="convscope-executor", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ready(self) -> bool:
        return self.alive and self._catalog_ready.is_set() and not self._stopping.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wait_for_catalog(self, timeout: float) -> bool:
        """Whether this thread's first scan of the checkpoint directory is done (waiting up to
        ``timeout`` seconds). HTTP threads wait here instead of scanning, which loads models."""
        return self._catalog_ready.wait(timeout)

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel queued and running jobs (recording why) and stop the thread."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        while True:             # empty the queue, so the stop sentinel fits
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        # Every job of this process, not only those just taken from the queue: a submit that
        # raced with this call may have enqueued after the queue was emptied.
        current = self._current
        for job in self.jobs.live_jobs():
            job.cancel_event.set()          # a running job ends at its next check, recorded
            if job is current:
                continue
            with job.lock:
                if job.terminal or job.status == RUNNING:
                    continue
                job.finish(CANCELLED, Cancelled("The server shut down before this job "
                                                "started; submit it again."))
            self.jobs.save(job)
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # the HTTP side

    def submit(self, spec: JobSpec) -> Job:
        """Record and enqueue a validated job; a full queue raises Busy (503 + Retry-After)."""
        if self._stopping.is_set() or not self.alive:
            raise Busy("The server is shutting down; try again shortly.",
                       headers={"Retry-After": str(self.settings.retry_after_s)})
        job = Job(self.jobs.new_id(), spec)
        for image_id in spec.images:
            self.services.images.touch(image_id)     # in use: evicted last
        self.jobs.add(job)        # recorded first: the executor may pick it up at once
        try:
            self._queue.put_nowait(job.id)
        except queue.Full:
            self.jobs.discard(job)
            raise Busy(f"The job queue is full ({self.settings.queue_size} jobs waiting); try "
                       "again shortly.",
                       headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        if self._stopping.is_set():     # shutdown began meanwhile: its sweep may have missed it
            with job.lock:
                if job.status == QUEUED:
                    job.finish(CANCELLED, Cancelled("The server shut down before this job "
                                                    "started; submit it again."))
            self.jobs.save(job)
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: at once when queued here, promptly when running here, and through a
        marker file when another server process (gunicorn worker) owns it."""
        job = self.jobs.get(job_id)
        if self.jobs.live(job.id) is None and not job.terminal:
            self.jobs.request_cancel(job.id)
            return job
        with job.lock:
            if job.terminal:
                return job
            job.cancel_event.set()
            if job.status == QUEUED:
                job.finish(CANCELLED, Cancelled("The job was cancelled before it started."))
        if job.status == CANCELLED:
            self.jobs.save(job)
        return job

    def queued(self) -> int:
        return self._queue.qsize()

    # the executor thread

    def _loop(self) -> None:
        self._scan_catalog()
        while True:
            try:
                job_id = self._queue.get(timeout=self.CATALOG_REFRESH_S)
            except queue.Empty:
                if self._stopping.is_set():
                    break
                self._refresh_catalog()
                self._maintain_store()
                continue
            if job_id is None:
                break
            job = self.jobs.live(job_id)
            if job is None or job.terminal:
                continue
            # Current before the stopping check: a shutdown either sees this job as current
            # (and cancels it) or has already set stopping (and _JobRun stops at its first check).
            self._current = job
            try:
                self._run(job)
            except Exception:  # noqa: BLE001 -- e.g. the job record cannot be saved (disk full)
                log.exception("job %s could not be recorded", job.id[:8])
            finally:
                self._current = None
                self.jobs.forget(job)
            self._refresh_catalog()
            self._maintain_store()

    def _maintain_store(self) -> None:
        """Time-to-live and quota (app.retention), here between jobs: a pass lists whole
        store directories, which HTTP threads must not do. Images of queued jobs are kept."""
        if self._stopping.is_set() or not self.retention.due():
            return
        needed = {image_id for job in self.jobs.live_jobs() if not job.terminal
                  for image_id in job.spec.images}
        self.retention.maybe_run(needed)

    def _refresh_catalog(self) -> None:
        """Rescan the checkpoint directory here, in the device thread: a scan loads new files
        (a forward pass), which HTTP threads must not do."""
        if self._stopping.is_set():
            return
        try:
            self.catalog.refresh()
        except Exception:  # noqa: BLE001 -- the next refresh tries again
            log.exception("rescanning the checkpoint directory failed")

    def _scan_catalog(self) -> None:
        while not self._stopping.is_set():
            try:
                self.catalog.entries()
                self._catalog_ready.set()
                return
            except Exception:  # noqa: BLE001 -- keep retrying; /ready says 503 meanwhile
                log.exception("scanning the checkpoint directory failed; retrying")
                self._stopping.wait(2.0)

    def _run(self, job: Job) -> None:
        run_job(self.services, job, stopping=self._stopping.is_set)
