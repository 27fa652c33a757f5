"""Starting and ending a job, the same for every kind and every backend: the embedded executor
interleaves jobs' steps between ``start_job`` and ``finish_job``; a backend that runs one job at
a time (a remote worker) calls ``run_job``."""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable

from app.errors import Cancelled, ConvscopeError, Internal
from app.jobs.kinds import make_run
from app.jobs.record import CANCELLED, DONE, FAILED, RUNNING, Job, cancel_reason_text

if TYPE_CHECKING:
    from app.jobs.resources import JobResources

log = logging.getLogger(__name__)


def start_job(services: "JobResources", job: Job) -> bool:
    """Mark ``job`` running and save it; False when it was cancelled before it could start."""
    with job.lock:
        if job.terminal:        # cancelled after it was taken from the queue
            return False
        job.status, job.started = RUNNING, time.time()
    services.jobs.save(job)
    log.info("job %s (%s) started", job.id[:8], job.kind)
    return True


def finish_job(services: "JobResources", job: Job, error: BaseException | None, *,
               stopping: Callable[[], bool]) -> None:
    """Record how a started job ended: ``error`` is what stopped its run (None: it ran out)."""
    try:
        if isinstance(error, Cancelled):
            job.finish(CANCELLED, Cancelled(cancel_reason_text(stopping())))
        elif isinstance(error, ConvscopeError):
            job.finish(FAILED, error)
        elif error is not None:
            log.error("job %s failed unexpectedly", job.id[:8],
                      exc_info=(type(error), error, error.__traceback__))
            job.finish(FAILED, Internal("The job failed unexpectedly; the server log has "
                                        "details."))
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
        services.jobs.clear_cancel_request(job)
        services.jobs.save(job)
    log.info("job %s %s (model runs %d, cache hits %d)", job.id[:8], job.status,
             job.model_runs, job.cache_hits)


def run_job(services: "JobResources", job: Job, *, stopping: Callable[[], bool],
            after_step: Callable[[], None] | None = None) -> None:
    """Run ``job`` from start to a recorded end in one go (``stopping``: whether this process
    is shutting down, which cancels the job at its next check; ``after_step`` runs after each
    of its steps)."""
    if not start_job(services, job):
        return
    error: BaseException | None = None
    try:
        for _ in make_run(services, job, stopping=stopping).steps():
            if after_step is not None:
                after_step()
    except Exception as raised:  # noqa: BLE001 -- recorded by finish_job
        error = raised
    finish_job(services, job, error, stopping=stopping)


def _release_device_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 -- best effort only
        pass
