"""Evaluating a model on a labelled dataset: every file through the model once, streamed.

The one engine behind ``convscope evaluate``, the server's evaluation jobs and anything that
needs a model's predictions on a whole dataset (accuracy per checkpoint, flips between
checkpoints). Each file takes the path an upload takes -- ``app.ingest.decode_image`` (the checks
and normalization of ``ingest_image``, without its PNG), ``LoadedModel.model_view``,
``to_tensor`` and ``predict`` -- so the probability here is the one a job on the same image finds.

Decoding overlaps the model: a bounded thread pool decodes and resizes files (Pillow releases the
GIL) at most ``depth`` images ahead, in order, while the calling thread runs batches through the
model; memory stays bounded however many files there are (decoded pictures in flight, plus a
few dozen bytes of record per image). ``Evaluation.steps()`` yields after every batch, so a job
backend can interleave other jobs and a caller can cancel between batches.

Results are cached in chunks: the files (in path order) are cut into chunks at content-defined
boundaries (where a hash of the path says so), and a chunk's key is the hash of its files'
paths, sizes, modification times and labels with the model's identity. A repeat finds every
chunk stored; a changed, added or removed file changes only its own chunk, which is read again.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from app.datasets import DatasetFile, LabelledDataset, Skipped, read_dataset_file
from app.errors import ConvscopeError, DatasetEmpty, ImageCorrupt
from app.evaluation_metrics import (ImageRecords, confidently_wrong_record, image_record,
                                    summarize)
from app.ingest import DEFAULT_MAX_BYTES, decode_image
from app.stores import result_key
from visualizations.common import as_model_input, prepare_model

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from app.pipeline import ModelIdentity
    from model_adapters.base import LoadedModel

log = logging.getLogger(__name__)

# Bumped when what an evaluation computes or stores changes (stored chunks are then not reused).
EVALUATION_VERSION = 1
CHUNK_EVERY = 128           # a chunk ends on average every CHUNK_EVERY files ...
CHUNK_MAX = 1024            # ... and at the latest after CHUNK_MAX
MIN_TOP_K = 5               # top-5 accuracy needs at least five classes per image
STEP_SECONDS = 1.0          # a CPU batch is sized to take about this long


# --- chunks and their cache ---------------------------------------------------------------------

@dataclass(frozen=True)
class Chunk:
    start: int
    stop: int
    key: str


class ChunkCache(Protocol):
    """Stored chunk results (``app.evaluation_store.StoreChunkCache`` keeps them in the
    ``ResultStore``)."""

    def get(self, key: str) -> tuple[ImageRecords, list[Skipped]] | None: ...

    def put(self, key: str, records: ImageRecords, skipped: list[Skipped]) -> None: ...


def _boundary(path: str) -> bool:
    digest = hashlib.blake2b(path.encode("utf-8", "surrogateescape"), digest_size=4).digest()
    return int.from_bytes(digest, "little") % CHUNK_EVERY == 0


def plan_chunks(dataset: LabelledDataset, identity: "ModelIdentity", top_k: int) -> list[Chunk]:
    """The dataset's files cut into chunks, each keyed by its files' versions and the model."""
    files = dataset.files
    chunks, start = [], 0
    for number, file in enumerate(files):
        if _boundary(file.path) or number + 1 - start >= CHUNK_MAX or number + 1 == len(files):
            entries = [[f.path, f.size, f.mtime_ns, int(t)]
                       for f, t in zip(files[start:number + 1],
                                       dataset.targets[start:number + 1])]
            key = result_key(kind="evaluation-chunk", version=EVALUATION_VERSION,
                             checkpoint=identity.checkpoint_sha256,
                             meta=identity.meta_fingerprint, top_k=top_k, files=entries)
            chunks.append(Chunk(start, number + 1, key))
            start = number + 1
    return chunks


def evaluation_key(chunks: Sequence[Chunk], identity: "ModelIdentity", top_k: int) -> str:
    """The whole evaluation's key: its chunks' keys are the dataset's content fingerprint."""
    return result_key(kind="evaluation", version=EVALUATION_VERSION,
                      checkpoint=identity.checkpoint_sha256, meta=identity.meta_fingerprint,
                      top_k=top_k, chunks=[chunk.key for chunk in chunks])


# --- decoding -----------------------------------------------------------------------------------

def decode_view(model: "LoadedModel", root: Any, file: DatasetFile) -> "Image.Image":
    """One dataset file as the model sees it (raises the file's coded error)."""
    data = read_dataset_file(root, file.path, DEFAULT_MAX_BYTES)
    image, _ = decode_image(data)
    return model.model_view(image)


def _decode_or_error(model: "LoadedModel", root: Any, file: DatasetFile) -> Any:
    try:
        return decode_view(model, root, file)
    except ConvscopeError as error:
        return error
    except Exception:  # noqa: BLE001 -- one bad file never stops the run
        log.warning("decoding %s failed unexpectedly", file.path, exc_info=True)
        return ImageCorrupt("The image could not be decoded.")


