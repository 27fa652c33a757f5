"""``convscope worker [DIR]``: a Celery worker that owns one device and runs convscope jobs.

Start one per GPU (``--device cuda:N``), on any number of machines that share the data
directory and reach the same Redis (``CONVSCOPE_BROKER_URL``). Each loads checkpoints lazily
through the same catalog and runs every kind of job through the same ``app.jobs.running`` code
as the embedded executor. The pool is ``solo`` (CUDA is not fork-safe) unless ``--concurrency``
asks for threads.

Beside the task, a housekeeping thread every ``HEARTBEAT_S`` seconds:

* announces the worker and renews the claims of the jobs it runs (``app.jobs.broker``);
* sends again the jobs whose worker died (claim expired) -- so a SIGKILLed worker's job goes
  to another worker within seconds, not after Redis's visibility timeout;
* after Redis restarted empty, sends again every unfinished job recorded in the data directory;
* rescans the checkpoint directory and publishes the listing for the web processes;
* keeps the data directory within its time-to-live and quota (one worker at a time).
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from app.decode_budget import release_free_memory
from app.errors import ConvscopeError, NotFound, ResultExpired, WorkerLost
from app.jobs.broker import (EXPIRY_S, HEARTBEAT_S, PREFIX, JobClaims, WorkerRegistry,
                             redis_client, redis_errors)
from app.jobs.celery_app import QUEUE, TASK_NAME, make_celery
from app.jobs.record import BROKER_OWNER, FAILED, RUNNING
from app.jobs.running import run_job
from app.published_catalog import publish_catalog
from app.retention import Retention

if TYPE_CHECKING:
    from celery import Celery

    from app.services import Services

log = logging.getLogger(__name__)

MAX_DELIVERIES = 3          # starts lost with their worker before a job fails E_WORKER_LOST
STARTED_KEY = PREFIX + "started"    # absent: Redis is new or restarted empty


class Worker:
    """One worker process: runs the tasks Celery hands it, and keeps house beside them."""

    def __init__(self, services: "Services", celery: "Celery", concurrency: int = 1) -> None:
        self.services = services
        self.settings = services.settings
        self.celery = celery
        self.concurrency = concurrency
        self.host = socket.gethostname()
        self.id = f"{self.host}:{os.getpid()}"
        self.redis = redis_client(self.settings.broker_url)
        self.registry = WorkerRegistry(self.redis)
        self.claims = JobClaims(self.redis)
        self.retention = Retention.from_settings(self.settings, images=services.images,
                                                 results=services.results, jobs=services.jobs)
        self.stopping = threading.Event()
        self._running: dict[str, Any] = {}      # job id -> Job, while this worker runs it
        self._lock = threading.Lock()
        self._requeue_at: float | None = None   # when to send unfinished jobs again
        self._published: list[Any] | None = None   # the catalog entries last written
        self._thread: threading.Thread | None = None

    def describe(self) -> dict[str, Any]:
        with self._lock:
            running = [{"id": job.id, "kind": job.kind} for job in self._running.values()]
        return {"id": self.id, "host": self.host, "pid": os.getpid(),
                "device": str(self.services.device), "concurrency": self.concurrency,
                "running": running, "seen": time.time()}

    # --- the task ------------------------------------------------------------------------

    def run(self, job_id: str) -> None:
        """Run one delivered job, unless another worker runs it or it has ended."""
        if not isinstance(job_id, str):
            return
        try:
            claimed = self.claims.claim(job_id, self.id)
        except redis_errors():
            # Redis flickered: run the job rather than lose it (results are idempotent by
            # content address). A task must never raise a connection error: Celery's solo
            # consumer then stops taking tasks after a Redis restart.
            claimed = True
        if not claimed:
            log.info("job %s is run by another worker; this delivery is dropped", job_id[:8])
            return
        try:
            job = self._take(job_id)
            if job is None:
                return
            with self._lock:
                self._running[job.id] = job
            try:
                run_job(self.services, job, stopping=self.stopping.is_set,
                        after_step=release_free_memory)
            finally:
                with self._lock:
                    self._running.pop(job.id, None)
                self.services.jobs.forget(job)
                release_free_memory()
        finally:
            self._wait_for_redis()
            try:
                self.claims.release(job_id, self.id)
            except redis_errors():
                pass            # Redis went again: the claim expires by itself

    def _wait_for_redis(self) -> None:
        """Return from a task only while Redis answers: Celery acknowledges the task then, and
        a failed acknowledgement leaves its solo consumer taking no more tasks after Redis is
        back (measured with Celery 5.7 and kombu's Redis transport)."""
        warned = False
        while not self.stopping.is_set():
            try:
                self.redis.ping()
                return
            except redis_errors():
                if not warned:
                    log.warning("Redis unreachable: the job's end is acknowledged once it is "
                                "back")
                    warned = True
                self.stopping.wait(1.0)

    def _take(self, job_id: str) -> Any:
        """The job to run now, recorded as this worker's; None when there is nothing to run."""
        jobs = self.services.jobs
        try:
            job = jobs.get(job_id)
        except (NotFound, ResultExpired):
            log.warning("job %s has no record in the data directory; dropped", job_id[:8])
            return None
        if job.terminal:
            jobs.clear_cancel_request(job)
            return None
        if job.status == RUNNING and job.deliveries >= MAX_DELIVERIES:
            # Every start so far ended with its worker (this claim proves none runs it now).
            job.finish(FAILED, WorkerLost(f"The job was started {job.deliveries} times and its "
                                          "worker was lost each time (killed, or out of "
                                          "memory); it was given up."))
            jobs.save(job)
            return None
        job.deliveries += 1
        job.worker = {"host": self.host, "pid": os.getpid(),
                      "device": str(self.services.device)}
        jobs.add(job)           # live here, saved with this worker's name
        return job

    # --- housekeeping --------------------------------------------------------------------

    def start(self) -> None:
        self._tick()
        self._thread = threading.Thread(target=self._housekeeping, daemon=True,
                                        name="convscope-worker-housekeeping")
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.registry.withdraw(self.id)
        except redis_errors():
            pass

    def _housekeeping(self) -> None:
        while not self.stopping.wait(HEARTBEAT_S):
            self._tick()

    def _tick(self) -> None:
        for chore in (self._heartbeat, self._resend_lost_jobs, self._resend_after_restart,
                      self._publish_catalog, self._maintain_store):
            try:
                chore()
            except redis_errors() as error:
                log.warning("Redis unreachable (%s); retrying", type(error).__name__)
                return
            except Exception:  # noqa: BLE001 -- the next tick tries again
                log.exception("worker housekeeping (%s) failed", chore.__name__)

    def _heartbeat(self) -> None:
        self.registry.announce(self.describe())
        with self._lock:
            running = list(self._running)
        for job_id in running:
            self.claims.renew(job_id, self.id)

    def _resend_lost_jobs(self) -> None:
        for job_id in self.claims.orphans():
            log.warning("job %s lost its worker; sending it again", job_id[:8])
            self._send(job_id)

    def _resend_after_restart(self) -> None:
        """Redis restarted empty (no persistence), or is new: its queue is gone, the records
        are not. One worker sends every unfinished job again, after the running workers have
        had time to renew their claims (so jobs still running are not started twice)."""
        if self.redis.set(STARTED_KEY, self.id, nx=True):
            self._requeue_at = time.monotonic() + EXPIRY_S
            log.info("Redis is empty: unfinished jobs are sent again in %d s", EXPIRY_S)
        if self._requeue_at is None or time.monotonic() < self._requeue_at:
            return
        self._requeue_at = None
        sent = 0
        for job_id in self.services.jobs.unfinished_ids(BROKER_OWNER):
            if not self.redis.exists(JobClaims.key(job_id)):
                self._send(job_id)
                sent += 1
        if sent:
            log.warning("sent %d unfinished jobs again after a Redis restart", sent)

    def _send(self, job_id: str) -> None:
        self.celery.send_task(TASK_NAME, args=[job_id], queue=QUEUE)

    def _publish_catalog(self) -> None:
        """Rescan; write the listing only when an entry came, went or changed, not every tick
        (entries are frozen and keep their metadata objects between scans: comparing is cheap,
        serializing hundreds of class names per checkpoint is not)."""
        catalog = self.services.catalog
        catalog.refresh()
        entries = catalog.entries()
        if entries != self._published:
            publish_catalog(entries, self.settings.data_dir)
            self._published = entries

    def _maintain_store(self) -> None:
        if not self.retention.due():
            return
        if not self.redis.set(PREFIX + "retention", self.id, nx=True, ex=300):
            return              # another worker is at it
        try:
            with self._lock:
                needed = {image for job in self._running.values() for image in job.spec.images}
            self.retention.maybe_run(needed)
        finally:
            self.redis.delete(PREFIX + "retention")


def build_worker(settings_overrides: dict[str, Any], concurrency: int = 1) -> Worker:
    """Settings (``CONVSCOPE_BROKER_URL`` required), services on the worker's device, the
    Celery app with the task registered, and the worker (housekeeping not started)."""
    from app.errors import ConfigInvalid
    from app.services import build_services
    from app.settings import load_settings

    settings = load_settings(settings_overrides)
    if not settings.broker_url:
        raise ConfigInvalid("convscope worker needs CONVSCOPE_BROKER_URL (redis://host:6379/0), "
                            "the same as the web processes'.",
                            fields={"CONVSCOPE_BROKER_URL": "a redis:// URL"})
    services = build_services(settings)
    celery = make_celery(settings)
    worker = Worker(services, celery, concurrency)

    @celery.task(name=TASK_NAME, ignore_result=True)
    def run_job_task(job_id: str) -> None:
        worker.run(job_id)

    return worker


def worker_command(args: argparse.Namespace) -> int:
    from app.serve import settings_from_args

    if args.concurrency < 1:
        log.error("--concurrency must be at least 1.")
        return 2
    try:
        worker = build_worker(settings_from_args(args), args.concurrency)
        worker.start()          # its first tick scans and publishes, before taking jobs
    except ConvscopeError as error:
        log.error("%s", error.message)
        return 2
    pool = ["--pool=solo", "--concurrency=1"] if args.concurrency == 1 else \
        ["--pool=threads", f"--concurrency={args.concurrency}"]
    log.info("convscope worker %s on %s, taking jobs from %s", worker.id,
             worker.services.device, QUEUE)
    try:
        node = f"convscope-{os.getpid()}@{worker.host}"
        worker.celery.worker_main(["worker", *pool, "-Q", QUEUE, "-n", node, "--without-gossip",
                                   "--without-mingle", "--without-heartbeat",
                                   f"--loglevel={args.loglevel}"])
    finally:
        worker.stop()
    return 0
