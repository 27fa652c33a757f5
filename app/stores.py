"""On-disk stores under the data directory: uploaded images and visualization results.

Both are content-addressed (an image's id is the sha256 of its normalized PNG; a result's id is
the sha256 of everything that determines it), so asking twice stores once. Every write is atomic
(a temp file or directory, then ``os.replace``): a crash never leaves a half-written entry that a
later request could serve. Ids from URLs are looked up in an index built by listing the store's
directory; they are never joined into a path, so ``..`` or an absolute path is simply "not found".

Layout::

    images/<sha256>.png          normalized RGB PNG
    images/<sha256>.json         {"filename", "width", "height"}
    results/<key>/result.json    what was computed, with the list of files beside it
    results/<key>/<file>         PNGs and .npy arrays named in result.json
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
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from app.errors import NotFound, StorageFull

if TYPE_CHECKING:
    from PIL import Image

    from app.ingest import IngestedImage

log = logging.getLogger(__name__)

_HEX_ID = re.compile(r"[0-9a-f]{64}")
# Names of files inside a result directory: chosen by us, checked again when serving.
_RESULT_FILE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
STORE_FORMAT = 1


def is_hex_id(value: str) -> bool:
    return isinstance(value, str) and _HEX_ID.fullmatch(value) is not None


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


class _DirectoryIndex:
    """id -> path for the entries of one directory, refreshed by listing it on a miss.

    Listing (rather than ``root / user_id``) is what makes lookups safe; refreshing on a miss
    lets several server processes share one data directory.
    """

    def __init__(self, root: Path, suffix: str, is_dir: bool) -> None:
        self.root, self.suffix, self.is_dir = root, suffix, is_dir
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
        if not is_hex_id(entry_id):
            return None
        with self._lock:
            path = self._paths.get(entry_id)
        if path is None:
            self.refresh()
            with self._lock:
                path = self._paths.get(entry_id)
        return path

    def ids(self) -> list[str]:
        with self._lock:
            return list(self._paths)


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


class ImageStore:
    """Normalized uploads by content hash. The PNG bytes come from ``app.ingest``; this class
    only stores and finds them."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index = _DirectoryIndex(self.root, ".png", is_dir=False)

    def put(self, ingested: "IngestedImage") -> ImageRecord:
        record = ImageRecord(ingested.sha256, ingested.filename, ingested.width, ingested.height)
        png_path = self.root / f"{record.id}.png"
        if self._index.lookup(record.id) is None:
            atomic_write_bytes(png_path, ingested.png_bytes)
        # The display name of the latest upload of these bytes; jobs keep their own copy.
        atomic_write_json(self.root / f"{record.id}.json", record.to_dict())
        self._index.add(record.id, png_path)
        return record

    def get(self, image_id: str) -> ImageRecord:
        path = self._index.lookup(image_id)
        if path is None:
            raise NotFound("Unknown image id; upload the image first.",
                           fields={"image": "an id returned by POST /api/v1/images"})
        try:
            meta = json.loads(path.with_suffix(".json").read_text("utf-8"))
            return ImageRecord(image_id, str(meta["filename"]), int(meta["width"]),
                               int(meta["height"]))
        except (OSError, ValueError, KeyError):
            from PIL import Image

            with Image.open(path) as image:
                return ImageRecord(image_id, "image.png", image.width, image.height)

    def exists(self, image_id: str) -> bool:
        return self._index.lookup(image_id) is not None

    def png_path(self, image_id: str) -> Path:
        path = self._index.lookup(image_id)
        if path is None:
            raise NotFound("Unknown image id; upload the image first.")
        return path

    def open(self, image_id: str) -> "Image.Image":
        from PIL import Image

        with Image.open(self.png_path(image_id)) as image:
            return image.convert("RGB")


# --- results -----------------------------------------------------------------------------------

def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def result_key(**parts: Any) -> str:
    """The content address of a result: sha256 of the canonical JSON of what determines it."""
    return hashlib.sha256(canonical_json({"format": STORE_FORMAT, **parts}).encode()).hexdigest()


@dataclass(frozen=True)
class StoredResult:
    key: str
    record: Mapping[str, Any]

    @property
    def files(self) -> list[str]:
        return list(self.record.get("files", []))


_MIMETYPES = {".png": "image/png", ".npy": "application/octet-stream",
              ".json": "application/json"}


class ResultStore:
    """Finished results, one directory per key, written whole or not at all.

    A size quota and time-to-live with oldest-first eviction only need ``entries()`` (with
    mtimes) and ``delete(key)``.
    """

    RECORD = "result.json"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._index = _DirectoryIndex(self.root, "", is_dir=True)

    def get(self, key: str) -> StoredResult | None:
        directory = self._index.lookup(key)
        if directory is None:
            return None
        try:
            record = json.loads((directory / self.RECORD).read_text("utf-8"))
        except (OSError, ValueError):
            log.warning("result %s is unreadable; ignoring it", key[:12])
            return None
        return StoredResult(key, record)

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
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            raise _storage_error(error) from error
        self._index.add(key, self.root / key)
        return StoredResult(key, record)

    def file(self, key: str, name: str) -> tuple[Path, str]:
        """(path, mimetype) of one file of a result; only names listed in its record exist."""
        stored = self.get(key)
        if stored is None or (name not in stored.files and name != self.RECORD):
            raise NotFound("This result file does not exist.")
        directory = self._index.lookup(key)
        assert directory is not None
        listed = {entry.name: entry for entry in os.scandir(directory)}
        if name not in listed:
            raise NotFound("This result file does not exist.")
        suffix = os.path.splitext(name)[1]
        return Path(listed[name].path), _MIMETYPES.get(suffix, "application/octet-stream")

    def keys(self) -> Iterable[str]:
        self._index.refresh()
        return self._index.ids()

    def delete(self, key: str) -> None:
        directory = self._index.lookup(key)
        self._index.discard(key)
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
