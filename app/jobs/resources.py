"""What a job's run uses of its process's ``app.services.Services``, as a protocol: the jobs
package never imports ``app.services`` (which builds the job store from ``app.jobs.kinds``), so
imports keep pointing one way."""
from __future__ import annotations

from typing import Any, Protocol

from app.jobs.store import JobStore
from app.settings import Settings
from app.stores import ImageStore, ResultStore


class JobResources(Protocol):
    settings: Settings
    catalog: Any                    # app.catalog.ModelCatalog
    visualizations: Any             # visualizations.visualization_registry
    images: ImageStore
    results: ResultStore
    jobs: JobStore
