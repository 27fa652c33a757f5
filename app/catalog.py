"""The checkpoint directory as a live catalog: what is there, what loaded, which is latest.

A scan is cheap (``os.scandir`` + ``stat``), so it runs again whenever the listing is older than
``rescan_seconds``: a training run writing ``epoch_12.pt`` shows up without a restart, and
deleted or rewritten files drop out or reload. Each file version is keyed by
``(name, size, mtime_ns)`` and is only loaded once it has *settled* -- unmodified for
``settle_seconds``, or seen with the same size and mtime for that long -- so a half-written file
is not loaded, and any version (good or broken) is loaded at most once -- except after the device
ran out of memory, which is retried every ``retry_seconds``.

Loading a file is the only way to learn its metadata (architecture, classes, CAM layers), so a
scan loads every new file once; the metadata of all files stays, while the modules themselves
live in a small LRU so a directory of many checkpoints does not exhaust memory. A caller walking
many checkpoints (a timeline) loads with ``remember=False`` so it never fills that LRU.

Each file's training progress (``app.checkpoint_order``: epoch/step stored in its wrapper, else
its name, else its mtime) is read at the same time, without running code; ``in_training_order``
lists the entries by it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any

import torch

from app.checkpoint_order import (TrainingProgress, in_training_order, read_progress,
                                  training_progress)
from app.errors import CheckpointUnreadable, ConvscopeError, DeviceOOM, UnknownModel
from model_adapters import LoadedModel, ModelMeta, load_checkpoint
from model_adapters.checkpoint_file import CHECKPOINT_SUFFIXES
from model_adapters.config import CONFIG_FILE_NAME, CheckpointConfig, read_config

log = logging.getLogger(__name__)

LATEST = "latest"


def demo_directory() -> Path:
    """The bundled demo checkpoint directory (its convscope.toml names packaged weights)."""
    return Path(__file__).resolve().parent.parent / "demo"


@dataclass(frozen=True)
class CatalogEntry:
    """One checkpoint file as listed: loaded (``meta``) or failed (``error``)."""

    id: str                          # opaque: hash of file name + content; never a path
    file: str                        # name relative to the directory
    ok: bool
    latest: bool
    modified: float                  # mtime, seconds since the epoch
    size: int
    sha256: str
    meta: ModelMeta | None
    error: ConvscopeError | None
    progress: TrainingProgress | None = None     # how far training had got (None: config error)

    def to_dict(self) -> dict[str, Any]:
        meta = self.meta
        return {
            "id": self.id, "file": self.file, "latest": self.latest, "ok": self.ok,
            "architecture": meta.architecture if meta else None,
            "num_classes": meta.num_classes if meta else None,
            "input_size": [meta.channels, *meta.input_size] if meta else None,
            "modified": self.modified,
            "error": ({"code": self.error.code, "message": self.error.message}
                      if self.error is not None else None),
        }


@dataclass(frozen=True)
class _FileState:
    path: Path
    name: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class _Loaded:
    """The outcome of loading one file version (kept for as long as that version exists)."""

    key: tuple[Any, ...]
    sha256: str
    meta: ModelMeta | None
    error: ConvscopeError | None
    retry_at: float | None = None   # monotonic time to load again after a transient failure
    progress: TrainingProgress | None = None


class ModelCatalog:
    """Thread-safe, self-refreshing view of a checkpoint directory."""

    def __init__(self, directory: Path, device: torch.device, trust_code: bool = False, *,
                 settle_seconds: float = 1.0, rescan_seconds: float = 1.5,
                 max_loaded: int = 3, retry_seconds: float = 30.0) -> None:
        self.directory = Path(directory)
        self.device = device
        self.trust_code = trust_code
        self.settle_seconds = settle_seconds
        self.rescan_seconds = rescan_seconds
        self.max_loaded = max(1, max_loaded)
        self.retry_seconds = retry_seconds
        self._state_lock = threading.RLock()   # guards the fields below
        self._scan_lock = threading.Lock()     # one scan at a time
        self._load_lock = threading.Lock()     # one model load at a time (memory, device)
        self._entries: list[CatalogEntry] = []
        self._entry_keys: dict[str, tuple[Any, ...]] = {}   # entry id -> load key
        self._results: dict[str, _Loaded] = {}               # file name -> current outcome
        self._first_seen: dict[str, tuple[int, int, float]] = {}  # name -> size, mtime, when
        self._models: OrderedDict[tuple[Any, ...], LoadedModel] = OrderedDict()
        self._config_stamp: tuple[Any, ...] | None = None
        self._config: CheckpointConfig | None = None
        self._config_error: ConvscopeError | None = None
        self._scanned_at: float | None = None

    # --- public --------------------------------------------------------------------------

    def entries(self) -> list[CatalogEntry]:
        """All settled checkpoints, newest first (rescanning when the listing is stale)."""
        self._refresh_if_stale()
        with self._state_lock:
            return list(self._entries)

    def get(self, entry_id: str) -> CatalogEntry:
        """The entry with this id, or the latest loadable one for ``"latest"``."""
        return find_entry(self.entries(), entry_id)

    def in_training_order(self) -> list[CatalogEntry]:
        """All settled checkpoints, first-trained first (``app.checkpoint_order``); files that
        failed to load keep their place by name or time."""
        return entries_in_training_order(self.entries())

    def load(self, entry_id: str, *, remember: bool = True) -> LoadedModel:
        """The loaded model for an entry (cached; reloaded from disk after LRU eviction).
        ``remember=False`` returns a cached model when there is one but does not cache a new
        load, so walking many checkpoints keeps at most one of them alive (the caller's)."""
        entry = self.get(entry_id)
        if entry.error is not None:
            raise entry.error
        with self._state_lock:
            key = self._entry_keys[entry.id]
            cached = self._models.get(key)
            if cached is not None:
                self._models.move_to_end(key)
                return cached
        with self._load_lock:
            with self._state_lock:  # another thread may have loaded it meanwhile
                if key in self._models:
                    return self._models[key]
            path = self._path_of(entry.file)
            if (path is None or self._stat_key(path, entry.file) != key[:3]
                    or key[3] != self._config_stamp):
                raise UnknownModel(f"The checkpoint {entry.file!r} changed on disk; "
                                   "pick it again from the model list.")
            loaded = load_checkpoint(path, self._config, self.device, trust_code=self.trust_code)
            loaded.meta = _with_file_facts(loaded.meta, entry.file, entry.sha256, entry.modified)
            if remember:
                self._remember(key, loaded)
            return loaded

    def refresh(self) -> None:
        """Rescan now (blocking until this scan is done)."""
        with self._scan_lock:
            self._scan()

    # --- scanning ------------------------------------------------------------------------

    def _refresh_if_stale(self) -> None:
        with self._state_lock:
            scanned_at = self._scanned_at
        if scanned_at is not None and time.monotonic() - scanned_at < self.rescan_seconds:
            return
        # With a listing already there, never queue behind a running scan: serve the last one.
        if self._scan_lock.acquire(blocking=scanned_at is None):
            try:
                self._scan()
            finally:
                self._scan_lock.release()

    def _scan(self) -> None:
        self._read_config()
        files = self._candidate_files()
        now_wall, now_mono = time.time(), time.monotonic()
        names = {state.name for state in files}
        results: dict[str, _Loaded] = {}
        for state in files:
            key = self._key(state)
            previous = self._results.get(state.name)
            if previous is not None and previous.key == key and (
                    previous.retry_at is None or now_mono < previous.retry_at):
                results[state.name] = previous
                continue
            if not self._settled(state, now_wall, now_mono):
                if previous is not None:  # being rewritten: keep listing the last version
                    results[state.name] = previous
                continue
            outcome = self._load_version(state, key)
            if outcome is not None:
                results[state.name] = outcome
            elif previous is not None:
                results[state.name] = previous
        self._first_seen = {name: seen for name, seen in self._first_seen.items() if name in names}
        if not files and self._config_error is not None:
            # Listed with size 0 and mtime 0, like a file: (name, size, mtime_ns).
            results[CONFIG_FILE_NAME] = _Loaded((CONFIG_FILE_NAME, 0, 0), "", None,
                                                self._config_error)
        self._publish(results)

    def _settled(self, state: _FileState, now_wall: float, now_mono: float) -> bool:
        if now_wall - state.mtime_ns / 1e9 >= self.settle_seconds:
            return True
        seen = self._first_seen.get(state.name)
        if seen is None or seen[:2] != (state.size, state.mtime_ns):
            self._first_seen[state.name] = (state.size, state.mtime_ns, now_mono)
            return self.settle_seconds <= 0
        return now_mono - seen[2] >= self.settle_seconds

    def _load_version(self, state: _FileState, key: tuple[Any, ...]) -> _Loaded | None:
        """Hash and load one settled file version; None if it changed while we read it."""
        try:
            sha256 = _sha256(state.path)
        except OSError:
            return None
        meta: ModelMeta | None = None
        error: ConvscopeError | None = self._config_error
        if error is None:
            with self._load_lock:
                try:
                    loaded = load_checkpoint(state.path, self._config, self.device,
                                             trust_code=self.trust_code)
                except ConvscopeError as failure:
                    error = failure
                except Exception:  # noqa: BLE001 -- one bad file must not stop the others
                    log.exception("Loading %s failed unexpectedly.", state.name)
                    error = CheckpointUnreadable(f"The checkpoint {state.name!r} could not be "
                                                 "loaded.")
                else:
                    meta = _with_file_facts(loaded.meta, state.name, sha256,
                                            state.mtime_ns / 1e9)
                    loaded.meta = meta
        if self._stat_key(state.path, state.name) != key[:3]:
            log.info("%s changed while loading; will retry when it settles.", state.name)
            return None
        if meta is not None:
            self._remember(key, loaded)
        else:
            log.info("%s: %s %s", state.name, error.code if error else "?",
                     error.message if error else "")
        # Running out of device memory says nothing about the file (another job held the
        # memory): load this version again later instead of listing it as broken for good.
        retry_at = time.monotonic() + self.retry_seconds if isinstance(error, DeviceOOM) else None
        progress = read_progress(state.path, state.mtime_ns / 1e9)
        return _Loaded(key, sha256, meta, error, retry_at, progress)

    def _publish(self, results: dict[str, _Loaded]) -> None:
        entries = []
        entry_keys = {}
        for name, outcome in results.items():
            _, size, mtime_ns = outcome.key[:3]
            entry_id = hashlib.sha256(f"{name}\0{outcome.sha256}".encode()).hexdigest()[:12]
            entries.append(CatalogEntry(
                id=entry_id, file=name, ok=outcome.meta is not None, latest=False,
                modified=mtime_ns / 1e9, size=size,
                sha256=outcome.sha256, meta=outcome.meta, error=outcome.error,
                progress=outcome.progress))
            entry_keys[entry_id] = outcome.key
        entries.sort(key=lambda entry: (entry.modified, entry.file), reverse=True)
        for index, entry in enumerate(entries):
            if entry.ok:  # newest loadable one
                entries[index] = dataclasses.replace(entry, latest=True)
                break
        with self._state_lock:
            live_keys = set(entry_keys.values())
            for key in [key for key in self._models if key not in live_keys]:
                del self._models[key]
            self._results = results
            self._entries = entries
            self._entry_keys = entry_keys
            self._scanned_at = time.monotonic()

    # --- files and config ----------------------------------------------------------------

    def _read_config(self) -> None:
        """Re-parse convscope.toml when it (or labels.txt) changed; a change reloads every
        checkpoint, since both shape every model."""
        stamp = tuple(_stamp(self.directory / name) for name in (CONFIG_FILE_NAME, "labels.txt"))
        if self._config is not None and self._config.labels_file is not None:
            try:
                stamp += (_stamp(self._config.labels_path()),)  # type: ignore[arg-type]
            except ConvscopeError:
                pass
        if stamp == self._config_stamp and (self._config is not None or self._config_error):
            return
        self._config_stamp = stamp
        try:
            self._config, self._config_error = read_config(self.directory), None
            self._config.weights_path()  # a bad `weights` is a config error for every file
        except ConvscopeError as error:
            self._config, self._config_error = None, error

    def _candidate_files(self) -> list[_FileState]:
        files = []
        for path, name in checkpoint_files(self.directory, self._config):
            state = self._file_state(path, name)
            if state is not None:
                files.append(state)
        return files

    @staticmethod
    def _file_state(path: Path, name: str) -> _FileState | None:
        try:
            stat = path.stat()
        except OSError:
            return None
        if not S_ISREG(stat.st_mode):
            return None
        return _FileState(path, name, stat.st_size, stat.st_mtime_ns)

    def _key(self, state: _FileState) -> tuple[Any, ...]:
        return (state.name, state.size, state.mtime_ns, self._config_stamp)

    @staticmethod
    def _stat_key(path: Path, name: str) -> tuple[Any, ...] | None:
        """``(name, size, mtime_ns)``: the first three fields of a load key."""
        stamp = _stamp(path)
        return None if stamp is None else (name, *stamp)

    def _path_of(self, name: str) -> Path | None:
        if self._config is not None and self._config.model.weights is not None:
            return self._config.weights_path()
        path = self.directory / name
        return path if path.is_file() else None

    def _remember(self, key: tuple[Any, ...], loaded: LoadedModel) -> None:
        with self._state_lock:
            self._models[key] = loaded
            self._models.move_to_end(key)
            while len(self._models) > self.max_loaded:
                self._models.popitem(last=False)


def find_entry(entries: list[CatalogEntry], entry_id: str) -> CatalogEntry:
    """The entry with this id, or the latest loadable one for ``"latest"``."""
    for entry in entries:
        if (entry_id == LATEST and entry.latest) or entry.id == entry_id:
            return entry
    if entry_id == LATEST:
        raise UnknownModel("No checkpoint in the directory has loaded successfully.")
    raise UnknownModel(f"Unknown model {str(entry_id)[:40]!r}.",
                       fields={"model": "an id from the model list, or 'latest'"})


def entries_in_training_order(entries: list[CatalogEntry]) -> list[CatalogEntry]:
    return in_training_order(
        entries, lambda entry: entry.progress or training_progress(entry.file, entry.modified),
        lambda entry: entry.file)


def checkpoint_files(directory: Path, config: CheckpointConfig | None) -> list[tuple[Path, str]]:
    """(path, name) of every file the catalog lists: the config's ``weights`` file alone, else
    the directory's checkpoint files (links only when they point inside the directory)."""
    if config is not None and config.model.weights is not None:
        path = config.weights_path()
        assert path is not None
        return [(path, path.name)]
    try:
        listing = list(os.scandir(directory))
    except OSError:
        log.warning("The checkpoint directory cannot be listed.")
        return []
    root = Path(directory).resolve()
    files = []
    for item in listing:
        if item.name.startswith(".") or not item.name.endswith(CHECKPOINT_SUFFIXES):
            continue
        path = Path(item.path)
        if item.is_symlink():
            try:  # a link may point anywhere; only list targets inside the directory
                path.resolve(strict=True).relative_to(root)
            except (OSError, ValueError, RuntimeError):
                log.info("Skipping %s: a symlink to outside the directory.", item.name)
                continue
        files.append((path, item.name))
    return files


def file_sha256(path: Path) -> str:
    return _sha256(path)


def with_file_facts(meta: ModelMeta, name: str, sha256: str, modified: float) -> ModelMeta:
    """``meta`` naming the checkpoint file it was loaded from (as the catalog's models do)."""
    return _with_file_facts(meta, name, sha256, modified)


def _with_file_facts(meta: ModelMeta, name: str, sha256: str, modified: float) -> ModelMeta:
    return dataclasses.replace(meta, checkpoint_file=name, sha256=sha256, mtime=modified)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["CatalogEntry", "ModelCatalog", "checkpoint_files", "demo_directory", "file_sha256",
           "with_file_facts", "LATEST"]
