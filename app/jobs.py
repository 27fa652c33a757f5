"""Jobs: what a job asks for (``JobSpec``), its record on disk, and the one Executor that runs it.

A job is checked completely when it is submitted (``app.views.job_requests``), so the queue only
ever holds work that can run. One ``Executor`` thread per app owns the
device: it takes jobs from a bounded queue and runs one (image x method) item at a time, each
target answered from the ``ResultStore`` when it was computed before, else computed, rendered
and stored. HTTP threads only validate, enqueue and read records; they never run a model.

Job records are JSON files (``jobs/<id>.json``) written atomically at every status change, so a
restarted server still shows finished jobs; a job that was queued or running in a process that
is gone is shown as cancelled ("the server stopped").
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from app.errors import (BadParameter, Busy, Cancelled, ConvscopeError, Internal, NotFound,
                        ResultExpired, UnknownModel)
from app.stores import (DirectoryIndex, ImageStore, ResultStore, Tombstones,
                        atomic_write_bytes, atomic_write_json, canonical_json, result_key)

if TYPE_CHECKING:
    from PIL import Image

    from app.retention import Retention
    from app.settings import Settings
    from model_adapters.base import LoadedModel, ModelMeta

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
TERMINAL = frozenset({DONE, FAILED, CANCELLED})
PREDICTED = "predicted"
_JOB_ID = re.compile(r"[0-9a-f]{32}")


# --- the request -------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodRequest:
    """One visualization of a job with its parameters resolved for the model (concrete values,
    so an explicit value and the AUTO default that resolves to it share cache entries)."""

    name: str
    params: Mapping[str, Any]
    cost: int

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": dict(self.params), "cost": self.cost}


@dataclass(frozen=True)
class JobSpec:
    """A validated job: everything the executor needs, nothing it has to check again."""

    model_id: str
    model_file: str
    checkpoint_sha256: str
    meta_fingerprint: str
    images: tuple[str, ...]
    filenames: tuple[str, ...]
    methods: tuple[MethodRequest, ...]
    targets: tuple[int | str, ...]            # PREDICTED or a class index
    true_labels: Mapping[str, int]            # image id -> class index

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_file": self.model_file,
                "checkpoint_sha256": self.checkpoint_sha256,
                "meta_fingerprint": self.meta_fingerprint, "images": list(self.images),
                "filenames": list(self.filenames),
                "methods": [method.to_dict() for method in self.methods],
                "targets": list(self.targets), "true_labels": dict(self.true_labels)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "JobSpec":
        return cls(model_id=data["model_id"], model_file=data["model_file"],
                   checkpoint_sha256=data["checkpoint_sha256"],
                   meta_fingerprint=data["meta_fingerprint"], images=tuple(data["images"]),
                   filenames=tuple(data["filenames"]),
                   methods=tuple(MethodRequest(m["name"], m["params"], m["cost"])
                                 for m in data["methods"]),
                   targets=tuple(data["targets"]), true_labels=dict(data["true_labels"]))


def target_spec(meta: "ModelMeta", raw: Any) -> int | str:
    """One requested target as a job keeps it: PREDICTED (it differs per image) or a checked
    class index, from an index or a label. Shared by job requests and ``convscope visualize``."""
    from visualizations.base import is_predicted

    if is_predicted(raw):
        return PREDICTED
    if not isinstance(raw, (int, str)) or isinstance(raw, bool):
        raise BadParameter("A target must be \"predicted\", a class index or a class label.",
                           fields={"targets": "\"predicted\", a class index or a label"})
    return meta.class_index(raw)


def meta_fingerprint(meta: "ModelMeta") -> str:
    """What besides the weights changes a result: preprocessing and labels (convscope.toml)."""
    facts = {"architecture": meta.architecture, "input_size": list(meta.input_size),
             "channels": meta.channels, "mean": list(meta.mean), "std": list(meta.std),
             "resize": meta.resize, "classes": list(meta.class_names), "adapter": meta.adapter}
    return hashlib.sha256(canonical_json(facts).encode()).hexdigest()[:16]


# --- the record --------------------------------------------------------------------------------

def _error_dict(error: ConvscopeError | None) -> dict[str, Any] | None:
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


def _process_token() -> str:
    """Identifies this process across pid reuse (pid + its start time from /proc)."""
    pid = os.getpid()
    return f"{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return "?"


def _owner_alive(token: str) -> bool:
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

    def __init__(self, job_id: str, spec: JobSpec, *, created: float | None = None) -> None:
        self.id = job_id
        self.spec = spec
        self.created = created if created is not None else time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.status = QUEUED
        self.error: dict[str, Any] | None = None
        self.items = [JobItem(i, m) for i in range(len(spec.images))
                      for m in range(len(spec.methods))]
        self.images: dict[int, ImageOutcome] = {}
        self.model_runs = 0
        self.cache_hits = 0
        self.owner = _process_token()
        self.cancel_event = threading.Event()
        self.lock = threading.RLock()

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def progress(self) -> float:
        with self.lock:
            if self.status == DONE:
                return 1.0
            if not self.items:
                return 0.0
            return sum(item.progress for item in self.items) / len(self.items)

    def item(self, image_index: int, method_index: int) -> JobItem:
        return self.items[image_index * len(self.spec.methods) + method_index]

    def finish(self, status: str, error: ConvscopeError | dict[str, Any] | None = None) -> None:
        with self.lock:
            self.status = status
            self.error = error if isinstance(error, dict) or error is None else _error_dict(error)
            self.finished = time.time()
            for item in self.items:
                if item.status in (QUEUED, RUNNING):
                    item.status = CANCELLED if status == CANCELLED else FAILED
                    item.error = item.error or self.error

    def to_record(self) -> dict[str, Any]:
        with self.lock:
            return {"id": self.id, "status": self.status, "error": self.error,
                    "created": self.created, "started": self.started, "finished": self.finished,
                    "progress": self.progress, "model_runs": self.model_runs,
                    "cache_hits": self.cache_hits, "owner": self.owner,
                    "spec": self.spec.to_dict(),
                    "items": [dataclasses.asdict(item) for item in self.items],
                    "images": {str(index): dataclasses.asdict(outcome)
                               for index, outcome in self.images.items()}}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> "Job":
        job = cls(record["id"], JobSpec.from_dict(record["spec"]), created=record["created"])
        job.status, job.error = record["status"], record["error"]
        job.started, job.finished = record["started"], record["finished"]
        job.model_runs, job.cache_hits = record["model_runs"], record["cache_hits"]
        job.owner = record.get("owner", "")
        job.items = [JobItem(**item) for item in record["items"]]
        job.images = {int(index): ImageOutcome(**outcome)
                      for index, outcome in record["images"].items()}
        return job


class JobStore:
    """Live jobs of this process in memory; every job also as ``<id>.json`` on disk."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tombstones = Tombstones(self.root, _JOB_ID)
        # Records of jobs that are not live here (finished, or run by another server process).
        self._records = DirectoryIndex(self.root, ".json", is_dir=False, id_pattern=_JOB_ID)
        self._live: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()    # snapshot + write in order, newest last

    @staticmethod
    def new_id() -> str:
        return secrets.token_hex(16)

    def add(self, job: Job) -> None:
        with self._lock:
            self._live[job.id] = job
        self.save(job)
        self._records.add(job.id, self.root / f"{job.id}.json")

    def save(self, job: Job) -> None:
        with self._save_lock:
            atomic_write_json(self.root / f"{job.id}.json", job.to_record())

    def discard(self, job: Job) -> None:
        """Undo ``add`` for a job that was never accepted."""
        self.forget(job)
        self._records.discard(job.id)
        (self.root / f"{job.id}.json").unlink(missing_ok=True)

    def live(self, job_id: str) -> Job | None:
        with self._lock:
            return self._live.get(job_id)

    def request_cancel(self, job_id: str) -> None:
        """Ask the process that runs a job to cancel it (it checks while the job runs)."""
        atomic_write_bytes(self.root / f"{job_id}.cancel", b"")

    def cancel_requested(self, job: Job) -> bool:
        return (self.root / f"{job.id}.cancel").exists()   # job.id comes from new_id()

    def clear_cancel_request(self, job: Job) -> None:
        (self.root / f"{job.id}.cancel").unlink(missing_ok=True)

    def forget(self, job: Job) -> None:
        """Finished jobs are read from disk from now on; memory stays bounded."""
        with self._lock:
            self._live.pop(job.id, None)

    def live_jobs(self) -> list[Job]:
        with self._lock:
            return list(self._live.values())

    def expire(self, older_than: float) -> int:
        """Delete job records (and cancel markers) last written before ``older_than`` (Unix
        time) that no job of this process holds, leaving tombstones; returns how many records.
        A running job is saved at least every few seconds, so it is never this old."""
        removed = 0
        with os.scandir(self.root) as entries:
            old = [entry for entry in entries if not entry.name.startswith(".")
                   and entry.is_file(follow_symlinks=False)
                   and entry.stat(follow_symlinks=False).st_mtime < older_than]
        for entry in old:
            job_id, _, suffix = entry.name.partition(".")
            if not _JOB_ID.fullmatch(job_id) or self.live(job_id) is not None:
                continue
            if suffix == "json":
                self.tombstones.add(job_id)
                removed += 1
            try:
                os.unlink(entry.path)
            except OSError:
                pass
        return removed

    def get(self, job_id: str) -> Job:
        """The job with this id: live, or read from its record (not found -> NotFound)."""
        job = self.live(job_id) if isinstance(job_id, str) else None
        if job is not None:
            return job
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise NotFound("There is no job with this id.")
        path = self._records.lookup(job_id)
        if path is None:
            if job_id in self.tombstones:
                raise ResultExpired("This job has expired and was removed; submit it again.")
            raise NotFound("There is no job with this id.")
        try:
            job = Job.from_record(json.loads(path.read_text("utf-8")))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("job record %s is unreadable", job_id)
            raise NotFound("There is no job with this id.") from None
        if not job.terminal and not _owner_alive(job.owner):
            job.finish(CANCELLED, Cancelled("The server stopped before this job finished; "
                                            "submit it again."))
            self.save(job)
        return job


