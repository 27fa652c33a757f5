"""On-disk stores under the data directory: uploaded images and visualization results.

Both are content-addressed (an image's id is the sha256 of its normalized PNG; a result's id is
the sha256 of everything that determines it), so asking twice stores once. Every write is atomic
(a temp file or directory, then ``os.replace``): a crash never leaves a half-written entry that a
later request could serve. Ids from URLs are looked up in an index built by listing the store's
directory; they are never joined into a path, so ``..`` or an absolute path is simply "not found".

Entries age by last use (a result reused by a job, an image uploaded again or used by a job is
"touched"); ``app.retention`` evicts by age and size. An evicted id leaves a tombstone (an
empty file named by the id, in ``.expired/``), so its URL answers 410 ``E_RESULT_EXPIRED``
instead of a bare 404.

Layout::

    images/<sha256>.png          normalized RGB PNG
    images/<sha256>.json         {"filename", "width", "height"}
    results/<key>/result.json    what was computed, with the list of files beside it
    results/<key>/<file>         PNGs and .npy arrays named in result.json
    images/.expired/<sha256>     tombstones of evicted images (results/.expired likewise)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from app.errors import NotFound, ResultExpired, StorageFull

if TYPE_CHECKING:
    from PIL import Image

    from app.ingest import IngestedImage

log = logging.getLogger(__name__)

_HEX_ID = re.compile(r"[0-9a-f]{64}")
TOMBSTONES = ".expired"
STALE_TEMPORARY_S = 3600.0       # a .tmp-* entry this old was left by a crash
# Names of files inside a result directory: chosen by us, checked again when serving.
_RESULT_FILE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# 2: one panel record shape for the server and the CLI (overlay/heatmap/array at top level).
STORE_FORMAT = 2


def _storage_error(error: OSError) -> Exception:
    import errno

    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("The server's storage is full; results cannot be saved.")
    return error


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either nothing or the whole file."""
    temporary = path.with_name(f".tmp-{secrets.token_hex(8)}-{path.name}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise _storage_error(error) from error


def atomic_write_json(path: Path, value: Any) -> None:
    atomic_write_bytes(path, json.dumps(value, indent=1, sort_keys=True).encode("utf-8"))


class DirectoryIndex:
    """id -> path for the entries of one directory, refreshed by listing it on a miss.

    Listing (rather than ``root / user_id``) is what makes lookups safe; refreshing on a miss
    lets several server processes share one data directory.
    """

    def __init__(self, root: Path, suffix: str, is_dir: bool,
                 id_pattern: "re.Pattern[str]" = _HEX_ID) -> None:
        self.root, self.suffix, self.is_dir = root, suffix, is_dir
        self._pattern = id_pattern
        self._paths: dict[str, Path] = {}
        self._lock = threading.Lock()
        self.refresh()

    def refresh(self) -> None:
        found: dict[str, Path] = {}
        with os.scandir(self.root) as entries:
            for entry in entries:
                if not entry.name.endswith(self.suffix) or entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False) != self.is_dir or entry.is_symlink():
                    continue
                found[entry.name[: len(entry.name) - len(self.suffix)]] = Path(entry.path)
        with self._lock:
            self._paths = found

    def add(self, entry_id: str, path: Path) -> None:
        with self._lock:
            self._paths[entry_id] = path

    def discard(self, entry_id: str) -> None:
        with self._lock:
            self._paths.pop(entry_id, None)

    def lookup(self, entry_id: str) -> Path | None:
        if not isinstance(entry_id, str) or not self._pattern.fullmatch(entry_id):
            return None
        with self._lock:
            path = self._paths.get(entry_id)
        if path is not None and not os.path.lexists(path):
            path = None         # evicted, possibly by another server process
        if path is None:
            self.refresh()
            with self._lock:
                path = self._paths.get(entry_id)
        return path

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._paths)


