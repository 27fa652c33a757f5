"""Labelled datasets on disk: scanning a folder into files with true labels, safely.

Two layouts, as ML teams keep validation sets:

* **class folders** (torchvision ``ImageFolder``): one subfolder per class, named by one of the
  model's class labels or its integer index; images anywhere below it (nested folders allowed);
* **labels.csv**: a ``labels.csv`` at the top with the header ``file,label``; ``file`` is a path
  relative to the folder, ``label`` a class label or index.

A class name matches a model class by its exact label, else by its index, else by its label
ignoring case, spaces, ``_`` and ``-`` (``tiger_cat`` is ``tiger cat``) when that is unambiguous.
A name that matches no class is ``E_DATASET_LABELS`` naming it, before any model pass.

Nothing here ever leaves the dataset folder: a symlink is followed only when its target lies
inside the folder (anything else is listed as skipped, ``E_DATASET_OUTSIDE``), ``labels.csv``
paths that climb out are skipped the same way, and files are opened by their resolved path with
``O_NOFOLLOW``. Hidden files and folders (``.git``, ``.DS_Store``) are ignored; other files that
are not images are skipped later, with their error code, when they fail to decode.

A server offers the subfolders of one root as datasets: ``app.dataset_catalog``.
"""
from __future__ import annotations

import csv
import io
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from app.errors import (ConvscopeError, DatasetEmpty, DatasetLabels, DatasetNotFound,
                        DatasetOutside, DatasetTooLarge, FileUnreadable, NotFound)

if TYPE_CHECKING:
    from model_adapters.base import ModelMeta

LABELS_CSV = "labels.csv"
FOLDERS, CSV = "folders", "csv"
MAX_LABELS_CSV_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class DatasetFile:
    """One image file of a dataset, as found: where, its label as written, and its version."""

    path: str           # relative to the dataset folder, "/"-separated
    label: str          # the class folder's name or the labels.csv label
    size: int
    mtime_ns: int


@dataclass(frozen=True, slots=True)
class Skipped:
    """A file left out of an evaluation, with the coded reason."""

    file: str
    code: str
    message: str

    @classmethod
    def of(cls, file: str, error: ConvscopeError) -> "Skipped":
        return cls(file, error.code, error.message)

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "code": self.code, "message": self.message}


@dataclass(frozen=True)
class DatasetScan:
    """A dataset folder as scanned: its files in path order, what was skipped, its labels."""

    root: Path                          # resolved
    name: str
    layout: str                         # FOLDERS or CSV
    files: tuple[DatasetFile, ...]
    skipped: tuple[Skipped, ...]
    labels: tuple[str, ...]             # class folder names / distinct labels, sorted


@dataclass(frozen=True)
class LabelledDataset:
    """A scan whose labels are matched to one model's classes."""

    scan: DatasetScan
    targets: np.ndarray                 # (files,) int64: each file's true class index
    classes: tuple[int, ...]            # the dataset's classes, in model index order

    @property
    def files(self) -> tuple[DatasetFile, ...]:
        return self.scan.files


# --- scanning -------------------------------------------------------------------------------------

def scan_dataset(path: Path | str, *, max_images: int, with_stats: bool = True) -> DatasetScan:
    """Scan a dataset folder. Raises ``E_DATASET_NOT_FOUND`` (no such folder),
    ``E_DATASET_LABELS`` (a bad layout or labels.csv), ``E_DATASET_EMPTY`` (no image files)
    or ``E_DATASET_TOO_LARGE`` (more than ``max_images``). ``with_stats=False`` leaves size and
    mtime at 0 (enough for counting)."""
    given = Path(path)
    if not given.is_dir():
        raise DatasetNotFound(f"The dataset folder {given.name!r} does not exist or is not a "
                              "folder.", fields={"dataset": given.name})
    root = Path(os.path.realpath(given))
    found: list[DatasetFile] = []
    skipped: list[Skipped] = []
    if (root / LABELS_CSV).is_file() and _inside(root, os.path.realpath(root / LABELS_CSV)):
        layout = CSV
        labels = _scan_csv(root, found, skipped, max_images, with_stats)
    else:
        layout = FOLDERS
        labels = _scan_folders(root, found, skipped, max_images, with_stats)
    if not found:
        detail = f" ({len(skipped)} entries were skipped)" if skipped else ""
        raise DatasetEmpty(f"The dataset {given.name!r} has no image files{detail}.",
                           fields={"dataset": given.name})
    found.sort(key=lambda file: file.path)
    skipped.sort(key=lambda entry: entry.file)
    return DatasetScan(root, given.name, layout, tuple(found), tuple(skipped),
                       tuple(sorted(labels)))


def _too_large(max_images: int) -> DatasetTooLarge:
    return DatasetTooLarge(f"The dataset has more than {max_images:,} images, the most this "
                           "server evaluates at once (CONVSCOPE_MAX_DATASET_IMAGES); evaluate a "
                           "subset.", fields={"dataset": f"at most {max_images} images"})


