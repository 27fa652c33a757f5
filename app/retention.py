"""Keeping the data directory bounded: a time-to-live and a size quota for stored results and
uploaded images (job records: time-to-live only; they are small).

``Retention.run`` evicts everything unused for longer than ``CONVSCOPE_RESULT_TTL_HOURS``,
then, while results + images exceed ``CONVSCOPE_STORE_MAX_MB``, the least recently used first,
down to a low-water mark below the quota (so one new result does not trigger another pass).
"Used" means written, uploaded again, or reused by a job (the stores ``touch`` entries).

A pass lists whole store directories, so it never runs on an HTTP thread: the executor calls
``maybe_run`` between jobs and while idle, and a pass runs when the interval has passed or
when this process wrote enough since the last pass to go over the quota. Several server
processes sharing one data directory may each run passes; deletions are idempotent.
Evicted ids leave tombstones (``app.stores.Tombstones``) so their URLs answer 410.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection

from app.stores import ImageStore, ResultStore, remove_stale_temporaries

if TYPE_CHECKING:
    from app.jobs.store import JobStore
    from app.settings import Settings

log = logging.getLogger(__name__)

MIB = 1024 * 1024
LOW_WATER = 0.9                      # a quota pass evicts down to this fraction of the quota
MAX_INTERVAL_S = 60.0
TOMBSTONE_TTL_S = 90 * 24 * 3600.0   # an expired URL says so for this long, then plain 404
MAX_TOMBSTONES = 100_000             # per store
TOMBSTONE_PRUNE_INTERVAL_S = 3600.0


@dataclass(frozen=True)
class RetentionReport:
    """What one pass did."""

    removed_results: int = 0
    removed_images: int = 0
    removed_jobs: int = 0
    freed_bytes: int = 0
    stored_bytes: int = 0            # results + images left after the pass


class Retention:
    """Time-to-live and quota for one data directory's stores."""

    def __init__(self, *, images: ImageStore, results: ResultStore, jobs: "JobStore",
                 max_bytes: int | None, ttl_s: float | None,
                 clock: Callable[[], float] = time.time) -> None:
        self.images, self.results, self.jobs = images, results, jobs
        self.max_bytes = max_bytes or None
        self.ttl_s = ttl_s or None
        self.clock = clock
        # Often enough that nothing lives much longer than its TTL, rarely enough to be cheap.
        self.interval_s = min(MAX_INTERVAL_S, self.ttl_s / 10) if self.ttl_s else MAX_INTERVAL_S
        self._last_pass: float | None = None
        self._last_stored = 0
        self._written_at_last_pass = 0
        self._last_tombstone_prune = 0.0

    @classmethod
    def from_settings(cls, settings: "Settings", *, images: ImageStore, results: ResultStore,
                      jobs: "JobStore") -> "Retention":
        return cls(images=images, results=results, jobs=jobs,
                   max_bytes=int(settings.store_max_mb * MIB) if settings.store_max_mb else None,
                   ttl_s=settings.result_ttl_hours * 3600.0 if settings.result_ttl_hours
                   else None)

    @property
    def enabled(self) -> bool:
        return self.max_bytes is not None or self.ttl_s is not None

    def _written(self) -> int:
        return self.images.bytes_written + self.results.bytes_written

    def due(self) -> bool:
        """Whether a pass should run now (cheap: no directory listing)."""
        if not self.enabled:
            return False
        if self._last_pass is None or self.clock() - self._last_pass >= self.interval_s:
            return True
        if self.max_bytes is None:
            return False
        written_since = self._written() - self._written_at_last_pass
        return self._last_stored + written_since > self.max_bytes

    def maybe_run(self, protected_images: Collection[str] = ()) -> RetentionReport | None:
        """Run a pass if one is due; never raises (a failed pass is logged and retried)."""
        if not self.due():
            return None
        try:
            return self.run(protected_images)
        except Exception:  # noqa: BLE001 -- retention must not stop the executor
            log.exception("evicting old results failed; retrying later")
            self._last_pass = self.clock()
            return None

    def run(self, protected_images: Collection[str] = ()) -> RetentionReport:
        """One pass: expire by age, then evict least recently used down to the quota.
        ``protected_images`` (needed by queued jobs) are never evicted."""
        now = self.clock()
        written = self._written()
        protected = set(protected_images)
        all_images = self.images.entries()
        protected_bytes = sum(entry.size for entry in all_images if entry.id in protected)
        candidates = sorted([("result", entry) for entry in self.results.entries()]
                            + [("image", entry) for entry in all_images
                               if entry.id not in protected],
                            key=lambda item: item[1].last_used)
        stored = sum(entry.size for _, entry in candidates) + protected_bytes
        cutoff = now - self.ttl_s if self.ttl_s is not None else float("-inf")
        # Sorted by last use, so the expired entries are a prefix.
        expired = 0
        while expired < len(candidates) and candidates[expired][1].last_used < cutoff:
            expired += 1
        doomed = candidates[:expired]
        remaining = stored - sum(entry.size for _, entry in doomed)
        if self.max_bytes is not None and remaining > self.max_bytes:
            target = self.max_bytes * LOW_WATER
            for kind, entry in candidates[expired:]:
                if remaining <= target:
                    break
                doomed.append((kind, entry))
                remaining -= entry.size
        for kind, entry in doomed:
            (self.results if kind == "result" else self.images).delete(entry.id)
        removed_jobs = self.jobs.expire(older_than=now - self.ttl_s) if self.ttl_s else 0
        self._housekeeping(now)
        report = RetentionReport(
            removed_results=sum(kind == "result" for kind, _ in doomed),
            removed_images=sum(kind == "image" for kind, _ in doomed),
            removed_jobs=removed_jobs, freed_bytes=stored - remaining, stored_bytes=remaining)
        if doomed or removed_jobs:
            log.info("retention: removed %d results, %d images, %d job records (%.1f MiB); "
                     "%.1f MiB stored", report.removed_results, report.removed_images,
                     removed_jobs, report.freed_bytes / MIB, remaining / MIB)
        if self.max_bytes is not None and remaining > self.max_bytes:
            log.warning("the store is over its quota (%.1f MiB) with only protected entries "
                        "left", self.max_bytes / MIB)
        self._last_pass, self._last_stored = now, remaining
        self._written_at_last_pass = written
        return report

    def _housekeeping(self, now: float) -> None:
        """Crash leftovers and old tombstones: cheap, but not needed on every pass."""
        for root in (self.results.root, self.images.root, self.jobs.root):
            remove_stale_temporaries(root, now)
        if now - self._last_tombstone_prune < TOMBSTONE_PRUNE_INTERVAL_S:
            return
        self._last_tombstone_prune = now
        for tombstones in (self.results.tombstones, self.images.tombstones,
                           self.jobs.tombstones):
            tombstones.prune(now - TOMBSTONE_TTL_S, MAX_TOMBSTONES)
