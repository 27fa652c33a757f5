"""An evaluation job: one model on one labelled dataset of the server's dataset folder.

The spec is checked completely when it is submitted (``app.views.evaluations``): model, dataset,
its labels against the model's classes. The run scans the dataset again (it may have changed),
answers a repeat from the stored outcome without loading the model, and otherwise runs
``app.evaluation.Evaluation`` one batch per step, reusing stored chunks, reporting
``job.fraction`` and saving its record every second (so other server processes see progress and
can ask for a cancel). The outcome goes to the ``ResultStore``; ``job.outcome_key`` names it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping

from app.dataset_catalog import DatasetCatalog
from app.datasets import match_labels
from app.errors import UnknownModel
from app.evaluation import Evaluation, summary_of
from app.evaluation_store import StoreChunkCache, store_outcome
from app.jobs.checkpoint import JobCheckpoint
from app.jobs.record import Job
from app.pipeline import ModelIdentity

if TYPE_CHECKING:
    from app.jobs.resources import JobResources
    from model_adapters.base import LoadedModel


@dataclass(frozen=True)
class EvaluateSpec:
    """A validated evaluation: which checkpoint on which dataset, and how many classes to keep
    per image."""

    model_id: str
    model_file: str
    checkpoint_sha256: str
    meta_fingerprint: str
    dataset_id: str
    dataset_name: str
    top_k: int

    kind: ClassVar[str] = "evaluate"
    images: ClassVar[tuple[str, ...]] = ()      # no uploaded images to keep alive

    def item_grid(self) -> tuple[int, int]:
        return 0, 0

    @property
    def model(self) -> ModelIdentity:
        return ModelIdentity(self.checkpoint_sha256, self.meta_fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "model_file": self.model_file,
                "checkpoint_sha256": self.checkpoint_sha256,
                "meta_fingerprint": self.meta_fingerprint, "dataset_id": self.dataset_id,
                "dataset_name": self.dataset_name, "top_k": self.top_k}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EvaluateSpec":
        return cls(model_id=data["model_id"], model_file=data["model_file"],
                   checkpoint_sha256=data["checkpoint_sha256"],
                   meta_fingerprint=data["meta_fingerprint"], dataset_id=data["dataset_id"],
                   dataset_name=data["dataset_name"], top_k=int(data["top_k"]))


class EvaluateRun:
    """One evaluation job, run in the thread that owns the device."""

    def __init__(self, services: "JobResources", job: Job, *,
                 stopping: Callable[[], bool] = lambda: False,
                 offer_turn: Callable[[], None] | None = None) -> None:
        self.services = services
        self.job = job
        self.spec: EvaluateSpec = job.spec      # type: ignore[assignment]
        self.stopping = stopping
        self._job_checkpoint = JobCheckpoint(services, job, stopping)
        self._check_cancel = self._job_checkpoint.raise_if_cancelled

    def _load_model(self) -> "LoadedModel":
        model = self.services.catalog.load(self.spec.model_id)
        if model.meta.sha256 and model.meta.sha256 != self.spec.checkpoint_sha256:
            raise UnknownModel("The checkpoint changed after the evaluation was submitted; "
                               "submit it again.")
        return model


    def steps(self) -> Iterator[None]:
        self._check_cancel(force=True)
        entry = self.services.catalog.get(self.spec.model_id)
        meta = entry.meta if entry.meta is not None else self._load_model().meta
        datasets = DatasetCatalog.from_settings(self.services.settings)
        scan = datasets.scan(datasets.get(self.spec.dataset_id))
        labelled = match_labels(scan, meta)
        results = self.services.results
        evaluation = Evaluation(self._load_model, self.spec.model, labelled,
                                num_classes=meta.num_classes, top_k=self.spec.top_k,
                                cache=StoreChunkCache(results))
        if results.exists(evaluation.key):          # a repeat: nothing to read
            results.touch(evaluation.key)
            self._finish(evaluation.key, reused=evaluation.total)
            return
        yield
        steps = evaluation.steps()
        try:
            for _ in steps:
                with self.job.lock:
                    self.job.fraction = evaluation.fraction
                    self.job.model_runs = evaluation.computed
                    self.job.cache_hits = evaluation.reused
                self._check_cancel()
                yield
        finally:
            steps.close()
        records = evaluation.records
        assert records is not None
        store_outcome(results, evaluation.key, summary_of(evaluation, meta), records,
                      meta.class_names)
        with self.job.lock:
            self.job.model_runs = evaluation.computed
        self._finish(evaluation.key, reused=evaluation.reused)

    def _finish(self, key: str, *, reused: int) -> None:
        with self.job.lock:
            self.job.outcome_key = key
            self.job.fraction = 1.0
            self.job.cache_hits = reused
        self.services.jobs.save(self.job)