def _inside(root: Path, real: str) -> bool:
    base = str(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _scan_folders(root: Path, found: list[DatasetFile], skipped: list[Skipped],
                  max_images: int, with_stats: bool) -> list[str]:
    classes: list[str] = []
    loose = 0
    for entry in sorted(os.scandir(root), key=lambda entry: entry.name):
        if entry.name.startswith("."):
            continue
        kind, real = entry_kind(root, entry)
        if kind == "outside":
            skipped.append(Skipped.of(entry.name, DatasetOutside()))
        elif kind == "dir":
            classes.append(entry.name)
            _walk_class(root, real, entry.name, found, skipped, max_images, with_stats)
        elif kind == "file" and entry.name != LABELS_CSV:
            loose += 1
    if not classes:
        if loose:
            raise DatasetLabels("The dataset has images but no class folders: put each image in "
                                "a subfolder named by its class, or add a labels.csv with the "
                                "header file,label.", fields={"dataset": "one folder per class"})
        raise DatasetEmpty("The dataset folder is empty.", fields={"dataset": "no images"})
    return classes


def entry_kind(root: Path, entry: os.DirEntry) -> tuple[str, str]:
    """("file" | "dir" | "outside" | "other", resolved path) of one directory entry; a
    symlink counts as what it points to only when that is inside ``root``."""
    try:
        if entry.is_symlink():
            real = os.path.realpath(entry.path)
            if not _inside(root, real):
                return "outside", real
            mode = os.stat(real).st_mode
        else:
            real = entry.path
            mode = entry.stat(follow_symlinks=False).st_mode
    except OSError:
        return "other", entry.path      # a dangling link, or gone meanwhile
    if stat.S_ISDIR(mode):
        return "dir", real
    if stat.S_ISREG(mode):
        return "file", real
    return "other", real


def _walk_class(root: Path, class_dir: str, label: str, found: list[DatasetFile],
                skipped: list[Skipped], max_images: int, with_stats: bool) -> None:
    """Every file below one class folder (depth first, by name), links inside only."""
    visited = {os.path.realpath(class_dir)}
    stack = [(class_dir, label)]
    while stack:
        directory, relative = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name, reverse=True)
        except OSError as error:
            skipped.append(Skipped.of(relative, FileUnreadable(
                f"The folder cannot be listed ({error.strerror or 'error'}).")))
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            name = f"{relative}/{entry.name}"
            kind, real = entry_kind(root, entry)
            if kind == "outside":
                skipped.append(Skipped.of(name, DatasetOutside()))
            elif kind == "dir":
                resolved = os.path.realpath(real)
                if resolved not in visited:         # a link back up would loop forever
                    visited.add(resolved)
                    stack.append((real, name))
            elif kind == "file":
                if len(found) >= max_images:
                    raise _too_large(max_images)
                found.append(_dataset_file(name, label, real, with_stats))
            else:
                skipped.append(Skipped.of(name, FileUnreadable("This is not a regular file.")))


def _dataset_file(name: str, label: str, path: str, with_stats: bool) -> DatasetFile:
    if not with_stats:
        return DatasetFile(name, label, 0, 0)
    try:
        info = os.stat(path)
    except OSError:
        return DatasetFile(name, label, -1, 0)      # read (and skipped) with its error later
    return DatasetFile(name, label, info.st_size, info.st_mtime_ns)


def _scan_csv(root: Path, found: list[DatasetFile], skipped: list[Skipped], max_images: int,
              with_stats: bool) -> list[str]:
    rows = _read_labels_csv(root)
    seen: dict[str, str] = {}
    for line, raw_file, label in rows:
        relative = raw_file.strip().replace("\\", "/")
        if not relative or not label:
            raise DatasetLabels(f"{LABELS_CSV} line {line}: both file and label are needed.",
                                fields={"dataset": f"{LABELS_CSV} line {line}"})
        pure = PurePosixPath(relative)
        if pure.is_absolute() or ".." in pure.parts:
            skipped.append(Skipped.of(relative[:200], DatasetOutside()))
            continue
        relative = str(pure)
        if relative in seen:
            if seen[relative] != label:
                raise DatasetLabels(f"{LABELS_CSV} line {line}: {relative!r} is listed again "
                                    f"with another label ({seen[relative]!r}, then {label!r}).",
                                    fields={"dataset": f"{LABELS_CSV} line {line}"})
            continue
        seen[relative] = label
        real = os.path.realpath(root / relative)
        if not _inside(root, real):
            skipped.append(Skipped.of(relative, DatasetOutside()))
            continue
        try:
            mode = os.stat(real).st_mode
        except OSError:
            skipped.append(Skipped.of(relative, NotFound(
                f"{LABELS_CSV} lists this file, but it does not exist.")))
            continue
        if not stat.S_ISREG(mode):
            skipped.append(Skipped.of(relative, FileUnreadable("This is not a regular file.")))
            continue
        if len(found) >= max_images:
            raise _too_large(max_images)
        found.append(_dataset_file(relative, label, real, with_stats))
    return sorted(set(seen.values()))


