"""A job's state: statuses, its items (a visualization job has one per image x method), what
prediction found per image, and ``Job`` itself, which the executor thread writes and HTTP
threads read as snapshots. A job is saved as one JSON record (``Job.to_record``) at every status
change. Kinds without items (an evaluation, a sanity check) report ``fraction`` done and name
their result by ``outcome_key``."""
from __future__ import annotations

import dataclasses
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

from app.errors import ConvscopeError

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
TERMINAL = frozenset({DONE, FAILED, CANCELLED})


class Spec(Protocol):
    """What every kind of job spec offers (``app.jobs.spec.JobSpec`` is the visualization one;
    ``app.jobs.kinds`` lists them all)."""

    kind: str

    def to_dict(self) -> dict[str, Any]: ...

    def item_grid(self) -> tuple[int, int]:
        """(rows, columns) of the job's items: images x methods, or (0, 0) for none."""


def cancel_reason_text(stopping: bool) -> str:
    return ("The server shut down while this job was running; submit it again." if stopping
            else "The job was cancelled.")


def error_dict(error: ConvscopeError | None) -> dict[str, Any] | None:
    return None if error is None else {"code": error.code, "message": error.message}


@dataclass
class JobItem:
    """One image x one method: its status, progress, results (one per target) and error."""

    image_index: int
    method_index: int
    status: str = QUEUED
    progress: float = 0.0
    error: dict[str, Any] | None = None
    result_keys: list[str] = field(default_factory=list)
    elapsed_ms: float = 0.0
    cached: int = 0


@dataclass
class ImageOutcome:
    """What the prediction step found for one image."""

    prediction_key: str
    predicted: int
    predictions: list[dict[str, Any]]
    true_label: dict[str, Any] | None
    failure: bool
    uncertainty: dict[str, Any] | None = None


def process_token() -> str:
    """Identifies this process across pid reuse (pid + its start time from /proc)."""
    pid = os.getpid()
    return f"{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "?"


# The owner of a job run by Celery workers (``app.jobs.broker``): no single process holds it,
# and a lost worker's job is sent again rather than shown as cancelled.
BROKER_OWNER = "broker"


def owner_alive(token: str) -> bool:
    if token == BROKER_OWNER:
        return True
    pid_text, _, started = token.partition(":")
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    if started == "?":
        # No /proc (e.g. macOS): a live process with that pid is the best evidence there is.
        return _pid_exists(pid)
    return _start_time(pid) == started


def _pid_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


class Job:
    """A job's mutable state. The executor thread writes it; HTTP threads read snapshots."""

    def __init__(self, job_id: str, spec: Spec, *, created: float | None = None) -> None:
        self.id = job_id
        self.spec = spec
        self.created = created if created is not None else time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.status = QUEUED
        self.error: dict[str, Any] | None = None
        rows, columns = spec.item_grid()
        self.items = [JobItem(row, column) for row in range(rows) for column in range(columns)]
        self.images: dict[int, ImageOutcome] = {}
        self.fraction = 0.0                     # progress of a kind without items
        self.outcome_key: str | None = None     # its result in the ResultStore
        self.model_runs = 0
        self.cache_hits = 0
        self.owner = process_token()
        self.worker: dict[str, Any] | None = None     # {"host", "pid", "device"} on a worker
        self.deliveries = 0                           # times a worker started it
        self.cancel_event = threading.Event()
        self.lock = threading.RLock()

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def running_worker(self) -> dict[str, Any] | None:
        """The worker running the job now (None while queued, when finished or in-process)."""
        with self.lock:
            return self.worker if self.status == RUNNING else None

    @property
    def progress(self) -> float:
        with self.lock:
            if self.status == DONE:
                return 1.0
            if not self.items:
                return self.fraction
            return sum(item.progress for item in self.items) / len(self.items)

    def item(self, image_index: int, method_index: int) -> JobItem:
        return self.items[image_index * self.spec.item_grid()[1] + method_index]

    def finish(self, status: str, error: ConvscopeError | dict[str, Any] | None = None) -> None:
        with self.lock:
            self.status = status
            self.error = error if isinstance(error, dict) or error is None else error_dict(error)
            self.finished = time.time()
            for item in self.items:
                if item.status in (QUEUED, RUNNING):
                    item.status = CANCELLED if status == CANCELLED else FAILED
                    item.error = item.error or self.error

    def to_record(self) -> dict[str, Any]:
        with self.lock:
            return {"id": self.id, "kind": self.kind, "status": self.status, "error": self.error,
                    "created": self.created, "started": self.started, "finished": self.finished,
                    "progress": self.progress, "model_runs": self.model_runs,
                    "cache_hits": self.cache_hits, "owner": self.owner,
                    "worker": self.worker, "deliveries": self.deliveries,
                    "fraction": self.fraction, "outcome_key": self.outcome_key,
                    "spec": self.spec.to_dict(),
                    "items": [dataclasses.asdict(item) for item in self.items],
                    "images": {str(index): dataclasses.asdict(outcome)
                               for index, outcome in self.images.items()}}

    @classmethod
    def from_record(cls, record: Mapping[str, Any], spec: Spec) -> "Job":
        """The job a record describes; ``spec`` is its parsed spec (``app.jobs.kinds``)."""
        job = cls(record["id"], spec, created=record["created"])
        job.status, job.error = record["status"], record["error"]
        job.started, job.finished = record["started"], record["finished"]
        job.model_runs, job.cache_hits = record["model_runs"], record["cache_hits"]
        job.owner = record.get("owner", "")
        job.worker = record.get("worker")
        job.deliveries = int(record.get("deliveries", 0))
        job.fraction = float(record.get("fraction", 0.0))
        job.outcome_key = record.get("outcome_key")
        job.items = [JobItem(**item) for item in record["items"]]
        job.images = {int(index): ImageOutcome(**outcome)
                      for index, outcome in record["images"].items()}
        return job