# --- the executor ------------------------------------------------------------------------------

class Executor:
    """One thread that owns the device and runs jobs, one at a time, from a bounded queue.

    Between jobs it also rescans the checkpoint directory, so a new checkpoint (a training run
    writing ``epoch_12.pt``) is listed within seconds while HTTP threads only read the listing.
    """

    CATALOG_REFRESH_S = 1.5

    def __init__(self, *, catalog: Any, images: ImageStore, results: ResultStore,
                 jobs: JobStore, settings: "Settings", visualizations: Any) -> None:
        self.catalog = catalog
        self.images = images
        self.results = results
        self.jobs = jobs
        self.settings = settings
        self.visualizations = visualizations
        self._queue: queue.Queue[str | None] = queue.Queue(maxsize=settings.queue_size)
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._catalog_ready = threading.Event()
        self._current: Job | None = None
        from app.retention import Retention

        self.retention: "Retention" = Retention.from_settings(settings, images=images,
                                                              results=results, jobs=jobs)

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
            self.images.touch(image_id)     # in use: evicted last
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

    def _cancel_reason(self) -> Cancelled:
        return Cancelled(_cancel_reason_text(self._stopping.is_set()))

    def _run(self, job: Job) -> None:
        with job.lock:
            if job.terminal:        # cancelled after the loop took it from the queue
                return
            job.status, job.started = RUNNING, time.time()
        self.jobs.save(job)
        log.info("job %s started: %d images x %d methods", job.id[:8], len(job.spec.images),
                 len(job.spec.methods))
        try:
            _JobRun(self, job).run()
        except Cancelled:
            job.finish(CANCELLED, self._cancel_reason())
        except ConvscopeError as error:
            job.finish(FAILED, error)
        except Exception:  # noqa: BLE001 -- a broken job must not stop the executor
            log.exception("job %s failed unexpectedly", job.id[:8])
            job.finish(FAILED, Internal("The job failed unexpectedly; the server log has details."))
        else:
            failed = [item for item in job.items if item.status == FAILED]
            if failed:
                job.finish(FAILED, {"code": failed[0].error["code"] if failed[0].error
                                    else "E_INTERNAL",
                                    "message": f"{len(failed)} of {len(job.items)} "
                                               "visualizations failed; see each for the reason."})
            else:
                job.finish(DONE)
        finally:
            _release_device_memory()
            self.jobs.clear_cancel_request(job)
            self.jobs.save(job)
        log.info("job %s %s (model runs %d, cache hits %d)", job.id[:8], job.status,
                 job.model_runs, job.cache_hits)