def _read_labels_csv(root: Path) -> list[tuple[int, str, str]]:
    """(line, file, label) rows of labels.csv, the header checked."""
    path = os.path.realpath(root / LABELS_CSV)     # inside root: checked by scan_dataset
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_LABELS_CSV_BYTES + 1)
    except OSError as error:
        raise DatasetLabels(f"{LABELS_CSV} cannot be read ({error.strerror or 'error'}).",
                            fields={"dataset": LABELS_CSV}) from None
    if len(data) > MAX_LABELS_CSV_BYTES:
        raise DatasetLabels(f"{LABELS_CSV} is larger than "
                            f"{MAX_LABELS_CSV_BYTES // (1024 * 1024)} MB.",
                            fields={"dataset": LABELS_CSV})
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DatasetLabels(f"{LABELS_CSV} is not UTF-8 text.",
                            fields={"dataset": LABELS_CSV}) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [cell.strip().lower() for cell in next(reader, [])]
    if "file" not in header or "label" not in header:
        raise DatasetLabels(f"{LABELS_CSV} must start with the header line file,label.",
                            fields={"dataset": f"{LABELS_CSV}: header file,label"})
    file_column, label_column = header.index("file"), header.index("label")
    rows = []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue            # blank lines
        padded = row + [""] * (max(file_column, label_column) + 1 - len(row))
        rows.append((reader.line_num, padded[file_column], padded[label_column].strip()))
    return rows


# --- labels -> model classes --------------------------------------------------------------------

def _loose(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().casefold()


class ClassMatcher:
    """Class names as datasets write them -> one model's class indices."""

    def __init__(self, meta: "ModelMeta") -> None:
        self.names = tuple(meta.class_names)
        self._exact: dict[str, int] = {}
        self._loose: dict[str, set[int]] = {}
        for index, label in enumerate(self.names):
            self._exact.setdefault(label, index)
            self._loose.setdefault(_loose(label), set()).add(index)

    def match(self, name: str) -> int | None:
        if name in self._exact:
            return self._exact[name]
        text = name.strip()
        if text.isdigit() and int(text) < len(self.names):
            return int(text)
        candidates = self._loose.get(_loose(name), set())
        return next(iter(candidates)) if len(candidates) == 1 else None

    def examples(self) -> str:
        shown = ", ".join(repr(label) for label in self.names[:4])
        more = f", ... ({len(self.names)} classes)" if len(self.names) > 4 else ""
        return shown + more


def match_labels(scan: DatasetScan, meta: "ModelMeta") -> LabelledDataset:
    """Each file's true class index for this model; ``E_DATASET_LABELS`` names every class folder
    (or labels.csv label) that matches none of the model's classes (up to five)."""
    matcher = ClassMatcher(meta)
    indices: dict[str, int] = {}
    unmatched = []
    for label in scan.labels:
        index = matcher.match(label)
        if index is None:
            unmatched.append(label)
        else:
            indices[label] = index
    if unmatched:
        what = "Class folder" if scan.layout == FOLDERS else f"{LABELS_CSV} label"
        names = ", ".join(repr(name[:60]) for name in unmatched[:5])
        more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
        plural = "es" if len(unmatched) > 1 and scan.layout == FOLDERS else ""
        raise DatasetLabels(
            f"{what}{plural} {names}{more} match{'es' if len(unmatched) == 1 else ''} no class "
            f"of the model ({matcher.examples()}); name each by a class label or index.",
            fields={"dataset": unmatched[0][:60]})
    targets = np.fromiter((indices[file.label] for file in scan.files), dtype=np.int64,
                          count=len(scan.files))
    return LabelledDataset(scan, targets, tuple(sorted(set(indices.values()))))


# --- reading one file ---------------------------------------------------------------------------

def read_dataset_file(root: Path, relative: str, max_bytes: int) -> bytes:
    """The bytes of one dataset file, never from outside ``root`` (resolved): ``E_DATASET_OUTSIDE``
    for a path or link that leads out, ``E_FILE_UNREADABLE`` for I/O errors and non-files. At most
    ``max_bytes + 1`` bytes are read (the decoder then refuses the file as too large)."""
    real = os.path.realpath(os.path.join(root, relative))
    if not _inside(root, real):
        raise DatasetOutside()
    try:
        # O_NOFOLLOW: a file swapped for a link since the path was resolved is refused;
        # O_NONBLOCK: a FIFO never blocks the reader (and is refused below).
        handle = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as error:
        raise FileUnreadable(f"The file cannot be opened ({error.strerror or 'error'}).") from None
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            raise FileUnreadable("This is not a regular file.")
        chunks, remaining = [], max_bytes + 1
        while remaining > 0:
            chunk = os.read(handle, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    except OSError as error:
        raise FileUnreadable(f"The file cannot be read ({error.strerror or 'error'}).") from None
    finally:
        os.close(handle)
