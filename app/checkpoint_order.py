"""Training order of a directory's checkpoints: which came first in the training run.

A checkpoint says how far training had got in one of three ways, tried in this order:

1. a counter stored in its wrapper: ``epoch``, or ``global_step`` / ``step`` / ``iteration`` /
   ``iter`` (Lightning's ``{"epoch", "global_step", "state_dict"}``, the PyTorch ImageNet
   example's ``{"epoch", "state_dict", "optimizer"}``, hand-written loops' ``{"step", "model"}``,
   and string values in a safetensors header's metadata);
2. its file name: a labelled number (``epoch=3-step=1200.ckpt``, ``epoch_07.pt``,
   ``model-step=12000.ckpt``, ``iter_500.pth``), else the last integer in the name
   (``ckpt-0012.pt``);
3. its modification time.

Reading a wrapper never runs code: torch archives are read with weights-only unpickling and
``mmap=True`` (tensors stay on disk, so reading the counters of a 100 MB checkpoint costs a few
kB of memory), safetensors through their JSON header. Files that need ``--trust-code`` are
ordered by name or time only, and a file that cannot be read at all still gets a place.

Two checkpoints are compared on the first of epoch, step, name number that both have and that
differs (a shared epoch falls through to the step), then by modification time, then by name.
"""
from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

log = logging.getLogger(__name__)

EPOCH_KEYS = ("epoch", "epochs", "current_epoch")
STEP_KEYS = ("global_step", "step", "iteration", "iter", "steps", "num_updates")
# Wrappers nest the counters at most this deep (e.g. {"meta": {"epoch": 3}} in mmcv/mmengine).
NESTED_KEYS = ("meta", "trainer_state", "state", "loops")

_EPOCH_NAME = re.compile(r"(?:^|[^a-z])(?:epoch|ep)[_=\-]?(\d+)", re.IGNORECASE)
_STEP_NAME = re.compile(r"(?:^|[^a-z])(?:global_step|step|steps|iteration|iter)[_=\-]?(\d+)",
                        re.IGNORECASE)
_NUMBER = re.compile(r"\d+")

T = TypeVar("T")


@dataclass(frozen=True)
class TrainingProgress:
    """How far training had got when a checkpoint was written, and how we know.

    ``order_by`` names the key that placed it: "epoch" or "step" (stored in the checkpoint),
    "name" (read from the file name) or "mtime"."""

    epoch: int | None
    step: int | None
    name_number: int | None
    order_by: str
    modified: float

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "order_by": self.order_by}


def progress_from_name(name: str) -> tuple[int | None, int | None, int | None]:
    """(epoch, step, last integer) named by a file name, each None when absent."""
    stem = name.rsplit(".", 1)[0] if "." in name else name
    epoch = _last_match(_EPOCH_NAME, stem)
    step = _last_match(_STEP_NAME, stem)
    numbers = _NUMBER.findall(stem)
    return epoch, step, int(numbers[-1]) if numbers else None


def _last_match(pattern: re.Pattern[str], text: str) -> int | None:
    found = pattern.findall(text)
    return int(found[-1]) if found else None


def counters_of(obj: Any, depth: int = 0) -> tuple[int | None, int | None]:
    """(epoch, step) stored in a loaded checkpoint wrapper (None where it has none)."""
    if not isinstance(obj, Mapping):
        return None, None
    epoch = _first_int(obj, EPOCH_KEYS)
    step = _first_int(obj, STEP_KEYS)
    if depth < 2:
        for key in NESTED_KEYS:
            if (epoch is None or step is None) and isinstance(obj.get(key), Mapping):
                inner_epoch, inner_step = counters_of(obj[key], depth + 1)
                epoch = epoch if epoch is not None else inner_epoch
                step = step if step is not None else inner_step
    return epoch, step


def _first_int(obj: Mapping[str, Any], keys: Sequence[str]) -> int | None:
    for key in keys:
        if key in obj:
            value = _as_int(obj[key])
            if value is not None:
                return value
    return None


