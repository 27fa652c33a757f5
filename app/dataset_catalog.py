"""The datasets a server offers: each subfolder of one root (``CONVSCOPE_DATASET_DIR``, or the
bundled sample set when serving the bundled demo), by an opaque id looked up in a listing --
never by a path from a URL. Links among the subfolders count only when they stay inside the
root."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from app.datasets import DatasetScan, entry_kind, match_labels, scan_dataset
from app.errors import ConvscopeError, DatasetNotFound

if TYPE_CHECKING:
    from model_adapters.base import ModelMeta


@dataclass(frozen=True)
class DatasetEntry:
    id: str             # opaque: a hash of the folder name
    name: str
    path: Path


def dataset_id(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def default_dataset_root(settings: Any) -> Path | None:
    """``CONVSCOPE_DATASET_DIR``; unset, the bundled sample set when serving the bundled demo."""
    if settings.dataset_dir is not None:
        return Path(settings.dataset_dir)
    if settings.checkpoint_dir is None:
        from app.catalog import demo_directory

        return demo_directory() / "datasets"
    return None


class DatasetCatalog:
    """The datasets under one root: each subfolder (links only when they stay inside)."""

    def __init__(self, root: Path | None, max_images: int) -> None:
        self.root = Path(os.path.realpath(root)) if root is not None else None
        self.max_images = max_images

    @classmethod
    def from_settings(cls, settings: Any) -> "DatasetCatalog":
        return cls(default_dataset_root(settings), settings.max_dataset_images)

    def entries(self) -> list[DatasetEntry]:
        if self.root is None:
            return []
        try:
            listed = sorted(os.scandir(self.root), key=lambda entry: entry.name)
        except OSError:
            return []
        found = []
        for entry in listed:
            if entry.name.startswith("."):
                continue
            kind, real = entry_kind(self.root, entry)
            if kind == "dir":
                found.append(DatasetEntry(dataset_id(entry.name), entry.name, Path(real)))
        return found

    def get(self, wanted: Any) -> DatasetEntry:
        """The dataset with this id (or folder name): looked up in the listing."""
        if isinstance(wanted, str):
            for entry in self.entries():
                if wanted in (entry.id, entry.name):
                    return entry
        raise DatasetNotFound("There is no dataset with this id.",
                              fields={"dataset": "an id from GET /api/v1/datasets"})

    def scan(self, entry: DatasetEntry, *, with_stats: bool = True) -> DatasetScan:
        return scan_dataset(entry.path, max_images=self.max_images, with_stats=with_stats)

    def summary(self, entry: DatasetEntry, meta: "ModelMeta | None" = None) -> dict[str, Any]:
        """``{"id", "name", "images", "classes", "layout", "skipped", "error"}`` for listings
        (one scan, without stats), and with a model's ``meta`` its ``problem``: why the
        dataset cannot be evaluated with that model, or None."""
        record: dict[str, Any] = {"id": entry.id, "name": entry.name, "images": 0,
                                  "classes": [], "layout": None, "skipped": 0, "error": None}
        try:
            scan = self.scan(entry, with_stats=False)
        except ConvscopeError as error:
            record["error"] = {"code": error.code, "message": error.message}
            return record
        record.update(images=len(scan.files), classes=list(scan.labels), layout=scan.layout,
                      skipped=len(scan.skipped))
        if meta is not None:
            record["problem"] = labels_problem(scan, meta)
        return record


def labels_problem(scan: DatasetScan, meta: "ModelMeta") -> dict[str, str] | None:
    """The coded reason this dataset cannot be evaluated with this model, or None."""
    try:
        match_labels(scan, meta)
    except ConvscopeError as error:
        return {"code": error.code, "message": error.message}
    return None