class Tombstones:
    """Ids evicted from one store: empty files in ``<root>/.expired``, named by the id.

    Lookups use a set read from the directory listing (re-read when the directory changes),
    so a user-supplied id is only ever compared, never joined into a path; ids written here
    come from the store's own listing.
    """

    def __init__(self, store_root: Path, id_pattern: "re.Pattern[str]" = _HEX_ID) -> None:
        self.root = Path(store_root) / TOMBSTONES
        self._pattern = id_pattern
        self._names: set[str] = set()
        self._stamp: int | None = None
        self._lock = threading.Lock()

    def _current(self) -> set[str]:
        try:
            stamp = os.stat(self.root).st_mtime_ns
        except OSError:
            return set()
        with self._lock:
            if stamp != self._stamp:
                with os.scandir(self.root) as entries:
                    self._names = {entry.name for entry in entries
                                   if self._pattern.fullmatch(entry.name)}
                self._stamp = stamp
            return self._names

    def __contains__(self, entry_id: object) -> bool:
        return (isinstance(entry_id, str) and self._pattern.fullmatch(entry_id) is not None
                and entry_id in self._current())

    def add(self, entry_id: str) -> None:
        assert self._pattern.fullmatch(entry_id)
        try:
            self.root.mkdir(exist_ok=True)
            (self.root / entry_id).touch()
        except OSError:
            log.warning("cannot record that %s expired", entry_id[:12])
            return
        with self._lock:        # seen at once here even if the directory's mtime is coarse
            self._names.add(entry_id)

    def discard(self, entry_id: str) -> None:
        """The id exists again (uploaded or computed anew)."""
        if entry_id in self:
            (self.root / entry_id).unlink(missing_ok=True)
            with self._lock:
                self._names.discard(entry_id)

    def prune(self, older_than: float, keep_at_most: int) -> int:
        """Forget tombstones older than ``older_than`` (Unix time) and all but the newest
        ``keep_at_most``; returns how many were removed."""
        try:
            with os.scandir(self.root) as entries:
                stamped = [(entry.stat().st_mtime, entry.path) for entry in entries]
        except OSError:
            return 0
        stamped.sort(reverse=True)
        doomed = [path for number, (mtime, path) in enumerate(stamped)
                  if mtime < older_than or number >= keep_at_most]
        for path in doomed:
            try:
                os.unlink(path)
            except OSError:
                pass
        return len(doomed)


@dataclass(frozen=True)
class StoredEntry:
    """One evictable entry of a store: its id, when it was last used and its size on disk."""

    id: str
    last_used: float
    size: int


def remove_stale_temporaries(root: Path, now: float) -> None:
    """Delete ``.tmp-*`` files and directories that a crashed write left behind."""
    try:
        with os.scandir(root) as entries:
            stale = [entry for entry in entries if entry.name.startswith(".tmp-")
                     and entry.stat(follow_symlinks=False).st_mtime < now - STALE_TEMPORARY_S]
    except OSError:
        return
    for entry in stale:
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass        # evicted meanwhile: nothing to keep alive


class _IndexedStore:
    """What both stores share: a directory of entries found through a ``DirectoryIndex``,
    tombstones for evicted ids, and last use (mtime) / size for ``app.retention``."""

    def __init__(self, root: Path, suffix: str, is_dir: bool) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index = DirectoryIndex(self.root, suffix, is_dir=is_dir)
        self.tombstones = Tombstones(self.root)
        self.bytes_written = 0          # by this process; app.retention watches it

    def _size(self, path: Path) -> int:
        """Bytes on disk of the entry at ``path`` (OSError when it is gone)."""
        raise NotImplementedError

    def _remove(self, path: Path) -> None:
        raise NotImplementedError

    def exists(self, entry_id: str) -> bool:
        return self._index.lookup(entry_id) is not None

    def touch(self, entry_id: str) -> None:
        """Mark an entry as in use (a job needs or reused it), so eviction takes it last."""
        path = self._index.lookup(entry_id)
        if path is not None:
            _touch(path)

    def entries(self) -> list[StoredEntry]:
        """Every stored entry with its last use (its mtime) and its size."""
        self._index.refresh()
        found = []
        for entry_id in self._index.ids():
            path = self.root / f"{entry_id}{self._index.suffix}"
            try:
                found.append(StoredEntry(entry_id, path.stat().st_mtime, self._size(path)))
            except OSError:
                continue        # evicted meanwhile
        return found

    def delete(self, entry_id: str) -> None:
        """Remove an entry, leaving a tombstone so its URLs say it expired."""
        path = self._index.lookup(entry_id)
        self._index.discard(entry_id)
        if path is not None:
            self.tombstones.add(entry_id)
            self._remove(path)


