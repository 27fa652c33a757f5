"""The checkpoint listing as workers publish it, for web processes that never load a model.

In broker mode (``CONVSCOPE_BROKER_URL``) only ``convscope worker`` processes scan and load the
checkpoint directory; after each scan that changed anything they write the listing -- every
entry with its metadata, error and training progress -- to ``<data dir>/catalog.json``
(``publish_catalog``). Web processes read it through ``PublishedCatalog``, which offers what the
views use of ``app.catalog.ModelCatalog`` (entries, get, in_training_order) and refuses to load.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from app import errors
from app.catalog import CatalogEntry, entries_in_training_order, find_entry
from app.checkpoint_order import TrainingProgress
from app.errors import ConvscopeError, Internal
from app.stores import atomic_write_bytes
from model_adapters import ModelMeta

log = logging.getLogger(__name__)

FILE_NAME = "catalog.json"
_TUPLE_FIELDS = {f.name for f in dataclasses.fields(ModelMeta) if "tuple" in str(f.type)}
_ERRORS = {cls.code: cls for cls in vars(errors).values()
           if isinstance(cls, type) and issubclass(cls, ConvscopeError)}


def entry_record(entry: CatalogEntry) -> dict[str, Any]:
    return {"id": entry.id, "file": entry.file, "ok": entry.ok, "latest": entry.latest,
            "modified": entry.modified, "size": entry.size, "sha256": entry.sha256,
            "meta": dataclasses.asdict(entry.meta) if entry.meta is not None else None,
            "error": ({"code": entry.error.code, "message": entry.error.message}
                      if entry.error is not None else None),
            "progress": (dataclasses.asdict(entry.progress)
                         if entry.progress is not None else None)}


def entry_from_record(record: dict[str, Any]) -> CatalogEntry:
    meta = record["meta"]
    if meta is not None:
        meta = ModelMeta(**{key: tuple(value) if key in _TUPLE_FIELDS and value is not None
                            else value for key, value in meta.items()})
    error = record["error"]
    if error is not None:
        error = _ERRORS.get(error["code"], ConvscopeError)(error["message"])
    progress = record["progress"]
    return CatalogEntry(
        id=record["id"], file=record["file"], ok=record["ok"], latest=record["latest"],
        modified=record["modified"], size=record["size"], sha256=record["sha256"],
        meta=meta, error=error,
        progress=TrainingProgress(**progress) if progress is not None else None)


def publish_catalog(entries: list[CatalogEntry], data_dir: Path) -> bool:
    """Write the listing when it differs from the published one; True when written."""
    path = Path(data_dir) / FILE_NAME
    body = json.dumps({"entries": [entry_record(entry) for entry in entries]},
                      sort_keys=True).encode()
    try:
        if path.read_bytes() == body:
            return False
    except OSError:
        pass
    atomic_write_bytes(path, body)
    return True


class PublishedCatalog:
    """The listing a worker published, re-read whenever the file changes."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / FILE_NAME
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._entries: list[CatalogEntry] = []

    def wait(self, timeout: float) -> bool:
        """Whether a listing has been published (waiting up to ``timeout`` seconds)."""
        deadline = time.monotonic() + timeout
        while True:
            if self._read():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))

    def entries(self) -> list[CatalogEntry]:
        self._read()
        with self._lock:
            return list(self._entries)

    def get(self, entry_id: str) -> CatalogEntry:
        return find_entry(self.entries(), entry_id)

    def in_training_order(self) -> list[CatalogEntry]:
        return entries_in_training_order(self.entries())

    def refresh(self) -> None:
        self._read()

    def load(self, entry_id: str, *, remember: bool = True) -> Any:
        raise Internal("A web process in broker mode does not load models; workers do.")

    def _read(self) -> bool:
        """Re-read the file when its size or mtime changed; whether a listing is known."""
        try:
            stat = os.stat(self.path)
        except OSError:
            with self._lock:
                return self._stamp is not None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp == self._stamp:
                return True
        try:
            document = json.loads(self.path.read_bytes())
            entries = [entry_from_record(record) for record in document["entries"]]
        except (OSError, ValueError, KeyError, TypeError):
            log.warning("the published checkpoint listing %s is unreadable", self.path)
            with self._lock:
                return self._stamp is not None
        with self._lock:
            self._stamp, self._entries = stamp, entries
        return True