def _cancel_reason_text(stopping: bool) -> str:
    return ("The server shut down while this job was running; submit it again." if stopping
            else "The job was cancelled.")


def _release_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 -- best effort only
        pass


class _JobRun:
    """Runs one job's items in the executor thread; loads the model only if something is not
    already in the result store."""

    CHECKPOINT_S = 1.0

    def __init__(self, executor: Executor, job: Job) -> None:
        self.executor = executor
        self.job = job
        self.spec = job.spec
        self._model: "LoadedModel | None" = None
        self._load_error: ConvscopeError | None = None
        self._last_checkpoint = time.monotonic()

    def model(self) -> "LoadedModel":
        """The job's model, loaded on first need. A load failure fails the whole job."""
        if self._load_error is not None:
            raise self._load_error
        if self._model is None:
            try:
                model = self.executor.catalog.load(self.spec.model_id)
                if model.meta.sha256 and model.meta.sha256 != self.spec.checkpoint_sha256:
                    raise UnknownModel("The checkpoint changed after the job was submitted; "
                                       "submit it again.")
            except ConvscopeError as error:
                self._load_error = error
                raise
            self._model = model
        return self._model

    def _job_level(self, error: BaseException) -> bool:
        return isinstance(error, Cancelled) or error is self._load_error

    def run(self) -> None:
        for image_index, image_id in enumerate(self.spec.images):
            if self.executor.jobs.cancel_requested(self.job) or self.executor.stopping:
                self.job.cancel_event.set()
            if self.job.cancel_event.is_set():
                self._raise_cancelled()
            try:
                outcome, inputs = self._predict(image_index, image_id)
            except ConvscopeError as error:
                if self._job_level(error):
                    raise
                self._fail_image(image_index, error)
                continue
            targets = self._targets(image_id, outcome)
            for method_index, method in enumerate(self.spec.methods):
                self._run_item(self.job.item(image_index, method_index), image_id, method,
                               targets, inputs)

    def _raise_cancelled(self) -> None:
        raise Cancelled(_cancel_reason_text(self.executor.stopping))

    def _fail_image(self, image_index: int, error: ConvscopeError) -> None:
        with self.job.lock:
            for method_index in range(len(self.spec.methods)):
                item = self.job.item(image_index, method_index)
                item.status, item.error, item.progress = FAILED, _error_dict(error), 1.0
        self.executor.jobs.save(self.job)

    # prediction: top-k and the model view, cached like any result

    def _predict(self, image_index: int, image_id: str) -> tuple[ImageOutcome, "_ImageInputs"]:
        import numpy as np

        store = self.executor.results
        key = result_key(kind="prediction", image=image_id,
                         checkpoint=self.spec.checkpoint_sha256,
                         meta=self.spec.meta_fingerprint, top_k=self.executor.settings.top_k)
        stored = store.get(key)
        inputs = _ImageInputs(self, key)
        if stored is None:
            from app.rendering import encode_png

            model = self.model()
            view = model.model_view(self.executor.images.open(image_id))
            batch = model.to_tensor([view])
            probabilities = model.predict(batch)[0].float().cpu().numpy()
            top = model.top_k(_as_tensor(probabilities), self.executor.settings.top_k)
            stored = store.put(key, {"kind": "prediction", "image": image_id,
                                     "checkpoint_sha256": self.spec.checkpoint_sha256,
                                     "predictions": top, "predicted": int(np.argmax(probabilities))},
                               {"model_view.png": encode_png(view),
                                "probabilities.npy": _npy(probabilities.astype(np.float32))})
            # Made already: the methods reuse them instead of reading them back.
            inputs.view, inputs.batch, inputs.probabilities = view, batch, probabilities
            self._count(model_runs=1)
        else:
            store.touch(key)
            self._count(cache_hits=1)
        true_index = self.spec.true_labels.get(image_id)
        true_label = None
        predicted = int(stored.record["predicted"])
        if true_index is not None:
            true_label = {"index": true_index, "label": self._class_name(true_index),
                          "probability": float(inputs.probabilities[true_index])}
        outcome = ImageOutcome(key, predicted, list(stored.record["predictions"]), true_label,
                               failure=true_index is not None and true_index != predicted)
        with self.job.lock:
            self.job.images[image_index] = outcome
        self.executor.jobs.save(self.job)
        return outcome, inputs

    def _class_name(self, index: int) -> str:
        entry = self.executor.catalog.get(self.spec.model_id)
        return entry.meta.class_names[index] if entry.meta else str(index)

    def _targets(self, image_id: str, outcome: ImageOutcome) -> list[int]:
        """Class indices to explain: the requested ones, plus predicted and true class for a
        failure case, so the two can be compared side by side."""
        wanted: list[int | str] = list(self.spec.targets)
        if outcome.failure:
            wanted += [PREDICTED, outcome.true_label["index"]]
        indices: list[int] = []
        for spec in wanted:
            index = outcome.predicted if spec == PREDICTED else int(spec)
            if index not in indices:
                indices.append(index)
        return indices

    # one image x one method

    def _run_item(self, item: JobItem, image_id: str, method: MethodRequest,
                  targets: Sequence[int], inputs: "_ImageInputs") -> None:
        if self.job.cancel_event.is_set():
            self._raise_cancelled()
        with self.job.lock:
            item.status, item.progress = RUNNING, 0.0
        try:
            for number, target in enumerate(targets):
                key = result_key(kind="visualization", image=image_id,
                                 checkpoint=self.spec.checkpoint_sha256,
                                 meta=self.spec.meta_fingerprint, method=method.name,
                                 params=method.params, target=target)
                stored = self.executor.results.get(key)
                if stored is None:
                    progress = self._progress_callback(item, number, len(targets))
                    stored = self._compute(key, image_id, method, target, inputs, progress)
                    self._count(model_runs=1)
                else:
                    self.executor.results.touch(key)
                    with self.job.lock:
                        item.cached += 1
                    self._count(cache_hits=1)
                with self.job.lock:
                    item.result_keys.append(key)
                    item.elapsed_ms += float(stored.record.get("elapsed_ms", 0.0))
                    item.progress = (number + 1) / len(targets)
            with self.job.lock:
                item.status, item.progress = DONE, 1.0
        except Cancelled:
            with self.job.lock:
                item.status = CANCELLED
            raise
        except ConvscopeError as error:
            if self._job_level(error):
                with self.job.lock:
                    item.status = FAILED
                raise
            with self.job.lock:
                item.status, item.error, item.progress = FAILED, _error_dict(error), 1.0
        except Exception:  # noqa: BLE001 -- record, keep the job and the executor going
            log.exception("visualization %s failed in job %s", method.name, self.job.id[:8])
            with self.job.lock:
                item.status, item.progress = FAILED, 1.0
                item.error = _error_dict(Internal("This visualization failed unexpectedly; the "
                                                  "server log has details."))
        self.executor.jobs.save(self.job)

    def _progress_callback(self, item: JobItem, number: int, count: int) -> Callable[[float], None]:
        def report(fraction: float) -> None:
            with self.job.lock:
                item.progress = (number + fraction) / count
            self._checkpoint()
        return report

    def _checkpoint(self) -> None:
        """At most every ``CHECKPOINT_S``: save progress for other server processes and pick up
        a cancel requested through one of them."""
        now = time.monotonic()
        if now - self._last_checkpoint < self.CHECKPOINT_S:
            return
        self._last_checkpoint = now
        if self.executor.jobs.cancel_requested(self.job):
            self.job.cancel_event.set()
        self.executor.jobs.save(self.job)

    def _compute(self, key: str, image_id: str, method: MethodRequest, target: int,
                 inputs: "_ImageInputs", progress: Callable[[float], None]):
        from visualizations.base import RunContext

        model = self.model()        # a load failure fails the job before any file is read
        visualization = self.executor.visualizations.get(method.name)
        params = visualization.parse_params(method.params, model.meta)
        context = RunContext(progress=progress, cancel_event=self.job.cancel_event,
                             batch_size=self.executor.settings.batch_size)
        result = visualization.run(model, inputs.batch, [target], params, context,
                                   probabilities=inputs.probabilities)
        files: dict[str, bytes] = {}
        panels = []
        for number, panel in enumerate(result.panels):
            panels.append(_store_panel(number, panel, inputs.view, files))
        record = {"kind": "visualization", "image": image_id, "method": method.name,
                  "title": visualization.title, "params": result.params,
                  "checkpoint_sha256": self.spec.checkpoint_sha256, "target": target,
                  "elapsed_ms": round(result.elapsed_ms, 3), "panels": panels}
        return self.executor.results.put(key, record, files)

    def _count(self, *, model_runs: int = 0, cache_hits: int = 0) -> None:
        with self.job.lock:
            self.job.model_runs += model_runs
            self.job.cache_hits += cache_hits


