"""``Executor``: the embedded job backend -- one thread per process that owns the device.

Submitted jobs wait in a bounded queue (``CONVSCOPE_QUEUE_SIZE``; more get 503 ``E_BUSY``);
cancelling a waiting job takes it out at once, freeing its place. Up to ``MAX_ACTIVE`` jobs run
at a time, interleaved fairly: the thread gives each running job one step in turn (a prediction,
or one method for one target; ``app.jobs.visualize``). A step that computes for long (an
occlusion map) offers turns to the other jobs whenever it reports progress, at most every
``TURN_S`` seconds, so a Grad-CAM job submitted behind a long occlusion job finishes in seconds
instead of waiting for it.

HTTP threads only validate, enqueue and read records, and never run a model. Between steps the
thread also rescans the checkpoint directory (a scan loads new files, which HTTP threads must
not do) and keeps the data directory within its time-to-live and quota (``app.retention``).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

from app.decode_budget import release_free_memory
from app.errors import Busy, Cancelled
from app.jobs.record import CANCELLED, QUEUED, RUNNING, Job
from app.jobs.spec import JobSpec
from app.jobs.kinds import make_run
from app.jobs.running import finish_job, start_job
from app.retention import Retention

if TYPE_CHECKING:
    from app.jobs.resources import JobResources

log = logging.getLogger(__name__)


@dataclass
class _Running:
    job: Job
    steps: Iterator[None]


class Executor:
    """One thread that owns the device and runs jobs from a bounded queue, interleaved."""

    CATALOG_REFRESH_S = 1.5
    MAX_ACTIVE = 4          # jobs interleaved at once; the rest wait in the queue, in order
    TURN_S = 0.5            # a long step lets the other running jobs take a turn this often

    def __init__(self, services: "JobResources") -> None:
        self.services = services
        self.settings = services.settings
        self.catalog = services.catalog
        self.jobs = services.jobs
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()         # submitted, not started
        self._running: deque[_Running] = deque()    # started; the next to take a turn first
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._catalog_ready = threading.Event()
        self._in_nested_turns = False
        self._last_turns = time.monotonic()
        self._last_refresh = 0.0
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
        """Cancel waiting and running jobs (recording why) and stop the thread."""
        if self._stopping.is_set():
            return
        with self._lock:
            self._stopping.set()
            self._waiting.clear()
            self._lock.notify_all()
        # Every job of this process, not only the queue's: a submit that raced with this call
        # may have recorded its job after the queue was emptied.
        for job in self.jobs.live_jobs():
            job.cancel_event.set()          # a running job ends at its next check, recorded
            with job.lock:
                if job.terminal or job.status == RUNNING:
                    continue
                job.finish(CANCELLED, Cancelled("The server shut down before this job "
                                                "started; submit it again."))
            self.jobs.save(job)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # the HTTP side

    def submit(self, spec: JobSpec) -> Job:
        """Record and enqueue a validated job; a full queue raises Busy (503 + Retry-After)."""
        if self._stopping.is_set() or not self.alive:
            raise Busy("The server is shutting down; try again shortly.",
                       headers={"Retry-After": str(self.settings.retry_after_s)})
        job = Job(self.jobs.new_id(), spec)
        with self._lock:
            if len(self._waiting) >= self.settings.queue_size:
                raise Busy(f"The job queue is full ({self.settings.queue_size} jobs waiting); "
                           "try again shortly.",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
            for image_id in spec.images:
                self.services.images.touch(image_id)     # in use: evicted last
            self.jobs.add(job)        # recorded before the thread can take it
            self._waiting.append(job)
            self._lock.notify_all()
        if self._stopping.is_set():     # shutdown began meanwhile: its sweep may have missed it
            with job.lock:
                if job.status == QUEUED:
                    job.finish(CANCELLED, Cancelled("The server shut down before this job "
                                                    "started; submit it again."))
            self.jobs.save(job)
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: at once when waiting here (its place in the queue is freed), promptly
        when running here, and through a marker file when another server process (gunicorn
        worker) owns it."""
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
            self._unqueue(job)
        return job

    def queued(self) -> int:
        with self._lock:
            return len(self._waiting)

    def workers(self) -> list[dict[str, Any]]:
        """This process is the one worker: its device and the jobs it runs."""
        running = [{"id": r.job.id, "kind": r.job.kind} for r in list(self._running)]
        return [{"id": "in-process", "host": socket.gethostname(), "pid": os.getpid(),
                 "device": str(getattr(self.catalog, "device", "cpu")), "concurrency": 1,
                 "running": running, "seen": time.time()}]

    def _unqueue(self, job: Job) -> None:
        """A job cancelled before it started: out of the queue and out of memory, recorded."""
        with self._lock:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass            # the thread took it meanwhile; start_job will skip it
        self.jobs.save(job)
        self.jobs.forget(job)

    # the executor thread

    def _loop(self) -> None:
        self._scan_catalog()
        while True:
            with self._lock:
                if not self._waiting and not self._running:
                    if self._stopping.is_set():
                        break
                    self._lock.wait(self.CATALOG_REFRESH_S)
            self._pick_up_cancel_requests()
            self._admit()
            if self._running:
                self._take_turn(self._running.popleft())
            self._between_steps()

    def _admit(self) -> None:
        """Start waiting jobs, in order, while fewer than MAX_ACTIVE run."""
        while len(self._running) < self.MAX_ACTIVE:
            with self._lock:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            running = self._start(job)
            if running is not None:
                self._running.append(running)

    def _start(self, job: Job) -> _Running | None:
        try:
            if not start_job(self.services, job):
                self.jobs.forget(job)
                return None
        except Exception:  # noqa: BLE001 -- e.g. the job record cannot be saved (disk full)
            log.exception("job %s could not be recorded", job.id[:8])
            self.jobs.forget(job)
            return None
        run = make_run(self.services, job, stopping=self._stopping.is_set,
                       offer_turn=self._offer_turns)
        return _Running(job, run.steps())

    def _take_turn(self, running: _Running) -> None:
        """One step of ``running``; then it goes to the back of the line, or is recorded as
        finished."""
        if not self._in_nested_turns:
            self._last_turns = time.monotonic()
        try:
            next(running.steps)
        except StopIteration:
            self._finish(running, None)
        except Exception as error:  # noqa: BLE001 -- recorded by finish_job
            self._finish(running, error)
        else:
            self._running.append(running)
        finally:
            # A step's batch buffers (hundreds of MB for SmoothGrad or integrated gradients)
            # are free now; without this glibc keeps them in its arenas and the worker's
            # resident memory only ever grows. Costs about a millisecond.
            release_free_memory()

    def _finish(self, running: _Running, error: BaseException | None) -> None:
        try:
            finish_job(self.services, running.job, error, stopping=self._stopping.is_set)
        except Exception:  # noqa: BLE001 -- e.g. the job record cannot be saved (disk full)
            log.exception("job %s could not be recorded", running.job.id[:8])
        finally:
            self.jobs.forget(running.job)

    def _offer_turns(self) -> None:
        """Called by a long step when it reports progress: every TURN_S, give each other
        running job (and newly admitted ones) one step, right here, then go on. Nested steps
        never offer turns themselves."""
        if self._in_nested_turns or time.monotonic() - self._last_turns < self.TURN_S:
            return
        import torch

        self._in_nested_turns = True
        try:
            self._pick_up_cancel_requests()
            self._admit()
            # The offering step may run under inference mode; the others need gradients.
            with torch.inference_mode(False), torch.enable_grad():
                for _ in range(len(self._running)):
                    self._take_turn(self._running.popleft())
        finally:
            self._in_nested_turns = False
            self._last_turns = time.monotonic()

    def _pick_up_cancel_requests(self) -> None:
        """Waiting jobs cancelled through another server process leave the queue now, not when
        their turn would come."""
        with self._lock:
            cancelled = [job for job in self._waiting if self.jobs.cancel_requested(job)]
        for job in cancelled:
            with job.lock:
                if job.status != QUEUED:
                    continue
                job.cancel_event.set()
                job.finish(CANCELLED, Cancelled("The job was cancelled before it started."))
            self.jobs.clear_cancel_request(job)
            self._unqueue(job)

    def _between_steps(self) -> None:
        now = time.monotonic()
        if now - self._last_refresh >= self.CATALOG_REFRESH_S:
            self._last_refresh = now
            self._refresh_catalog()
        self._maintain_store()

    def _maintain_store(self) -> None:
        """Time-to-live and quota (app.retention), here between steps: a pass lists whole
        store directories, which HTTP threads must not do. Images of live jobs are kept."""
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
                self._last_refresh = time.monotonic()
                return
            except Exception:  # noqa: BLE001 -- keep retrying; /ready says 503 meanwhile
                log.exception("scanning the checkpoint directory failed; retrying")
                self._stopping.wait(2.0)