def _as_int(value: Any) -> int | None:
    """An integer counter from an int, an integral float, a 0-d tensor or numpy scalar, or a
    string of digits (safetensors metadata); None for anything else (lists, bools, NaN)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        return int(text) if text.isdigit() else None
    try:
        if hasattr(value, "numel") and value.numel() != 1:
            return None
        number = value.item() if hasattr(value, "item") else value
        if isinstance(number, bool):
            return None
        if isinstance(number, int):
            return number if number >= 0 else None
        if isinstance(number, float) and number.is_integer() and number >= 0:
            return int(number)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        return None
    return None


def read_counters(path: Path) -> tuple[int | None, int | None]:
    """(epoch, step) stored in the checkpoint at ``path``, read without running code and
    without reading its tensors; (None, None) when it has none or cannot be read safely."""
    from model_adapters.checkpoint_file import FileKind, inspect_file

    try:
        kind = inspect_file(path)
    except Exception:  # noqa: BLE001 -- ordering must never fail on a bad file
        return None, None
    try:
        if kind is FileKind.SAFETENSORS:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                return counters_of(handle.metadata() or {})
        if kind is FileKind.WEIGHTS_ZIP:
            return counters_of(_weights_only(path, mmap=True))
        if kind is FileKind.LEGACY_PICKLE:     # no mmap for the old format; weights-only
            return counters_of(_weights_only(path, mmap=False))
    except Exception:  # noqa: BLE001 -- refused, damaged or odd: order it by name or time
        log.debug("No training counters read from %s.", path.name, exc_info=True)
    return None, None


def _weights_only(path: Path, *, mmap: bool) -> Any:
    import torch

    from model_adapters.checkpoint_file import _allow_data_only_globals

    with _allow_data_only_globals():
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def training_progress(name: str, modified: float,
                      counters: tuple[int | None, int | None] = (None, None)) -> TrainingProgress:
    """Combine stored counters (preferred) with what the file name says."""
    stored_epoch, stored_step = counters
    name_epoch, name_step, name_number = progress_from_name(name)
    if stored_epoch is not None:
        order_by = "epoch"
    elif stored_step is not None:
        order_by = "step"
    elif name_number is not None:
        order_by = "name"
    else:
        order_by = "mtime"
    return TrainingProgress(
        epoch=stored_epoch if stored_epoch is not None else name_epoch,
        step=stored_step if stored_step is not None else name_step,
        name_number=name_number, order_by=order_by, modified=modified)


def read_progress(path: Path, modified: float | None = None) -> TrainingProgress:
    """The training progress of one checkpoint file (its counters, name and mtime)."""
    if modified is None:
        try:
            modified = path.stat().st_mtime
        except OSError:
            modified = 0.0
    return training_progress(path.name, modified, read_counters(path))


def compare_progress(a: TrainingProgress, b: TrainingProgress) -> int:
    """-1, 0 or 1: whether ``a`` was written before ``b`` in training (see the module doc)."""
    for field in ("epoch", "step", "name_number"):
        first, second = getattr(a, field), getattr(b, field)
        if first is not None and second is not None and first != second:
            return -1 if first < second else 1
    if a.modified != b.modified:
        return -1 if a.modified < b.modified else 1
    return 0


def in_training_order(items: Sequence[T], progress: Callable[[T], TrainingProgress],
                      name: Callable[[T], str]) -> list[T]:
    """``items`` sorted by training progress, ties broken by file name (a stable total order
    for a given set of files)."""
    def compare(a: T, b: T) -> int:
        result = compare_progress(progress(a), progress(b))
        if result:
            return result
        return (name(a) > name(b)) - (name(a) < name(b))

    return sorted(items, key=functools.cmp_to_key(compare))


def every_kth(items: Sequence[T], k: int) -> list[T]:
    """Every ``k``-th item, the first and the last always included."""
    if k <= 1 or len(items) <= 2:
        return list(items)
    positions = list(range(0, len(items), k))
    if positions[-1] != len(items) - 1:
        positions.append(len(items) - 1)
    return [items[position] for position in positions]


__all__ = ["TrainingProgress", "compare_progress", "counters_of", "every_kth",
           "in_training_order", "progress_from_name", "read_counters", "read_progress",
           "training_progress"]
