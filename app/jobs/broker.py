"""Jobs on Celery workers over Redis (``CONVSCOPE_BROKER_URL``): what web processes and
``convscope worker`` processes share there.

Redis holds only what must be shared and may be lost: the task queue (Celery's), which workers
are alive (``WorkerRegistry``, keys that expire) and which worker runs which job
(``JobClaims``). Job records, images and results stay in the shared data directory, so a Redis
restart loses no job: a worker that finds Redis empty sends every unfinished job again
(``app.worker``), and a job whose worker died (its claim expired) is sent again within seconds,
however long Redis's visibility timeout is.

``BrokerBackend`` is the web side: it validates nothing itself (the views did), records the job
and enqueues its id; it never loads a model.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from app.errors import BrokerUnavailable, Busy, Cancelled
from app.jobs.celery_app import QUEUE, SOCKET_TIMEOUT_S, TASK_NAME, make_celery
from app.jobs.record import BROKER_OWNER, CANCELLED, QUEUED, Job
from app.jobs.spec import JobSpec

if TYPE_CHECKING:
    import redis

    from app.jobs.resources import JobResources

log = logging.getLogger(__name__)

PREFIX = "convscope:"
HEARTBEAT_S = 2.0           # workers announce themselves and refresh their claims this often
EXPIRY_S = 6                # ... and are taken for dead after this long without it
RUNNING_SET = PREFIX + "running"      # ids of jobs a worker has claimed


def redis_client(url: str) -> "redis.Redis":
    import redis

    return redis.Redis.from_url(url, socket_timeout=SOCKET_TIMEOUT_S,
                                socket_connect_timeout=SOCKET_TIMEOUT_S,
                                health_check_interval=30, decode_responses=True)


def redis_errors() -> tuple[type[BaseException], ...]:
    import redis

    return (redis.RedisError, OSError)


class WorkerRegistry:
    """Live workers: each one's description under a key that expires unless renewed."""

    def __init__(self, client: "redis.Redis") -> None:
        self.redis = client

    def announce(self, description: dict[str, Any]) -> None:
        self.redis.set(PREFIX + "worker:" + description["id"], json.dumps(description),
                       ex=EXPIRY_S)

    def withdraw(self, worker_id: str) -> None:
        self.redis.delete(PREFIX + "worker:" + worker_id)

    def live(self) -> list[dict[str, Any]]:
        keys = sorted(self.redis.scan_iter(match=PREFIX + "worker:*", count=100))
        found = []
        for text in (self.redis.mget(keys) if keys else []):
            if text:
                found.append(json.loads(text))
        return found


class JobClaims:
    """Which worker runs which job: a key per job that the running worker keeps renewing. A
    second delivery of a claimed job is dropped; a claim that expires marks a lost worker."""

    def __init__(self, client: "redis.Redis") -> None:
        self.redis = client

    @staticmethod
    def key(job_id: str) -> str:
        return PREFIX + "claim:" + job_id

    def claim(self, job_id: str, worker_id: str) -> bool:
        if not self.redis.set(self.key(job_id), worker_id, nx=True, ex=EXPIRY_S):
            return False
        self.redis.sadd(RUNNING_SET, job_id)
        return True

    def renew(self, job_id: str, worker_id: str) -> None:
        """Keep this worker's claim alive; after a Redis restart, take it back unless another
        worker has claimed the job meanwhile."""
        key = self.key(job_id)
        if self.redis.set(key, worker_id, nx=True, ex=EXPIRY_S) or \
                self.redis.get(key) == worker_id:
            self.redis.expire(key, EXPIRY_S)
            self.redis.sadd(RUNNING_SET, job_id)

    def release(self, job_id: str, worker_id: str) -> None:
        self.redis.srem(RUNNING_SET, job_id)
        if self.redis.get(self.key(job_id)) == worker_id:
            self.redis.delete(self.key(job_id))

    def orphans(self) -> list[str]:
        """Jobs claimed by a worker that stopped renewing its claim (killed, or cut off), each
        returned to one caller only (the one whose removal from the running set succeeded)."""
        lost = []
        for job_id in self.redis.smembers(RUNNING_SET):
            if not self.redis.exists(self.key(job_id)) and self.redis.srem(RUNNING_SET, job_id):
                lost.append(job_id)
        return lost


