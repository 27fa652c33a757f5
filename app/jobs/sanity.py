"""A sanity-check job: cascading model-parameter randomization of one method on one checkpoint.

The spec is checked completely when it is submitted (``app.views.sanity``): model, method,
parameters, images (stored ids), cost. The run answers a repeat -- same checkpoint,
preprocessing, method version, resolved parameters, images and seed (``app.sanity.sanity_key``)
-- from the ``ResultStore`` without loading the model; otherwise it runs
``visualizations.sanity.sanity_check`` on a copy of the model, reporting ``job.fraction``,
saving its record every second (so other server processes see progress and can ask for a
cancel) and offering other running jobs a turn while it computes. The outcome (the CLI's JSON
object plus the per-image figures) goes to the store; ``job.outcome_key`` names it, and the
pointer ``app.sanity.latest_key`` -- what every panel of this method on this checkpoint links
to -- is moved to it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping

from app.errors import UnknownModel
from app.jobs.checkpoint import JobCheckpoint
from app.jobs.record import Job
from app.pipeline import MethodRequest, ModelIdentity
from app.sanity import SEED, latest_key, sanity_key
from visualizations.context import RunContext

if TYPE_CHECKING:
    from app.jobs.resources import JobResources
    from model_adapters.base import LoadedModel


@dataclass(frozen=True)
class SanitySpec:
    """A validated sanity check: which checkpoint, which method with which parameters, on which
    stored images."""

    model_id: str
    model_file: str
    checkpoint_sha256: str
    meta_fingerprint: str
    method: MethodRequest
    images: tuple[str, ...]          # stored image ids (kept alive while the job waits)
    filenames: tuple[str, ...]
    seed: int = SEED

    kind: ClassVar[str] = "sanity"

    def item_grid(self) -> tuple[int, int]:
        return 0, 0

    @property
    def model(self) -> ModelIdentity:
        return ModelIdentity(self.checkpoint_sha256, self.meta_fingerprint)

    @property
    def key(self) -> str:
        return sanity_key(self.model, self.method, self.images, self.seed)

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_file": self.model_file,
                "checkpoint_sha256": self.checkpoint_sha256,
                "meta_fingerprint": self.meta_fingerprint, "method": self.method.to_dict(),
                "images": list(self.images), "filenames": list(self.filenames),
                "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SanitySpec":
        return cls(model_id=data["model_id"], model_file=data["model_file"],
                   checkpoint_sha256=data["checkpoint_sha256"],
                   meta_fingerprint=data["meta_fingerprint"],
                   method=MethodRequest.from_dict(data["method"]),
                   images=tuple(data["images"]), filenames=tuple(data["filenames"]),
                   seed=int(data.get("seed", SEED)))


class SanityRun:
    """One sanity-check job, run in the thread that owns the device."""

    def __init__(self, services: "JobResources", job: Job, *,
                 stopping: Callable[[], bool] = lambda: False,
                 offer_turn: Callable[[], None] | None = None) -> None:
        self.services = services
        self.job = job
        self.spec: SanitySpec = job.spec      # type: ignore[assignment]
        self.stopping = stopping
        self._offer_turn = offer_turn
        self._job_checkpoint = JobCheckpoint(services, job, stopping)
        self._check_cancel = self._job_checkpoint.raise_if_cancelled

    def _load_model(self) -> "LoadedModel":
        model = self.services.catalog.load(self.spec.model_id)
        if model.meta.sha256 and model.meta.sha256 != self.spec.checkpoint_sha256:
            raise UnknownModel("The checkpoint changed after the sanity check was submitted; "
                               "submit it again.")
        return model


    def _progress(self, fraction: float) -> None:
        with self.job.lock:
            self.job.fraction = max(self.job.fraction, min(float(fraction), 0.999))
        self._check_cancel()
        if self._offer_turn is not None:
            # The check's hooks are on its own copy of the model, never on the one other jobs
            # use, so their steps can run here.
            self._offer_turn()

    def steps(self) -> Iterator[None]:
        self._check_cancel(force=True)
        results = self.services.results
        key = self.spec.key
        stored = results.get(key)
        if stored is not None:                  # a repeat: nothing to compute
            results.touch(key)
            with self.job.lock:
                self.job.cache_hits = 1
            self._finish(key, stored.record)
            return
        yield
        from visualizations.sanity import sanity_check

        model = self._load_model()
        visualization = self.services.visualizations.get(self.spec.method.name)
        params = visualization.parse_params(self.spec.method.params, model.meta)
        batches = [model.to_tensor([model.model_view(self.services.images.open(image_id))])
                   for image_id in self.spec.images]
        yield
        started = time.perf_counter()
        context = RunContext(progress=self._progress, cancel_event=self.job.cancel_event,
                             batch_size=self.services.settings.batch_size)
        result = sanity_check(model, batches, visualization, params, context,
                              seed=self.spec.seed)
        record = {**result.to_dict(), "kind": "sanity",
                  "checkpoint_sha256": self.spec.checkpoint_sha256,
                  "method_version": self.spec.method.version,
                  "image_ids": list(self.spec.images), "filenames": list(self.spec.filenames),
                  "targets": [{"index": index, "label": model.meta.class_names[index]}
                              for index in result.targets],
                  "per_image": [{"spearman": list(step.spearman_per_image),
                                 "ssim": list(step.ssim_per_image)} for step in result.steps],
                  "seed": self.spec.seed, "elapsed_s": round(time.perf_counter() - started, 2)}
        stored = results.put(key, record, {})
        with self.job.lock:
            self.job.model_runs = 1
        self._finish(key, stored.record)

    def _finish(self, key: str, record: Mapping[str, Any]) -> None:
        self._point_latest(key, record)
        with self.job.lock:
            self.job.outcome_key = key
            self.job.fraction = 1.0
        self.services.jobs.save(self.job)

    def _point_latest(self, key: str, record: Mapping[str, Any]) -> None:
        """Move the checkpoint x method x parameters pointer to this outcome (a small record
        with the verdict, so a panel reads one file to show it)."""
        results = self.services.results
        pointer = latest_key(self.spec.model, self.spec.method.name, self.spec.method.version,
                             self.spec.method.params)
        current = results.get(pointer)
        if current is not None and current.record.get("outcome_key") == key:
            results.touch(pointer)
            return
        if current is not None:
            results.delete(pointer)
        final = record["steps"][-1]
        results.put(pointer, {"kind": "sanity-latest", "outcome_key": key,
                              "method": self.spec.method.name, "passed": bool(record["passed"]),
                              "spearman": float(final["spearman"]), "ssim": float(final["ssim"]),
                              "threshold": float(record["threshold"]),
                              "images": int(record["images"])}, {})
