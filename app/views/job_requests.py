"""A job request (the JSON body of ``POST /api/v1/jobs``, or the workbench form turned into
it) checked completely before anything is queued: model, images, methods, parameters, targets,
true labels and cost. Bad requests become the ConvscopeError a user should see; good ones a
``JobSpec`` the executor can run without checking anything again."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from app.errors import BadRequest, TooExpensive, UnknownModel
from app.faithfulness_scores import evaluations_per_target as faithfulness_cost
from app.jobs.spec import JobSpec
from app.pipeline import PREDICTED, MethodRequest, meta_fingerprint, method_request, target_spec
from app.stores import ImageStore

if TYPE_CHECKING:
    from app.settings import Settings


# The keys of one entry of "visualizations"; anything else is a typo the user should hear about
# (an ignored "param" would silently run the defaults).
_VISUALIZATION_KEYS = frozenset({"name", "params"})


def _limited_list(payload: Mapping[str, Any], name: str, limit: int, *,
                  required: bool = True) -> list[Any]:
    value = payload.get(name)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise BadRequest(f"{name!r} must be a non-empty list.", fields={name: "a non-empty list"})
    if len(value) > limit:
        raise BadRequest(f"{name!r} has {len(value)} entries; at most {limit} are allowed.",
                         fields={name: f"at most {limit} entries"})
    return value


def _display_names(raw: Any, image_ids: list[Any]) -> dict[str, str]:
    """The optional ``filenames`` field: {image id: the name this user uploaded it under}.

    The image store keeps one name per content hash, the latest upload's; when two users
    upload the same bytes under different names, a job names its images as its own user did.
    """
    from app.ingest import safe_display_name

    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(isinstance(name, str) for name in raw.values()):
        raise BadRequest("\"filenames\" must map image ids to file names.",
                         fields={"filenames": "{image id: file name}"})
    if any(image_id not in image_ids for image_id in raw):
        raise BadRequest("\"filenames\" names an image that is not in the job.",
                         fields={"filenames": "ids from \"images\""})
    return {image_id: safe_display_name(name) for image_id, name in raw.items()}


def parse_job_request(payload: Any, *, catalog: Any, images: ImageStore, settings: "Settings",
                      visualizations: Any) -> JobSpec:
    """Validate a job request (the JSON body of ``POST /api/v1/jobs``) into a ``JobSpec``.

    Raises the ConvscopeError a user should see: unknown model/image/method/class, bad
    parameters, a method that does not support the model, or a request over the cost cap.
    """
    if not isinstance(payload, Mapping):
        raise BadRequest("The job must be a JSON object.")
    known = {"model", "images", "visualizations", "targets", "true_labels", "filenames",
             "faithfulness"}
    unknown = sorted(set(payload) - known)
    if unknown:
        raise BadRequest(f"Unknown field {str(unknown[0])[:40]!r}; known: {', '.join(sorted(known))}.",
                         fields={str(name)[:40]: "unknown field" for name in unknown[:5]})
    model_ref = payload.get("model", "latest")
    if not isinstance(model_ref, str) or not model_ref:
        raise BadRequest("'model' must be a model id or \"latest\".", fields={"model": "an id"})
    entry = catalog.get(model_ref)
    if not entry.ok or entry.meta is None:
        raise entry.error or UnknownModel("This model could not be loaded.")
    meta = entry.meta

    image_ids = _limited_list(payload, "images", settings.max_images_per_job)
    named = _display_names(payload.get("filenames"), image_ids)
    filenames = []
    for image_id in image_ids:
        if not isinstance(image_id, str):
            raise BadRequest("Image ids must be strings.", fields={"images": "image ids"})
        stored = images.get(image_id)          # NotFound for unknown ids
        filenames.append(named.get(image_id) or stored.filename)
    if len(set(image_ids)) != len(image_ids):
        raise BadRequest("An image is listed twice.", fields={"images": "distinct image ids"})

    methods = []
    for raw in _limited_list(payload, "visualizations", len(visualizations)):
        if not isinstance(raw, Mapping) or not isinstance(raw.get("name"), str):
            raise BadRequest("Each visualization must be an object with a \"name\".",
                             fields={"visualizations": "[{\"name\", \"params\"}]"})
        unknown_keys = sorted(set(raw) - _VISUALIZATION_KEYS, key=str)
        if unknown_keys:
            shown = str(unknown_keys[0])[:40]
            raise BadRequest(f"Unknown field {shown!r} in a visualization; known: "
                             f"{', '.join(sorted(_VISUALIZATION_KEYS))}.",
                             fields={f"visualizations.{str(key)[:40]}": "unknown field"
                                     for key in unknown_keys[:5]})
        visualization = visualizations.get(raw["name"])
        request = method_request(visualization, raw.get("params") or {}, meta)
        if request.cost > settings.max_cost:
            raise TooExpensive(
                f"{visualization.title} with these parameters needs {request.cost} model "
                f"evaluations per image and target, over this server's limit of "
                f"{settings.max_cost}; make it cheaper with a larger window or stride, or fewer "
                "steps or samples.", fields={"visualizations": visualization.name})
        if request in methods:
            raise BadRequest(f"{visualization.name} is listed twice with the same parameters.",
                             fields={"visualizations": "distinct entries"})
        methods.append(request)

    targets: list[int | str] = []
    for raw in _limited_list(payload, "targets", settings.max_targets_per_job,
                             required=False) or [PREDICTED]:
        spec = target_spec(meta, raw)
        if spec not in targets:
            targets.append(spec)

    true_labels_raw = payload.get("true_labels") or {}
    if not isinstance(true_labels_raw, Mapping):
        raise BadRequest("\"true_labels\" must map image ids to labels.",
                         fields={"true_labels": "{image id: label}"})
    true_labels = {}
    for image_id, label in true_labels_raw.items():
        if image_id not in image_ids:
            raise BadRequest("\"true_labels\" names an image that is not in the job.",
                             fields={"true_labels": "ids from \"images\""})
        if label is None or label == "":
            continue
        true_labels[image_id] = meta.class_index(label)

    faithfulness = payload.get("faithfulness", settings.faithfulness)
    if not isinstance(faithfulness, bool):
        raise BadRequest("\"faithfulness\" must be true or false.",
                         fields={"faithfulness": "true or false"})

    scoring = faithfulness_cost(methods, meta) if faithfulness else 0
    _check_job_cost(methods, image_ids, targets, true_labels, settings, scoring)
    return JobSpec(model_id=entry.id, model_file=entry.file, checkpoint_sha256=entry.sha256,
                   meta_fingerprint=meta_fingerprint(meta), images=tuple(image_ids),
                   filenames=tuple(filenames), methods=tuple(methods), targets=tuple(targets),
                   true_labels=true_labels, faithfulness=faithfulness)


def _check_job_cost(methods: list[MethodRequest], image_ids: list[str],
                    targets: list[int | str], true_labels: Mapping[str, int],
                    settings: "Settings", scoring_per_target: int = 0) -> None:
    """Refuse a job whose total cost is over the job limit, before it is queued. Each image is
    counted with every requested target, plus its predicted and true class when it has a true
    label (a failure case gets panels for both); that is an upper bound.
    ``scoring_per_target``: what faithfulness scoring adds per image and target
    (``app.faithfulness_scores.evaluations_per_target``; 0 when it is off)."""
    per_target = sum(method.cost for method in methods) + scoring_per_target
    targets_in_all = sum(len(set(targets) | ({PREDICTED, true_labels[image_id]}
                                            if image_id in true_labels else set()))
                         for image_id in image_ids)
    total = per_target * targets_in_all
    if total > settings.max_job_cost:
        scoring = (f", {scoring_per_target:,} of each pair's for faithfulness scores"
                   if scoring_per_target else "")
        remedies = ("split it into smaller jobs, choose cheaper parameters or turn the "
                    "faithfulness scores off (\"faithfulness\": false)" if scoring_per_target
                    else "split it into smaller jobs or choose cheaper parameters")
        raise TooExpensive(
            f"This job needs up to {total:,} model evaluations ({len(methods)} methods, "
            f"{len(image_ids)} images, {targets_in_all} image-target pairs{scoring}), over this "
            f"server's limit of {settings.max_job_cost:,} per job; {remedies}.",
            fields={"visualizations": f"at most {settings.max_job_cost} evaluations per job"})