class BrokerBackend:
    """``JobBackend`` for a web process whose jobs run on ``convscope worker`` processes."""

    PING_CACHE_S = 1.0

    def __init__(self, services: "JobResources") -> None:
        self.services = services
        self.settings = services.settings
        self.jobs = services.jobs
        self.celery = make_celery(self.settings)
        self.redis = redis_client(self.settings.broker_url)
        self.registry = WorkerRegistry(self.redis)
        self._stopping = threading.Event()
        self._ping_lock = threading.Lock()
        self._ping: tuple[float, bool] = (0.0, False)

    def start(self) -> None:
        """Nothing runs here: workers take the jobs."""

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Jobs belong to the workers and outlive this process; only stop taking new ones."""
        self._stopping.set()

    def _unavailable(self) -> BrokerUnavailable:
        return BrokerUnavailable(headers={"Retry-After": str(self.settings.retry_after_s)})

    def _reachable(self) -> bool:
        """Whether Redis answers (cached for a second: probes and pages ask often)."""
        with self._ping_lock:
            checked, answer = self._ping
            if time.monotonic() - checked < self.PING_CACHE_S:
                return answer
            try:
                answer = bool(self.redis.ping())
            except redis_errors():
                answer = False
            self._ping = (time.monotonic(), answer)
            return answer

    def submit(self, spec: JobSpec) -> Job:
        """Record the job in the data directory, then enqueue its id; a full queue raises Busy,
        an unreachable Redis BrokerUnavailable (the record is removed again: nothing half-made
        stays behind)."""
        retry_after = {"Retry-After": str(self.settings.retry_after_s)}
        if self._stopping.is_set():
            raise Busy("The server is shutting down; try again shortly.", headers=retry_after)
        try:
            waiting = self.redis.llen(QUEUE)
        except redis_errors():
            raise self._unavailable() from None
        if waiting >= self.settings.queue_size:
            raise Busy(f"The job queue is full ({self.settings.queue_size} jobs waiting); "
                       "try again shortly.", headers=retry_after)
        job = Job(self.jobs.new_id(), spec)
        job.owner = BROKER_OWNER
        for image_id in spec.images:
            self.services.images.touch(image_id)         # in use: evicted last
        self.jobs.add(job)
        try:
            self.celery.send_task(TASK_NAME, args=[job.id], queue=QUEUE)
        except Exception:  # noqa: BLE001 -- kombu raises several types for a lost connection
            log.warning("could not enqueue job %s: Redis unreachable", job.id[:8])
            self.jobs.discard(job)
            raise self._unavailable() from None
        # The worker writes the record from now on; this process reads it from disk.
        self.jobs.forget(job)
        return job

    def cancel(self, job_id: str) -> Job:
        """A queued job is cancelled in its record (the worker that takes it skips it); a
        running one through the cancel marker, which its worker reads at least every second."""
        job = self.jobs.get(job_id)
        if job.terminal:
            return job
        self.jobs.request_cancel(job.id)
        with job.lock:
            if job.status == QUEUED:
                job.finish(CANCELLED, Cancelled("The job was cancelled before it started."))
        if job.status == CANCELLED:
            self.jobs.save(job)
        return job

    def queued(self) -> int:
        try:
            return int(self.redis.llen(QUEUE))
        except redis_errors():
            return 0

    def wait_for_catalog(self, timeout: float) -> bool:
        """Whether a worker has published the checkpoint listing (``app.published_catalog``)."""
        return self.services.catalog.wait(timeout)

    def workers(self) -> list[dict[str, Any]]:
        try:
            return self.registry.live()
        except redis_errors():
            return []

    @property
    def ready(self) -> bool:
        """Jobs submitted now will run: Redis answers, a worker has published the checkpoint
        listing and at least one worker is alive."""
        return (not self._stopping.is_set() and self._reachable()
                and self.services.catalog.wait(0) and bool(self.workers()))