def default_workers(device_type: str = "cpu") -> int:
    """Decoding threads: on a GPU up to 8 cores (the GPU must never wait on JPEG decoding); on
    the CPU the cores torch leaves free, at least 2 (one may wait on the disk)."""
    import torch

    cores = os.cpu_count() or 2
    if device_type == "cuda":
        return max(2, min(8, cores))
    return max(2, min(8, cores - torch.get_num_threads()))


class Prefetcher:
    """Runs ``work(item)`` on a bounded thread pool at most ``depth`` items ahead, in order."""

    def __init__(self, items: Iterator[Any], work: Callable[[Any], Any], *, workers: int,
                 depth: int) -> None:
        self._items = items
        self._work = work
        self._depth = max(1, depth)
        self._pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="convscope-decode")
        self._queue: deque[tuple[Any, Future]] = deque()
        self._exhausted = False

    def _fill(self) -> None:
        while not self._exhausted and len(self._queue) < self._depth:
            try:
                item = next(self._items)
            except StopIteration:
                self._exhausted = True
                return
            self._queue.append((item, self._pool.submit(self._work, item)))

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        self._fill()
        while self._queue:
            item, future = self._queue.popleft()
            self._fill()
            yield item, future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# --- the evaluation -----------------------------------------------------------------------------

class _Pending:
    """A chunk being read: each file's outcome by position, until all are in."""

    def __init__(self, chunk: Chunk, k: int) -> None:
        size = chunk.stop - chunk.start
        self.chunk = chunk
        self.left = size
        self.done = np.zeros(size, dtype=bool)
        self.top_indices = np.zeros((size, k), dtype=np.int64)
        self.top_probabilities = np.zeros((size, k), dtype=np.float32)
        self.true_probabilities = np.zeros(size, dtype=np.float32)
        self.skipped: list[Skipped] = []


class Evaluation:
    """One model on one labelled dataset. ``steps()`` does the work one batch at a time (and
    yields); then ``records`` and ``skipped`` hold the outcome, in file order.

    ``load_model`` is called only if some chunk is not in ``cache``: a repeat never loads it.
    """

    def __init__(self, load_model: Callable[[], "LoadedModel"], identity: "ModelIdentity",
                 dataset: LabelledDataset, *, num_classes: int, top_k: int = 5,
                 cache: ChunkCache | None = None, batch_size: int | None = None,
                 workers: int | None = None) -> None:
        self.dataset = dataset
        self.k = min(max(top_k, MIN_TOP_K), num_classes)
        self.top_k = top_k
        self.chunks = plan_chunks(dataset, identity, top_k)
        self.key = evaluation_key(self.chunks, identity, top_k)
        self._load_model = load_model
        self._cache = cache
        self._fixed_batch = batch_size
        self._workers = workers
        self.total = len(dataset.files)
        self.done = 0
        self.computed = 0               # files read and run through the model
        self.reused = 0                 # files answered by stored chunks
        self._parts: dict[int, tuple[ImageRecords, list[Skipped]]] = {}
        self.records: ImageRecords | None = None
        self.skipped: list[Skipped] = []

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0

    def run(self) -> ImageRecords:
        for _ in self.steps():
            pass
        assert self.records is not None
        return self.records

    def steps(self) -> Iterator[None]:
        missing = []
        for number, chunk in enumerate(self.chunks):
            stored = self._cache.get(chunk.key) if self._cache is not None else None
            if stored is None:
                missing.append(number)
            else:
                self._parts[number] = stored
                self.done += chunk.stop - chunk.start
                self.reused += chunk.stop - chunk.start
        if missing:
            yield from self._read(missing)
        parts = [self._parts[number] for number in range(len(self.chunks))]
        self.records = ImageRecords.concatenate([records for records, _ in parts], self.k)
        self.skipped = [entry for _, skipped in parts for entry in skipped]
        self.skipped += self.dataset.scan.skipped
        self.skipped.sort(key=lambda entry: entry.file)
        if not len(self.records):
            first = self.skipped[0] if self.skipped else None
            detail = f" (first: {first.file}: {first.code})" if first else ""
            raise DatasetEmpty(f"None of the dataset's {self.total} files is a readable "
                               f"image{detail}.", fields={"dataset": self.dataset.scan.name})

    def _read(self, missing: list[int]) -> Iterator[None]:
        model = self._load_model()
        with model.lock:
            prepare_model(model)    # channels-last: 1.4-1.9x faster forward passes on CPU
        root = self.dataset.scan.root
        pending = {number: _Pending(self.chunks[number], self.k) for number in missing}
        items = ((number, position) for number in missing
                 for position in range(self.chunks[number].start, self.chunks[number].stop))
        batch_size = self._fixed_batch or (64 if model.device.type == "cuda" else 8)
        prefetcher = Prefetcher(
            items, lambda item: _decode_or_error(model, root, self.dataset.files[item[1]]),
            workers=self._workers or default_workers(model.device.type),
            depth=2 * max(batch_size, 32))
        try:
            batch: list[tuple[int, int, Any]] = []
            for (number, position), outcome in prefetcher:
                if isinstance(outcome, ConvscopeError):
                    self._skip(pending, number, position, outcome)
                else:
                    batch.append((number, position, outcome))
                if len(batch) >= batch_size:
                    batch_size = self._run_batch(model, pending, batch, batch_size)
                    batch = []
                    yield
            if batch:
                self._run_batch(model, pending, batch, batch_size)
                yield
        finally:
            prefetcher.close()
        assert not pending, "every chunk is finished"

    def _skip(self, pending: dict[int, _Pending], number: int, position: int,
              error: ConvscopeError) -> None:
        part = pending[number]
        part.skipped.append(Skipped.of(self.dataset.files[position].path, error))
        self._account(pending, number, 1)

    def _run_batch(self, model: "LoadedModel", pending: dict[int, _Pending],
                   batch: list[tuple[int, int, Any]], batch_size: int) -> int:
        """Predict one batch, record it, and return the next batch's size."""
        started = time.perf_counter()
        tensor = as_model_input(model.to_tensor([view for _, _, view in batch]))
        probabilities = model.predict(tensor)
        top = self._top(probabilities)
        positions = [position for _, position, _ in batch]
        targets = self.dataset.targets[positions]
        true_probabilities = probabilities.gather(
            1, _as_index(targets, probabilities.device)).squeeze(1).float().cpu().numpy()
        top_probabilities, top_indices = top
        for row, (number, position, _) in enumerate(batch):
            part = pending[number]
            offset = position - part.chunk.start
            part.top_indices[offset] = top_indices[row]
            part.top_probabilities[offset] = top_probabilities[row]
            part.true_probabilities[offset] = true_probabilities[row]
            part.done[offset] = True
            self.computed += 1
            self._account(pending, number, 1)
        if self._fixed_batch or model.device.type == "cuda":
            return batch_size
        per_image = (time.perf_counter() - started) / len(batch)
        return int(min(32, max(4, STEP_SECONDS / max(per_image, 1e-4))))

    def _top(self, probabilities: "torch.Tensor") -> tuple[np.ndarray, np.ndarray]:
        values, indices = probabilities.topk(self.k, dim=1)
        return values.float().cpu().numpy(), indices.cpu().numpy().astype(np.int64)

    def _account(self, pending: dict[int, _Pending], number: int, count: int) -> None:
        part = pending[number]
        part.left -= count
        self.done += count
        if part.left:
            return
        chunk = part.chunk
        kept = np.flatnonzero(part.done)
        files = self.dataset.files
        records = ImageRecords(tuple(files[chunk.start + offset].path for offset in kept),
                               self.dataset.targets[chunk.start + kept],
                               part.top_indices[kept], part.top_probabilities[kept],
                               part.true_probabilities[kept])
        if self._cache is not None:
            self._cache.put(chunk.key, records, part.skipped)
        self._parts[number] = (records, part.skipped)
        del pending[number]


