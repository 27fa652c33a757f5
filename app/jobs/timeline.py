"""A timeline job: the same images (and optionally a dataset) across several checkpoints.

The spec lists the checkpoints in training order as they were when it was submitted, the
images, the methods (resolved for the latest checkpoint), the targets and an optional dataset.
The run goes through the checkpoints one at a time:

* per image a prediction and per method and target a visualization, each looked up in the
  ``ResultStore`` under ``app.pipeline``'s keys first -- the keys a visualization job uses, so a
  checkpoint already computed for an image x method x target (by an earlier timeline, or an
  ordinary job) is never computed again;
* with a dataset, ``app.evaluation.Evaluation`` with the store's chunk cache (a checkpoint
  evaluated before is not read again);
* the model is loaded only when something is missing, with ``remember=False`` so the catalog's
  LRU is not filled with a run's checkpoints, and dropped before the next checkpoint.

"predicted" targets mean each image's predicted class at the last loadable checkpoint (so a
strip explains one class). A checkpoint that fails (gone, changed, unloadable) is listed with
its error and skipped. Progress is the fraction of (checkpoint x unit) done; a cancel is picked
up between units. The outcome (``timeline.json``'s shape, with stored result keys instead of
file paths) goes to the ``ResultStore``; ``job.outcome_key`` names it.
"""
from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping

from app.errors import Cancelled, ConvscopeError, UnknownModel
from app.jobs.checkpoint import JobCheckpoint
from app.jobs.record import Job, error_dict
from app.pipeline import (MethodRequest, ModelIdentity, StoredInputs, image_targets, predict,
                          prediction_key, visualization_key, visualize)
from app.stores import result_key
from app.timeline import dataset_figures, find_flips
from visualizations.context import RunContext

if TYPE_CHECKING:
    from app.jobs.resources import JobResources
    from model_adapters.base import LoadedModel

log = logging.getLogger(__name__)

TIMELINE_VERSION = 1
CORRECT_FILE = "correct.json"


@dataclass(frozen=True)
class TimelineCheckpoint:
    model_id: str
    file: str
    sha256: str
    meta_fingerprint: str
    epoch: int | None
    step: int | None
    order_by: str

    @property
    def identity(self) -> ModelIdentity:
        return ModelIdentity(self.sha256, self.meta_fingerprint)

    def to_dict(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "file": self.file, "sha256": self.sha256,
                "meta_fingerprint": self.meta_fingerprint, "epoch": self.epoch,
                "step": self.step, "order_by": self.order_by}


@dataclass(frozen=True)
class TimelineSpec:
    """A validated timeline (``app.views.timeline_requests``)."""

    checkpoints: tuple[TimelineCheckpoint, ...]     # training order, failed files included
    images: tuple[str, ...]
    filenames: tuple[str, ...]
    methods: tuple[MethodRequest, ...]
    targets: tuple[int | str, ...]
    dataset_id: str | None = None
    dataset_name: str | None = None

    kind: ClassVar[str] = "timeline"

    def item_grid(self) -> tuple[int, int]:
        return 0, 0

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoints": [c.to_dict() for c in self.checkpoints],
                "images": list(self.images), "filenames": list(self.filenames),
                "methods": [method.to_dict() for method in self.methods],
                "targets": list(self.targets), "dataset_id": self.dataset_id,
                "dataset_name": self.dataset_name}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TimelineSpec":
        return cls(checkpoints=tuple(TimelineCheckpoint(**c) for c in data["checkpoints"]),
                   images=tuple(data["images"]), filenames=tuple(data["filenames"]),
                   methods=tuple(MethodRequest.from_dict(m) for m in data["methods"]),
                   targets=tuple(data["targets"]), dataset_id=data.get("dataset_id"),
                   dataset_name=data.get("dataset_name"))


