"""Running one visualization job: per image, a prediction, then one item per method, each
target answered from the ``ResultStore`` when it was computed before, else computed through
``app.pipeline`` and stored. The model is loaded only if something is not already stored."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Iterator

from app.errors import Cancelled, ConvscopeError, Internal, UnknownModel
from app.faithfulness_scores import FaithfulnessScorer
from app.jobs.checkpoint import JobCheckpoint
from app.jobs.record import (CANCELLED, DONE, FAILED, RUNNING, ImageOutcome, Job, JobItem,
                             cancel_reason_text, error_dict)
from app.pipeline import (MethodRequest, StoredInputs, image_targets, predict, prediction_key,
                          visualization_key, visualize)
from visualizations.base import hook_ids
from visualizations.context import RunContext

if TYPE_CHECKING:
    from model_adapters.base import LoadedModel
    from app.jobs.resources import JobResources

log = logging.getLogger(__name__)


class VisualizeRun:
    """One visualization job's items, run in the thread that owns the device.

    ``steps()`` runs the job one unit at a time (a prediction, or one method for one target),
    so a backend can interleave several jobs; ``run()`` runs it whole. ``offer_turn`` (given by
    the backend) is called while a long computation reports progress, and may run other jobs'
    steps right there -- only while this model carries no hooks of a running method, so those
    steps' forward passes are never seen by this computation's hooks."""

    def __init__(self, services: "JobResources", job: Job, *,
                 stopping: Callable[[], bool] = lambda: False,
                 offer_turn: Callable[[], None] | None = None) -> None:
        self.services = services
        self.job = job
        self.spec = job.spec
        self.stopping = stopping
        self._offer_turn = offer_turn
        self._model: "LoadedModel | None" = None
        self._model_hooks: set[Any] = set()
        self._load_error: ConvscopeError | None = None
        self._checkpoint = JobCheckpoint(services, job, stopping).sync
        # One per job: each random reference is computed once per image x target, for all
        # of the job's methods.
        self._scorer = FaithfulnessScorer() if self.spec.faithfulness else None

    def model(self) -> "LoadedModel":
        """The job's model, loaded on first need. A load failure fails the whole job."""
        if self._load_error is not None:
            raise self._load_error
        if self._model is None:
            try:
                model = self.services.catalog.load(self.spec.model_id)
                if model.meta.sha256 and model.meta.sha256 != self.spec.checkpoint_sha256:
                    raise UnknownModel("The checkpoint changed after the job was submitted; "
                                       "submit it again.")
            except ConvscopeError as error:
                self._load_error = error
                raise
            self._model = model
            self._model_hooks = hook_ids(model.module)     # the model's own, if any
        return self._model

    def _job_level(self, error: BaseException) -> bool:
        return isinstance(error, Cancelled) or error is self._load_error

    def run(self) -> None:
        for _ in self.steps():
            pass

    def steps(self) -> Iterator[None]:
        for image_index, image_id in enumerate(self.spec.images):
            if self.services.jobs.cancel_requested(self.job) or self.stopping():
                self.job.cancel_event.set()
            if self.job.cancel_event.is_set():
                self._raise_cancelled()
            try:
                outcome, inputs = self._predict(image_index, image_id)
                true_index = outcome.true_label["index"] if outcome.true_label else None
                targets = image_targets(self._meta(), self.spec.targets, outcome.predicted,
                                        true_index)
            except ConvscopeError as error:
                if self._job_level(error):
                    raise
                self._fail_image(image_index, error)
                continue
            yield
            for method_index, method in enumerate(self.spec.methods):
                yield from self._run_item(self.job.item(image_index, method_index), image_id,
                                          method, targets, inputs)

    def _raise_cancelled(self) -> None:
        raise Cancelled(cancel_reason_text(self.stopping()))

    def _fail_image(self, image_index: int, error: ConvscopeError) -> None:
        with self.job.lock:
            for method_index in range(len(self.spec.methods)):
                item = self.job.item(image_index, method_index)
                item.status, item.error, item.progress = FAILED, error_dict(error), 1.0
        self.services.jobs.save(self.job)

    def _meta(self) -> Any:
        """The model's metadata: from the catalog's listing (no load needed), else the model."""
        entry = self.services.catalog.get(self.spec.model_id)
        return entry.meta if entry.meta is not None else self.model().meta

    # prediction: top-k and the model view, stored like any result

    def _predict(self, image_index: int, image_id: str) -> tuple[ImageOutcome, Any]:
        results = self.services.results
        top_k = self.services.settings.top_k
        with_uncertainty = self.services.settings.uncertainty
        key = prediction_key(image_id, self.spec.model, top_k, with_uncertainty)
        stored = results.get(key)
        if stored is None:
            model = self.model()
            inputs = predict(model, self.services.images.open(image_id), top_k,
                             with_uncertainty=with_uncertainty)
            stored = results.put(key, {**inputs.record(), "image": image_id,
                                       "checkpoint_sha256": self.spec.checkpoint_sha256},
                                 inputs.files())
            self._count(model_runs=1)
        else:
            results.touch(key)
            inputs = StoredInputs(lambda name: results.file(key, name)[0], self.model)
            self._count(cache_hits=1)
        true_index = self.spec.true_labels.get(image_id)
        predicted = int(stored.record["predicted"])
        true_label = None
        if true_index is not None:
            true_label = {"index": true_index, "label": self._meta().class_names[true_index],
                          "probability": float(inputs.probabilities[true_index])}
        outcome = ImageOutcome(key, predicted, list(stored.record["predictions"]), true_label,
                               failure=true_index is not None and true_index != predicted,
                               uncertainty=stored.record.get("uncertainty"))
        with self.job.lock:
            self.job.images[image_index] = outcome
        self.services.jobs.save(self.job)
        return outcome, inputs

    # one image x one method

    def _run_item(self, item: JobItem, image_id: str, method: MethodRequest,
                  targets: list[int], inputs: Any) -> Iterator[None]:
        if self.job.cancel_event.is_set():
            self._raise_cancelled()
        with self.job.lock:
            item.status, item.progress = RUNNING, 0.0
        results = self.services.results
        try:
            for number, target in enumerate(targets):
                key = visualization_key(image_id, self.spec.model, method, target,
                                        faithfulness=self.spec.faithfulness)
                stored = results.get(key)
                if stored is None:
                    context = RunContext(progress=self._progress_callback(item, number,
                                                                          len(targets)),
                                         cancel_event=self.job.cancel_event,
                                         batch_size=self.services.settings.batch_size)
                    model = self.model()    # a load failure fails the job before any file read
                    visualization = self.services.visualizations.get(method.name)
                    panel_set = visualize(model, visualization, method, inputs, target, context,
                                          scorer=self._scorer)
                    stored = results.put(key, {**panel_set.record, "image": image_id,
                                               "checkpoint_sha256": self.spec.checkpoint_sha256},
                                         panel_set.files)
                    self._count(model_runs=1)
                else:
                    results.touch(key)
                    with self.job.lock:
                        item.cached += 1
                    self._count(cache_hits=1)
                with self.job.lock:
                    item.result_keys.append(key)
                    item.elapsed_ms += float(stored.record.get("elapsed_ms", 0.0))
                    item.progress = (number + 1) / len(targets)
                yield
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
                item.status, item.error, item.progress = FAILED, error_dict(error), 1.0
        except Exception:  # noqa: BLE001 -- record, keep the job and the executor going
            log.exception("visualization %s failed in job %s", method.name, self.job.id[:8])
            with self.job.lock:
                item.status, item.progress = FAILED, 1.0
                item.error = error_dict(Internal("This visualization failed unexpectedly; the "
                                                 "server log has details."))
        self.services.jobs.save(self.job)

    def _progress_callback(self, item: JobItem, number: int, count: int) -> Callable[[float], None]:
        def report(fraction: float) -> None:
            with self.job.lock:
                item.progress = (number + fraction) / count
            self._checkpoint()
            if (self._offer_turn is not None and self._model is not None
                    and hook_ids(self._model.module) == self._model_hooks):
                self._offer_turn()
        return report

    def _count(self, *, model_runs: int = 0, cache_hits: int = 0) -> None:
        with self.job.lock:
            self.job.model_runs += model_runs
            self.job.cache_hits += cache_hits