class _ImageInputs:
    """What computing one image's visualizations needs -- the picture the model sees, its input
    batch and the class probabilities -- each made on first use: an image whose results are all
    in the store needs none of them, and the batch is built once for all methods and targets."""

    def __init__(self, run: _JobRun, prediction_key: str) -> None:
        self._run = run
        self._prediction_key = prediction_key

    def _file(self, name: str) -> Path:
        return self._run.executor.results.file(self._prediction_key, name)[0]

    @functools.cached_property
    def view(self) -> "Image.Image":
        return _load_png(self._file("model_view.png"))

    @functools.cached_property
    def probabilities(self) -> Any:
        import numpy as np

        return np.load(self._file("probabilities.npy"), allow_pickle=False)

    @functools.cached_property
    def batch(self) -> Any:
        return self._run.model().to_tensor([self.view])


def _store_panel(number: int, panel: Any, view: "Image.Image", files: dict[str, bytes]) -> dict:
    """Render one panel into ``files`` and describe it for result.json."""
    import numpy as np

    from app.rendering import OVERLAY_OPACITY, render_panel

    prefix = f"panel-{number}"
    files[f"{prefix}-values.npy"] = _npy(np.asarray(panel.values))
    description = {"title": panel.title, "kind": panel.kind, "signed": bool(panel.signed),
                   "target": panel.target.to_dict() if panel.target is not None else None,
                   "files": {"array": f"{prefix}-values.npy"}}
    rendered = render_panel(panel, view, OVERLAY_OPACITY)
    if panel.kind == "heatmap":
        files[f"{prefix}-overlay.png"] = rendered.overlay_png
        files[f"{prefix}-heatmap.png"] = rendered.heatmap_png
        description["files"].update(overlay=f"{prefix}-overlay.png",
                                    heatmap=f"{prefix}-heatmap.png")
    else:
        # An image panel comes back as it is, in both slots: stored once.
        files[f"{prefix}-image.png"] = rendered.heatmap_png
        description["files"].update(image=f"{prefix}-image.png")
    low, high = rendered.value_range
    description["value_range"] = [float(low), float(high)]
    return description


def _as_tensor(array: Any) -> Any:
    import torch

    return torch.from_numpy(array)


def _load_png(path: Path) -> "Image.Image":
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB") if image.mode not in ("RGB", "L") else image.copy()


def _npy(array: Any) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
