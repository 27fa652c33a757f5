"""``Services``: everything jobs run against and requests read, built once per process.

The flaskr ``get_db`` pattern: the app factory builds one ``Services`` and keeps it in
``app.extensions``; views get it through ``services(current_app)``. This module imports no view
and no Flask, so views import it downward, and a process without a web app (a worker) can build
the same bundle.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.jobs.store import JobStore
from app.settings import Settings
from app.stores import ImageStore, ResultStore

if TYPE_CHECKING:
    import torch

    from app.jobs.backend import JobBackend

EXTENSION = "convscope"
CATALOG_WAIT_S = 5.0


@dataclass
class Services:
    """Settings, the device, the model catalog, the method registry and the stores; plus, in a
    web process, the backend that runs its jobs (set once by the app factory)."""

    settings: Settings
    device: "torch.device"
    catalog: Any                    # app.catalog.ModelCatalog (or a test double)
    visualizations: Any             # visualizations.visualization_registry
    images: ImageStore
    results: ResultStore
    jobs: JobStore
    executor: "JobBackend | None" = None

    def scanned_catalog(self) -> Any:
        """The model catalog once the backend has scanned it; 503 ``E_NOT_READY`` until then
        (after waiting ``CATALOG_WAIT_S``): a first scan loads every checkpoint, which an HTTP
        thread must never do itself."""
        from app.errors import NotReady

        if self.executor is not None and not self.executor.wait_for_catalog(CATALOG_WAIT_S):
            raise NotReady("The server is still scanning the checkpoint directory; try again "
                           "shortly.", headers={"Retry-After": "2"})
        return self.catalog

    def shutdown(self, timeout: float = 30.0) -> None:
        """Cancel queued/running jobs with a recorded status and stop the backend."""
        if self.executor is not None:
            self.executor.shutdown(timeout)


def build_services(settings: Settings, *, catalog: Any = None,
                   web_only: bool = False) -> Services:
    """Resolve the device (DeviceUnavailable here, at startup), open the catalog and stores.

    ``web_only``: a web process whose jobs run on workers (broker mode) -- it never touches a
    device and reads the checkpoint listing the workers publish (``app.published_catalog``)."""
    import torch

    from app.devices import configure_threads, resolve_device
    from app.jobs.kinds import spec_from_record
    from app.published_catalog import PublishedCatalog
    from visualizations import visualization_registry

    configure_threads()
    device = torch.device("cpu") if web_only else resolve_device(settings.device)
    if catalog is None:
        catalog = (PublishedCatalog(settings.data_dir) if web_only
                   else _build_catalog(settings, device))
    data = settings.data_dir
    return Services(settings, device, catalog, visualization_registry,
                    ImageStore(data / "images"), ResultStore(data / "results"),
                    JobStore(data / "jobs", spec_from_record))


def _build_catalog(settings: Settings, device: Any) -> Any:
    from app.catalog import ModelCatalog, demo_directory

    directory = settings.checkpoint_dir or demo_directory()
    # Never stale for HTTP threads: the job backend rescans (and loads new files) on the
    # device's thread; see Executor._refresh_catalog.
    return ModelCatalog(Path(directory), device, trust_code=settings.trust_code,
                        rescan_seconds=float("inf"))


def services(app: Any) -> Services:
    """The app's ``Services`` (``app``: a Flask app, usually ``flask.current_app``)."""
    return app.extensions[EXTENSION]
