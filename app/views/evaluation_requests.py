"""Requests of dataset mode, checked completely before anything is queued: an evaluation
(``POST /api/v1/evaluations``: model and dataset, its labels matched against the model's
classes before any model pass) and an Explain (``POST .../explain``: chosen images of a finished
evaluation become an ordinary visualization job with their true labels, so each failure gets
panels for its true and its predicted class)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from app.dataset_catalog import DatasetCatalog
from app.datasets import match_labels, read_dataset_file
from app.errors import (BadRequest, ConvscopeError, NotFinished, NotFound, ResultExpired,
                        UnknownModel)
from app.evaluation_store import EvaluationOutcome, load_outcome
from app.ingest import DEFAULT_MAX_BYTES, ingest_image
from app.jobs.evaluate import EvaluateSpec
from app.jobs.spec import JobSpec
from app.pipeline import meta_fingerprint
from app.views.job_requests import parse_job_request

if TYPE_CHECKING:
    from app.jobs.record import Job
    from app.services import Services

DEFAULT_EXPLAIN_METHODS = ({"name": "grad_cam"},)


def _object(payload: Any, known: set[str], what: str) -> Mapping[str, Any]:
    if not isinstance(payload, Mapping):
        raise BadRequest(f"The {what} must be a JSON object.")
    unknown = sorted(str(name)[:40] for name in set(payload) - known)
    if unknown:
        raise BadRequest(f"Unknown field {unknown[0]!r}; known: {', '.join(sorted(known))}.",
                         fields={name: "unknown field" for name in unknown[:5]})
    return payload


def parse_evaluation_request(payload: Any, services: "Services") -> EvaluateSpec:
    """``{"model", "dataset", "top_k"?}`` -> a spec; raises the coded error a user should see
    (unknown model or dataset, E_DATASET_EMPTY, E_DATASET_LABELS, E_DATASET_TOO_LARGE)."""
    payload = _object(payload, {"model", "dataset", "top_k"}, "evaluation")
    model_ref = payload.get("model", "latest")
    if not isinstance(model_ref, str) or not model_ref:
        raise BadRequest("'model' must be a model id or \"latest\".", fields={"model": "an id"})
    entry = services.scanned_catalog().get(model_ref)
    if not entry.ok or entry.meta is None:
        raise entry.error or UnknownModel("This model could not be loaded.")
    meta = entry.meta
    if not isinstance(payload.get("dataset"), str) or not payload["dataset"]:
        raise BadRequest("'dataset' must be a dataset id from GET /api/v1/datasets.",
                         fields={"dataset": "a dataset id"})
    datasets = DatasetCatalog.from_settings(services.settings)
    dataset = datasets.get(payload["dataset"])
    match_labels(datasets.scan(dataset, with_stats=False), meta)
    top_k = payload.get("top_k", services.settings.top_k)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 100:
        raise BadRequest("'top_k' must be an integer from 1 to 100.",
                         fields={"top_k": "1 to 100"})
    return EvaluateSpec(model_id=entry.id, model_file=entry.file, checkpoint_sha256=entry.sha256,
                        meta_fingerprint=meta_fingerprint(meta), dataset_id=dataset.id,
                        dataset_name=dataset.name, top_k=min(top_k, meta.num_classes))


def evaluation_job(services: "Services", job_id: str) -> "Job":
    """The evaluation job with this id (NotFound for any other kind of job)."""
    job = services.jobs.get(job_id)
    if job.kind != EvaluateSpec.kind:
        raise NotFound("There is no evaluation with this id.")
    return job


def finished_outcome(services: "Services", job: "Job") -> EvaluationOutcome:
    """A done evaluation's stored outcome (409 while it runs, 410 once evicted)."""
    if job.status != "done" or not job.outcome_key:
        raise NotFinished("The evaluation has not finished; wait until it is done.")
    outcome = load_outcome(services.results, job.outcome_key)
    if outcome is None:
        raise ResultExpired("This evaluation's results have expired and were removed; run it "
                            "again.")
    return outcome


def _numbers(raw: Any, count: int) -> list[int]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'images' must be a non-empty list of image numbers.",
                         fields={"images": "numbers from the evaluation's images"})
    numbers = []
    for value in raw:
        if isinstance(value, str) and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
            raise BadRequest("An image number is not one of this evaluation's images.",
                             fields={"images": f"numbers from 0 to {count - 1}"})
        if value not in numbers:
            numbers.append(value)
    return numbers


def parse_explain_request(payload: Any, job: "Job", services: "Services") -> JobSpec:
    """``{"images": [numbers], "visualizations"?: [...]}`` -> a visualization job on those
    images, each read from the dataset again and stored like an upload, with its true label."""
    payload = _object(payload, {"images", "visualizations"}, "request")
    outcome = finished_outcome(services, job)
    records = outcome.records
    numbers = _numbers(payload.get("images"), len(records))
    if len(numbers) > services.settings.max_images_per_job:
        raise BadRequest(f"{len(numbers)} images are selected; one job explains at most "
                         f"{services.settings.max_images_per_job}.",
                         fields={"images": f"at most {services.settings.max_images_per_job}"})
    datasets = DatasetCatalog.from_settings(services.settings)
    root = datasets.get(job.spec.dataset_id).path
    image_ids: list[str] = []
    filenames: dict[str, str] = {}
    true_labels: dict[str, int] = {}
    for number in numbers:
        path = records.paths[number]
        try:
            data = read_dataset_file(root, path, DEFAULT_MAX_BYTES)
            stored = services.images.put(ingest_image(data, path.rsplit("/", 1)[-1]))
        except ConvscopeError as error:
            raise type(error)(f"{path}: {error.message}", fields={"images": path}) from None
        if stored.id in true_labels:
            continue            # the same picture twice in the dataset
        image_ids.append(stored.id)
        filenames[stored.id] = path.replace("/", " \u203a ")
        true_labels[stored.id] = int(records.targets[number])
    request = {"model": job.spec.model_id, "images": image_ids, "filenames": filenames,
               "visualizations": payload.get("visualizations") or list(DEFAULT_EXPLAIN_METHODS),
               "targets": ["predicted"], "true_labels": true_labels}
    return parse_job_request(request, catalog=services.scanned_catalog(), images=services.images,
                             settings=services.settings, visualizations=services.visualizations)
