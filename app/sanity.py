"""What the sanity check's callers share: the CLI (``app.sanity_cli``) and the job kind
(``app.jobs.sanity``) validate a request, bound its cost and name its stored result the same way.

* ``sanity_request``: a method and raw parameters, validated and resolved for one model -- the
  same ``MethodRequest`` a visualization job carries;
* ``check_cost``: the whole check's model evaluations (``visualizations.sanity.sanity_cost``)
  against ``CONVSCOPE_MAX_COST`` (E_TOO_EXPENSIVE above). The CLI counts the model's real
  randomization steps; the web side, which never loads a model, counts the upper bound
  (``MAX_STEPS``);
* ``sanity_key`` names one check's outcome: checkpoint sha x preprocessing x method (and its
  version) x resolved parameters x the images x seed -- a repeat is answered from the store;
* ``latest_key`` names a pointer to the latest outcome for checkpoint x method x parameters
  (whatever the images), which every panel of that method on that checkpoint links to.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from app.errors import TooExpensive
from app.pipeline import MethodRequest, ModelIdentity, method_request
from app.stores import result_key

if TYPE_CHECKING:
    from model_adapters.base import ModelMeta
    from visualizations.base import Visualization

# Bumped when a stored sanity outcome's record changes shape or meaning.
SANITY_VERSION = 1
SEED = 0
# Images a check runs on when the request names none (the first bundled sample photos).
DEFAULT_IMAGES = 2
MAX_IMAGES = 8


def sanity_request(visualization: "Visualization", raw_params: Any,
                   meta: "ModelMeta") -> MethodRequest:
    """Validated, resolved parameters (E_METHOD_UNSUPPORTED, E_BAD_PARAMETER)."""
    return method_request(visualization, raw_params, meta)


def max_cost_from_env() -> int:
    """``CONVSCOPE_MAX_COST`` as the server reads it (default and validation from Settings)."""
    import os

    from app.settings import Settings, _convert, env_name

    field = next(f for f in dataclasses.fields(Settings) if f.name == "max_cost")
    raw = os.environ.get(env_name("max_cost"))
    return int(field.default if raw is None else _convert(field, raw, env_name("max_cost")))


def check_cost(visualization: "Visualization", request: MethodRequest, meta: "ModelMeta",
               images: int, limit: int, steps: int | None = None) -> int:
    """The check's model evaluations; E_TOO_EXPENSIVE when over ``limit``."""
    from visualizations.sanity import sanity_cost

    params = visualization.parse_params(request.params, meta)
    cost = sanity_cost(visualization, params, meta, images, steps)
    if cost > limit:
        counted = "" if steps is not None else " (counting the most randomization steps)"
        raise TooExpensive(
            f"A sanity check of {visualization.title} on {images} image"
            f"{'s' if images != 1 else ''} needs {cost:,} model evaluations{counted}, over the "
            f"limit of {limit:,} (CONVSCOPE_MAX_COST); use fewer images or cheaper parameters, "
            "or raise the limit.", fields={"method": visualization.name})
    return cost


def sanity_key(model: ModelIdentity, request: MethodRequest, image_ids: Sequence[str],
               seed: int = SEED) -> str:
    return result_key(kind="sanity", version=SANITY_VERSION, checkpoint=model.checkpoint_sha256,
                      meta=model.meta_fingerprint, method=request.name,
                      method_version=request.version, params=dict(request.params),
                      images=list(image_ids), seed=seed)


def latest_key(model: ModelIdentity, method: str, method_version: int,
               params: Mapping[str, Any]) -> str:
    return result_key(kind="sanity-latest", version=SANITY_VERSION,
                      checkpoint=model.checkpoint_sha256, meta=model.meta_fingerprint,
                      method=method, method_version=method_version, params=dict(params))
