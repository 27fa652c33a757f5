"""Evaluations in the ``ResultStore``: the chunks an ``Evaluation`` caches, and its outcome.

Both are ordinary content-addressed results: a ``result.json`` record (file paths, skipped
files, and for an outcome its summary and class names) and ``records.npz`` with the per-image
arrays (``ImageRecords``). Outcomes are read often (every page, thumbnail and Explain) and never
change, so the last few read are kept parsed in memory.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from app.datasets import Skipped
from app.errors import ConvscopeError
from app.evaluation import evaluation_document
from app.evaluation_metrics import ImageRecords
from app.stores import ResultStore

RECORDS_FILE = "records.npz"
_PARSED_OUTCOMES = 4


def _npz_bytes(records: ImageRecords) -> bytes:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **records.arrays())
    return buffer.getvalue()


def _read_records(results: ResultStore, key: str, paths: Sequence[str]) -> ImageRecords:
    path, _ = results.file(key, RECORDS_FILE)
    with np.load(path, allow_pickle=False) as arrays:
        return ImageRecords.from_arrays(paths, arrays)


class StoreChunkCache:
    """``app.evaluation.ChunkCache`` in a ``ResultStore``."""

    def __init__(self, results: ResultStore) -> None:
        self.results = results

    def get(self, key: str) -> tuple[ImageRecords, list[Skipped]] | None:
        stored = self.results.get(key)
        if stored is None:
            return None
        try:
            records = _read_records(self.results, key, stored.record["paths"])
        except (OSError, ValueError, KeyError, ConvscopeError):
            return None         # evicted or damaged meanwhile: read the files again
        self.results.touch(key)
        skipped = [Skipped(entry["file"], entry["code"], entry["message"])
                   for entry in stored.record.get("skipped", [])]
        return records, skipped

    def put(self, key: str, records: ImageRecords, skipped: list[Skipped]) -> None:
        self.results.put(key, {"kind": "evaluation-chunk", "paths": list(records.paths),
                               "skipped": [entry.to_dict() for entry in skipped]},
                         {RECORDS_FILE: _npz_bytes(records)})


@dataclass(frozen=True)
class EvaluationOutcome:
    """A finished evaluation as stored: its summary, class names and per-image records."""

    key: str
    summary: Mapping[str, Any]
    class_names: tuple[str, ...]
    records: ImageRecords

    def document(self) -> dict[str, Any]:
        """The ``evaluation.json`` object (per-image list included)."""
        summary = {name: value for name, value in self.summary.items()
                   if name not in ("kind", "key", "files", "stored_at", "paths", "class_names")}
        return evaluation_document(summary, self.records, self.class_names,
                                   int(self.summary["top_k"]))


def store_outcome(results: ResultStore, key: str, summary: Mapping[str, Any],
                  records: ImageRecords, class_names: Sequence[str]) -> None:
    results.put(key, {"kind": "evaluation", **summary, "class_names": list(class_names),
                      "paths": list(records.paths)}, {RECORDS_FILE: _npz_bytes(records)})


_parsed: OrderedDict[tuple[str, str], EvaluationOutcome] = OrderedDict()
_parsed_lock = threading.Lock()


def load_outcome(results: ResultStore, key: str) -> EvaluationOutcome | None:
    """The outcome stored under ``key``; None when it was evicted (or never stored)."""
    cache_key = (str(results.root), key)
    with _parsed_lock:
        outcome = _parsed.get(cache_key)
        if outcome is not None:
            _parsed.move_to_end(cache_key)
    if outcome is not None and results.exists(key):
        return outcome
    stored = results.get(key)
    if stored is None:
        return None
    try:
        records = _read_records(results, key, stored.record["paths"])
    except (OSError, ValueError, KeyError, ConvscopeError):
        return None
    outcome = EvaluationOutcome(key, stored.record, tuple(stored.record["class_names"]), records)
    with _parsed_lock:
        _parsed[cache_key] = outcome
        while len(_parsed) > _PARSED_OUTCOMES:
            _parsed.popitem(last=False)
    return outcome