def _as_index(targets: np.ndarray, device: Any) -> "torch.Tensor":
    import torch

    return torch.as_tensor(targets, dtype=torch.int64, device=device).unsqueeze(1)


# --- the evaluation.json document ---------------------------------------------------------------

def model_record(meta: Any) -> dict[str, Any]:
    return {"file": meta.checkpoint_file, "sha256": meta.sha256,
            "architecture": meta.architecture, "num_classes": meta.num_classes}


def dataset_record(dataset: LabelledDataset, records: ImageRecords,
                   class_names: Sequence[str]) -> dict[str, Any]:
    scan = dataset.scan
    # "path": the name here, never where the server keeps it; the CLI puts the path it was given.
    return {"name": scan.name, "path": scan.name, "layout": scan.layout,
            "images": len(records), "files": len(scan.files) + len(scan.skipped),
            "classes": [class_names[index] for index in dataset.classes]}


def evaluation_document(summary: dict[str, Any], records: ImageRecords,
                        class_names: Sequence[str], top_k: int) -> dict[str, Any]:
    """``summary`` (``summarize`` plus model, dataset, skipped) with its images named by file and
    the per-image list: the ``evaluation.json`` object."""
    document = dict(summary)
    document["images"] = [image_record(records, number, class_names, top_k)
                          for number in range(len(records))]
    document["failures"] = [records.paths[number] for number in summary["failures"]]
    document["least_certain_correct"] = [records.paths[number]
                                         for number in summary["least_certain_correct"]]
    document["confidently_wrong"] = confidently_wrong_record(records)
    return document


def summary_of(evaluation: Evaluation, meta: Any) -> dict[str, Any]:
    """The stored summary of a finished evaluation: metrics, model, dataset, skipped, counts."""
    records = evaluation.records
    assert records is not None
    names = meta.class_names
    summary = {"model": model_record(meta),
               "dataset": dataset_record(evaluation.dataset, records, names),
               **summarize(records, evaluation.dataset.classes, names),
               "skipped": [entry.to_dict() for entry in evaluation.skipped],
               "top_k": evaluation.top_k, "version": EVALUATION_VERSION}
    return summary