class TimelineRun:
    """One timeline job, run in the thread that owns the device."""

    def __init__(self, services: "JobResources", job: Job, *,
                 stopping: Callable[[], bool] = lambda: False,
                 offer_turn: Callable[[], None] | None = None) -> None:
        self.services = services
        self.job = job
        self.spec: TimelineSpec = job.spec          # type: ignore[assignment]
        self.stopping = stopping
        self._job_checkpoint = JobCheckpoint(services, job, stopping)
        self._check_cancel = self._job_checkpoint.raise_if_cancelled
        self._model: "LoadedModel | None" = None
        self._model_id: str | None = None
        self._top_k = services.settings.top_k
        self._units_done = 0
        methods_per_image = 1 + len(self.spec.methods) * max(1, len(self.spec.targets))
        self._units_total = max(1, len(self.spec.checkpoints) * (
            len(self.spec.images) * methods_per_image + (1 if self.spec.dataset_id else 0)))

    # --- bookkeeping ----------------------------------------------------------------------


    def _poll_cancel(self, fraction: float) -> None:
        """Progress callback of a long method: a cancel asked through any server process
        sets the event the method checks between its batches."""
        self._job_checkpoint.sync()
        if self.stopping():
            self.job.cancel_event.set()

    def _advance(self, units: int = 1, *, model_runs: int = 0, cache_hits: int = 0) -> None:
        self._units_done += units
        with self.job.lock:
            self.job.fraction = min(0.99, self._units_done / self._units_total)
            self.job.model_runs += model_runs
            self.job.cache_hits += cache_hits

    def _load(self, checkpoint: TimelineCheckpoint) -> "LoadedModel":
        """This checkpoint's model, loaded on first need and only for this checkpoint."""
        if self._model is not None and self._model_id != checkpoint.model_id:
            self._drop_model()      # never two checkpoints' models at once
        if self._model is None:
            model = self.services.catalog.load(checkpoint.model_id, remember=False)
            if model.meta.sha256 and model.meta.sha256 != checkpoint.sha256:
                raise UnknownModel(f"The checkpoint {checkpoint.file!r} changed after the "
                                   "timeline was submitted.")
            self._model, self._model_id = model, checkpoint.model_id
        return self._model

    def _drop_model(self) -> None:
        self._model = self._model_id = None
        gc.collect()

    # --- the run --------------------------------------------------------------------------

    def steps(self) -> Iterator[None]:
        self._check_cancel(force=True)
        spec = self.spec
        labelled = self._dataset()
        records: list[dict[str, Any]] = [
            {**{k: v for k, v in c.to_dict().items() if k not in ("meta_fingerprint",)},
             "ok": False, "error": None, "accuracy": None, "recall": None}
            for c in spec.checkpoints]
        steps: list[dict[int, dict[str, Any]]] = [{} for _ in spec.images]
        correct: dict[int, dict[str, bool]] = {}
        targets: list[list[int]] | None = None
        order = list(reversed(range(len(spec.checkpoints))))    # the last one first: targets
        anchor_found = False
        pending = []
        for number in order:
            if anchor_found:
                pending.append(number)
                continue
            try:
                targets = yield from self._targets(spec.checkpoints[number])
                anchor_found = True
                pending.append(number)
            except Cancelled:
                raise
            except ConvscopeError as error:
                records[number]["error"] = error_dict(error)
                self._advance(self._units_total // max(1, len(spec.checkpoints)))
                self._drop_model()
        for number in sorted(pending):
            checkpoint = spec.checkpoints[number]
            try:
                assert targets is not None
                yield from self._checkpoint(number, checkpoint, targets, steps, records,
                                            correct, labelled)
                records[number]["ok"] = True
            except Cancelled:
                raise
            except ConvscopeError as error:
                records[number]["error"] = error_dict(error)
                for image_steps in steps:
                    image_steps.pop(number, None)
            finally:
                self._drop_model()
        self._finish(records, steps, correct, targets or [[] for _ in spec.images], labelled)

    def _dataset(self) -> Any:
        if not self.spec.dataset_id:
            return None
        from app.dataset_catalog import DatasetCatalog

        datasets = DatasetCatalog.from_settings(self.services.settings)
        return datasets.scan(datasets.get(self.spec.dataset_id))

    def _meta(self, checkpoint: TimelineCheckpoint) -> Any:
        entry = self.services.catalog.get(checkpoint.model_id)
        if entry.error is not None:
            raise entry.error
        return entry.meta if entry.meta is not None else self._load(checkpoint).meta

    def _targets(self, checkpoint: TimelineCheckpoint) -> Iterator[Any]:
        """Each image's classes to explain, from the last checkpoint's predictions."""
        meta = self._meta(checkpoint)
        resolved = []
        for image_id in self.spec.images:
            top, _ = self._prediction(checkpoint, image_id)
            resolved.append(image_targets(meta, list(self.spec.targets), int(top["predicted"])))
            yield
        return resolved

    def _prediction(self, checkpoint: TimelineCheckpoint, image_id: str
                    ) -> tuple[dict[str, Any], Any]:
        results = self.services.results
        key = prediction_key(image_id, checkpoint.identity, self._top_k, False)
        stored = results.get(key)
        if stored is None:
            model = self._load(checkpoint)
            inputs = predict(model, self.services.images.open(image_id), self._top_k,
                             with_uncertainty=False)
            stored = results.put(key, {**inputs.record(), "image": image_id,
                                       "checkpoint_sha256": checkpoint.sha256}, inputs.files())
            self._advance(model_runs=1)
        else:
            results.touch(key)
            inputs = StoredInputs(lambda name: results.file(key, name)[0],
                                  lambda: self._load(checkpoint))
            self._advance(cache_hits=1)
        return {**stored.record, "key": key}, inputs

    def _checkpoint(self, number: int, checkpoint: TimelineCheckpoint, targets: list[list[int]],
                    steps: list[dict[int, dict[str, Any]]], records: list[dict[str, Any]],
                    correct: dict[int, dict[str, bool]], scan: Any) -> Iterator[None]:
        meta = self._meta(checkpoint)
        for image_number, image_id in enumerate(self.spec.images):
            self._check_cancel()
            stored, inputs = self._prediction(checkpoint, image_id)
            step: dict[str, Any] = {"checkpoint": checkpoint.file,
                                    "predictions": stored["predictions"],
                                    "prediction_key": stored["key"], "visualizations": []}
            yield
            for method in self.spec.methods:
                panels: list[dict[str, Any]] = []
                keys: list[str] = []
                for target in targets[image_number]:
                    self._check_cancel()
                    key = visualization_key(image_id, checkpoint.identity, method, target)
                    found = self.services.results.get(key)
                    if found is None:
                        model = self._load(checkpoint)
                        visualization = self.services.visualizations.get(method.name)
                        context = RunContext(progress=self._poll_cancel,
                                             cancel_event=self.job.cancel_event,
                                             batch_size=self.services.settings.batch_size)
                        panel_set = visualize(model, visualization, method, inputs, target,
                                              context)
                        found = self.services.results.put(
                            key, {**panel_set.record, "image": image_id,
                                  "checkpoint_sha256": checkpoint.sha256}, panel_set.files)
                        self._advance(model_runs=1)
                    else:
                        self.services.results.touch(key)
                        self._advance(cache_hits=1)
                    keys.append(key)
                    panels.extend({**panel, "result_key": key}
                                  for panel in found.record["panels"])
                    yield
                step["visualizations"].append({"method": method.name, "result_keys": keys,
                                               "panels": panels})
            steps[image_number][number] = step
        if scan is not None:
            yield from self._evaluate(number, checkpoint, meta, scan, records, correct)

    def _evaluate(self, number: int, checkpoint: TimelineCheckpoint, meta: Any, scan: Any,
                  records: list[dict[str, Any]], correct: dict[int, dict[str, bool]]
                  ) -> Iterator[None]:
        from app.datasets import match_labels
        from app.evaluation import Evaluation
        from app.evaluation_store import StoreChunkCache

        labelled = match_labels(scan, meta)
        evaluation = Evaluation(lambda: self._load(checkpoint), checkpoint.identity, labelled,
                                num_classes=meta.num_classes,
                                top_k=min(self._top_k, meta.num_classes),
                                cache=StoreChunkCache(self.services.results))
        for _ in evaluation.steps():
            self._check_cancel()
            yield
        assert evaluation.records is not None
        figures = dataset_figures(evaluation.records, meta.class_names, labelled.classes)
        records[number]["accuracy"] = figures["accuracy"]
        records[number]["recall"] = figures["recall"]
        correct[number] = figures["correct"]
        self._advance(model_runs=1 if evaluation.computed else 0,
                      cache_hits=1 if not evaluation.computed else 0)

    def _finish(self, records: list[dict[str, Any]], steps: list[dict[int, dict[str, Any]]],
                correct: dict[int, dict[str, bool]], targets: list[list[int]],
                scan: Any) -> None:
        spec = self.spec
        images = [{"image": image_id, "file": spec.filenames[number],
                   "targets": targets[number] if number < len(targets) else [],
                   "steps": [steps[number][n] for n in sorted(steps[number])]}
                  for number, image_id in enumerate(spec.images)]
        flips = find_flips([(c.file, correct.get(n)) for n, c in enumerate(spec.checkpoints)])
        document = {"kind": "timeline", "checkpoints": records, "images": images,
                    "flips": flips if scan is not None else [],
                    "methods": [method.name for method in spec.methods],
                    "dataset": ({"id": spec.dataset_id, "name": spec.dataset_name}
                                if scan is not None else None)}
        files = {CORRECT_FILE: json.dumps({spec.checkpoints[n].file: value
                                           for n, value in correct.items()}).encode()}
        # Keyed by the job: the same request later may see other checkpoints or dataset files.
        key = result_key(kind="timeline", version=TIMELINE_VERSION, job=self.job.id)
        self.services.results.put(key, document, files)
        with self.job.lock:
            self.job.outcome_key = key
            self.job.fraction = 1.0
        self.services.jobs.save(self.job)
