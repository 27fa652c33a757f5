"""``JobStore``: the jobs of this process in memory, every job also as ``<id>.json`` on disk.

Records are written atomically at every status change, so a restarted server still shows
finished jobs; a job that was queued or running in a process that is gone is shown as cancelled
("the server stopped"). Other server processes sharing the data directory read the records and
ask for a cancel through a marker file.
"""
from __future__ import annotations

import json
import logging
import os
import re
import secrets
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from app.errors import Cancelled, NotFound, ResultExpired
from app.jobs.record import CANCELLED, QUEUED, RUNNING, Job, Spec, owner_alive
from app.stores import DirectoryIndex, Tombstones, atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"[0-9a-f]{32}")


class JobStore:
    """Live jobs of this process in memory; every job also as ``<id>.json`` on disk."""

    def __init__(self, root: Path, spec_from_record: Callable[[Mapping[str, Any]], Spec]) -> None:
        """``spec_from_record`` parses a record's spec by its kind (``app.jobs.kinds``); it is
        passed in so this module needs none of the kinds' run code."""
        self.root = Path(root)
        self._spec_from_record = spec_from_record
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

    def unfinished_ids(self, owner: str) -> list[str]:
        """Ids of recorded jobs of ``owner`` that are queued or running (read from disk)."""
        found = []
        with os.scandir(self.root) as entries:
            names = [entry.name for entry in entries if entry.name.endswith(".json")]
        for name in names:
            try:
                record = json.loads((self.root / name).read_text("utf-8"))
            except (OSError, ValueError):
                continue
            if (isinstance(record, dict) and record.get("owner") == owner
                    and record.get("status") in (QUEUED, RUNNING)):
                found.append(record["id"])
        return found

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
            record = json.loads(path.read_text("utf-8"))
            job = Job.from_record(record, self._spec_from_record(record))
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("job record %s is unreadable", job_id)
            raise NotFound("There is no job with this id.") from None
        if not job.terminal and not owner_alive(job.owner):
            job.finish(CANCELLED, Cancelled("The server stopped before this job finished; "
                                            "submit it again."))
            self.save(job)
        return job