# --- images ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageRecord:
    id: str
    filename: str
    width: int
    height: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "filename": self.filename, "width": self.width,
                "height": self.height}


class ImageStore(_IndexedStore):
    """Normalized uploads by content hash. The PNG bytes come from ``app.ingest``; this class
    only stores and finds them. Last use is the PNG's mtime; size is PNG + JSON."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, ".png", is_dir=False)

    def put(self, ingested: "IngestedImage") -> ImageRecord:
        record = ImageRecord(ingested.sha256, ingested.filename, ingested.width, ingested.height)
        png_path = self.root / f"{record.id}.png"
        # The id is our own hash of the bytes, not one from a URL: a stat of our own path says
        # whether it is stored, where a lookup would list the whole directory on every new image.
        if not png_path.is_file():
            atomic_write_bytes(png_path, ingested.png_bytes)
            self.bytes_written += len(ingested.png_bytes)
            self.tombstones.discard(record.id)
        else:
            _touch(png_path)            # uploaded again: in use
        # The display name of the latest upload of these bytes; jobs keep their own copy.
        atomic_write_json(self.root / f"{record.id}.json", record.to_dict())
        self._index.add(record.id, png_path)
        return record

    def _missing(self, image_id: str) -> Exception:
        if image_id in self.tombstones:
            return ResultExpired("This image has expired and was removed; upload it again.",
                                 fields={"image": "an id returned by POST /api/v1/images"})
        return NotFound("Unknown image id; upload the image first.",
                        fields={"image": "an id returned by POST /api/v1/images"})

    def get(self, image_id: str) -> ImageRecord:
        path = self._index.lookup(image_id)
        if path is None:
            raise self._missing(image_id)
        try:
            meta = json.loads(path.with_suffix(".json").read_text("utf-8"))
            return ImageRecord(image_id, str(meta["filename"]), int(meta["width"]),
                               int(meta["height"]))
        except (OSError, ValueError, KeyError):
            from PIL import Image

            try:
                with Image.open(path) as image:
                    return ImageRecord(image_id, "image.png", image.width, image.height)
            except OSError:
                raise self._missing(image_id) from None     # evicted meanwhile

    def png_path(self, image_id: str) -> Path:
        path = self._index.lookup(image_id)
        if path is None:
            raise self._missing(image_id)
        return path

    def _size(self, path: Path) -> int:
        try:
            sidecar = path.with_suffix(".json").stat().st_size
        except OSError:
            sidecar = 0
        return path.stat().st_size + sidecar

    def _remove(self, path: Path) -> None:
        for doomed in (path, path.with_suffix(".json")):
            doomed.unlink(missing_ok=True)

    def open(self, image_id: str) -> "Image.Image":
        from PIL import Image

        with Image.open(self.png_path(image_id)) as image:
            return image.convert("RGB")


# --- results -----------------------------------------------------------------------------------

def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def result_key(**parts: Any) -> str:
    """The content address of a result: sha256 of the canonical JSON of what determines it.
    Callers put each method's ``version`` among the parts, so a method whose output changed
    never serves results computed by the old code; ``STORE_FORMAT`` covers the record shape."""
    identity = {"format": STORE_FORMAT, **parts}
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


@dataclass(frozen=True)
class StoredResult:
    key: str
    record: Mapping[str, Any]

    @property
    def files(self) -> list[str]:
        return list(self.record.get("files", []))


_MIMETYPES = {".png": "image/png", ".npy": "application/octet-stream",
              ".json": "application/json"}


class ResultStore(_IndexedStore):
    """Finished results, one directory per key, written whole or not at all.

    A result's last use is its directory's mtime (written, or reused by a job: ``touch``);
    its size is the sum of its files. ``app.retention`` evicts with ``entries()`` and
    ``delete(key)``.
    """

    RECORD = "result.json"

    def __init__(self, root: Path) -> None:
        super().__init__(root, "", is_dir=True)

    def _read(self, key: str, directory: Path) -> StoredResult | None:
        """The result stored in ``directory``; None when unreadable (or evicted meanwhile)."""
        try:
            record = json.loads((directory / self.RECORD).read_text("utf-8"))
        except (OSError, ValueError):
            log.warning("result %s is unreadable; ignoring it", key[:12])
            return None
        return StoredResult(key, record)

    def get(self, key: str) -> StoredResult | None:
        directory = self._index.lookup(key)
        return self._read(key, directory) if directory is not None else None

    def put(self, key: str, record: Mapping[str, Any], files: Mapping[str, bytes]) -> StoredResult:
        """Store ``files`` and ``record`` (which gets ``files`` and ``key`` added) under ``key``.
        A concurrent writer of the same key wins harmlessly: the content is the same."""
        assert all(_RESULT_FILE.fullmatch(name) and name != self.RECORD for name in files)
        record = {**record, "key": key, "files": sorted(files), "stored_at": time.time()}
        staging = self.root / f".tmp-{secrets.token_hex(8)}"
        try:
            staging.mkdir()
            for name, data in files.items():
                (staging / name).write_bytes(data)
            (staging / self.RECORD).write_text(json.dumps(record, indent=1, sort_keys=True),
                                               "utf-8")
            try:
                os.replace(staging, self.root / key)
            except OSError:
                if not (self.root / key / self.RECORD).exists():
                    raise
                shutil.rmtree(staging, ignore_errors=True)
                _touch(self.root / key)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise _storage_error(error) from error
        self.bytes_written += sum(len(data) for data in files.values())
        self._index.add(key, self.root / key)
        self.tombstones.discard(key)
        return StoredResult(key, record)

    def expired(self, key: str) -> bool:
        """Whether ``key`` was stored once and has been evicted since."""
        return key in self.tombstones and self._index.lookup(key) is None

    def file(self, key: str, name: str) -> tuple[Path, str]:
        """(path, mimetype) of one file of a result; only names listed in its record exist.
        An evicted result raises ResultExpired (410), an unknown one NotFound."""
        # Looked up once (a miss lists the whole directory), not again through expired().
        directory = self._index.lookup(key)
        if directory is None and key in self.tombstones:
            raise ResultExpired("This result has expired and was removed; run the job "
                                "again to compute it anew.")
        stored = self._read(key, directory) if directory is not None else None
        if stored is None:
            raise NotFound("This result file does not exist.")
        # Only names the record lists, which put() checked against _RESULT_FILE: checked again
        # here, so a name from a URL joins the result's directory only as a plain file name.
        if ((name not in stored.files and name != self.RECORD)
                or not _RESULT_FILE.fullmatch(name)):
            raise NotFound("This result file does not exist.")
        path = directory / name
        if not path.is_file():
            raise NotFound("This result file does not exist.")
        suffix = os.path.splitext(name)[1]
        return path, _MIMETYPES.get(suffix, "application/octet-stream")

    def _size(self, path: Path) -> int:
        with os.scandir(path) as files:
            return sum(entry.stat(follow_symlinks=False).st_size for entry in files)

    def _remove(self, path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)
