"""The "sanity: passed/failed (rho = ...)" link of a method on a checkpoint: what every panel
(``app.views.presenters.job_view``) and the ``/models`` page show once a sanity check of that
method with those parameters exists (``app.sanity.latest_key`` points to the latest)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from flask import url_for

from app.pipeline import ModelIdentity
from app.sanity import latest_key

if TYPE_CHECKING:
    from app.services import Services


def panel_sanity(svc: "Services", model: ModelIdentity, name: str, params: Mapping[str, Any],
                 version: int) -> dict[str, Any] | None:
    """``{"passed", "spearman", "url"}`` of the latest sanity check of this method with these
    parameters on the job's checkpoint, or None when there is none (each panel shows it)."""
    pointer = svc.results.get(latest_key(model, name, version, params))
    if pointer is None or not svc.results.exists(pointer.record["outcome_key"]):
        return None
    return {"passed": bool(pointer.record["passed"]),
            "spearman": float(pointer.record["spearman"]),
            "url": url_for("sanity.result", key=pointer.record["outcome_key"])}
