"""A timeline request (``POST /api/v1/timelines``, or the Timeline page's form turned into it),
checked completely before anything is queued.

::

    {"images": [image id, ...],                   # uploaded (POST /api/v1/images) or samples
     "visualizations": [{"name", "params"?}],     # as in POST /api/v1/jobs
     "targets"?: ["predicted" | index | label],   # "predicted": at the last checkpoint
     "checkpoints"?: [model id, ...],             # default: every listed checkpoint
     "every"?: K,                                 # every K-th (the first and the last always)
     "dataset"?: dataset id}                      # accuracy, recall and flips per checkpoint

Images, methods, parameters and targets are validated exactly as a visualization job's are
(``app.views.job_requests``), against the latest loadable checkpoint; the checkpoints are taken
in training order (``ModelCatalog.in_training_order``), failed ones included so the timeline
reports them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from app.checkpoint_order import every_kth, training_progress
from app.errors import BadRequest, NotFinished, NotFound, ResultExpired
from app.jobs.timeline import TimelineCheckpoint, TimelineSpec
from app.pipeline import meta_fingerprint
from app.views.job_requests import parse_job_request

if TYPE_CHECKING:
    from app.jobs.record import Job
    from app.services import Services

KNOWN_FIELDS = {"images", "filenames", "visualizations", "targets", "checkpoints", "every",
                "dataset"}
MAX_CHECKPOINTS = 200


def parse_timeline_request(payload: Any, services: "Services") -> TimelineSpec:
    if not isinstance(payload, Mapping):
        raise BadRequest("The timeline must be a JSON object.")
    unknown = sorted(str(name)[:40] for name in set(payload) - KNOWN_FIELDS)
    if unknown:
        raise BadRequest(f"Unknown field {unknown[0]!r}; known: {', '.join(sorted(KNOWN_FIELDS))}.",
                         fields={name: "unknown field" for name in unknown[:5]})
    catalog = services.scanned_catalog()
    ordered = catalog.in_training_order()
    wanted = payload.get("checkpoints")
    if wanted is not None:
        if not isinstance(wanted, list) or not wanted or not all(isinstance(w, str)
                                                                 for w in wanted):
            raise BadRequest("'checkpoints' must be a non-empty list of model ids.",
                             fields={"checkpoints": "model ids"})
        known = {entry.id for entry in ordered}
        missing = [w for w in wanted if w not in known]
        if missing:
            raise NotFound(f"Unknown model {missing[0][:40]!r}.",
                           fields={"checkpoints": "ids from GET /api/v1/models"})
        ordered = [entry for entry in ordered if entry.id in set(wanted)]
    every = payload.get("every", 1)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise BadRequest("'every' must be a positive integer.", fields={"every": "1 or more"})
    ordered = every_kth(ordered, every)
    if not ordered:
        raise NotFound("The checkpoint directory has no checkpoints.")
    if len(ordered) > MAX_CHECKPOINTS:
        raise BadRequest(f"{len(ordered)} checkpoints are selected; a timeline takes at most "
                         f"{MAX_CHECKPOINTS} (use 'every').", fields={"every": "larger"})
    latest = next((entry for entry in reversed(ordered) if entry.ok), None)
    if latest is None:
        first = ordered[-1]
        raise first.error or NotFound("None of the selected checkpoints loads.")
    job = parse_job_request(
        {"model": latest.id, "images": payload.get("images"),
         "filenames": payload.get("filenames"),
         "visualizations": payload.get("visualizations"), "targets": payload.get("targets")},
        catalog=catalog, images=services.images, settings=services.settings,
        visualizations=services.visualizations)
    # parse_job_request capped the cost on one checkpoint; MAX_CHECKPOINTS bounds the rest.
    dataset_id = dataset_name = None
    if payload.get("dataset"):
        from app.dataset_catalog import DatasetCatalog
        from app.datasets import match_labels

        if not isinstance(payload["dataset"], str):
            raise BadRequest("'dataset' must be a dataset id.", fields={"dataset": "an id"})
        datasets = DatasetCatalog.from_settings(services.settings)
        dataset = datasets.get(payload["dataset"])
        match_labels(datasets.scan(dataset, with_stats=False), latest.meta)
        dataset_id, dataset_name = dataset.id, dataset.name
    checkpoints = []
    for entry in ordered:
        progress = entry.progress or training_progress(entry.file, entry.modified)
        checkpoints.append(TimelineCheckpoint(
            model_id=entry.id, file=entry.file, sha256=entry.sha256,
            meta_fingerprint=meta_fingerprint(entry.meta) if entry.meta is not None else "",
            epoch=progress.epoch, step=progress.step, order_by=progress.order_by))
    return TimelineSpec(checkpoints=tuple(checkpoints), images=job.images,
                        filenames=job.filenames, methods=job.methods, targets=job.targets,
                        dataset_id=dataset_id, dataset_name=dataset_name)


def timeline_job(services: "Services", job_id: str) -> "Job":
    """The timeline job with this id (NotFound for any other kind of job)."""
    job = services.jobs.get(job_id)
    if job.kind != TimelineSpec.kind:
        raise NotFound("There is no timeline with this id.")
    return job


def timeline_outcome(services: "Services", job: "Job") -> dict[str, Any]:
    """A done timeline's stored document (409 while it runs, 410 once evicted)."""
    if job.status != "done" or not job.outcome_key:
        raise NotFinished("The timeline has not finished; wait until it is done.")
    stored = services.results.get(job.outcome_key)
    if stored is None:
        raise ResultExpired("This timeline's results have expired; run it again.")
    return stored.record
