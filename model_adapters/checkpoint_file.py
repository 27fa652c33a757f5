"""Reading checkpoint files safely, and fitting a state_dict onto a model.

Safety rule: nothing that can execute code is unpickled without the opt-in. The file kind is
decided *statically* first (zip member names, the pickle's GLOBAL opcodes via
``torch.serialization.get_unsafe_globals_in_checkpoint``), and plain loads always use
``torch.load(weights_only=True)``, whose restricted unpickler refuses any non-allowlisted global
rather than importing it -- so a pickle carrying a code payload never runs.
"""
from __future__ import annotations

import argparse
import contextlib
import enum
import functools
import logging
import pickle
import struct
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.errors import (CheckpointMismatch, CheckpointNeedsTrust, CheckpointNonfinite,
                        CheckpointUnreadable, CheckpointUnrecognized)

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".pt2")

# Wrapper keys real training scripts use, tried in this order (Lightning, the PyTorch ImageNet
# example, timm, and many hand-written loops).
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module", "state_dict_ema",
                "model_ema")

_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")


class FileKind(enum.Enum):
    EMPTY = "empty"
    SAFETENSORS = "safetensors"
    WEIGHTS_ZIP = "torch.save archive with only tensors and plain containers"
    CODE_ZIP = "torch.save archive that pickles classes or functions"
    TORCHSCRIPT = "TorchScript archive"
    EXPORT = "torch.export archive"
    LEGACY_PICKLE = "pre-1.6 torch.save file or plain pickle"
    DAMAGED_ZIP = "damaged or truncated archive"
    IMAGE = "image"
    OTHER = "not a checkpoint"


CODE_KINDS = frozenset({FileKind.CODE_ZIP, FileKind.TORCHSCRIPT, FileKind.EXPORT})


@functools.cache
def _data_only_globals() -> tuple[Any, ...]:
    """Globals that rebuild plain data, not code, which training scripts commonly save beside the
    weights: numpy scalars and arrays (``best_acc = np.float64(...)``) and ``argparse.Namespace``
    (``args``). Allowing them keeps such checkpoints loadable without --trust-code."""
    import numpy as np
    import numpy.dtypes

    multiarray = np._core.multiarray
    dtypes = [cls for cls in vars(numpy.dtypes).values()
              if isinstance(cls, type) and issubclass(cls, np.dtype)]
    return (multiarray.scalar, multiarray._reconstruct, np.ndarray, np.dtype, *dtypes,
            argparse.Namespace)


# torch's safe_globals context edits one process-wide list; overlapping uses from two threads
# would remove each other's entries mid-load.
_SAFE_GLOBALS_LOCK = threading.Lock()


@contextlib.contextmanager
def _allow_data_only_globals():
    with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals(list(_data_only_globals())):
        yield


def inspect_file(path: Path) -> FileKind:
    """Decide what a file is from its header and zip directory, without unpickling anything."""
    try:
        with path.open("rb") as handle:
            head = handle.read(16)
    except OSError:
        raise CheckpointUnreadable(f"The file {path.name!r} cannot be opened.") from None
    if not head:
        return FileKind.EMPTY
    if head.startswith(b"PK"):
        return _inspect_zip(path)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):
        return FileKind.SAFETENSORS
    if head[0] == 0x80:  # pickle PROTO opcode: the legacy torch.save format or pickle.dump
        return FileKind.LEGACY_PICKLE
    if head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return FileKind.IMAGE
    return FileKind.OTHER


def _looks_like_safetensors(head: bytes) -> bool:
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] > 1


def _inspect_zip(path: Path) -> FileKind:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError):
        # (NotImplementedError: a record claims a zip version or feature Python lacks.)
        return FileKind.DAMAGED_ZIP
    inner = ["/".join(name.split("/")[1:]) for name in names]  # drop the archive's top folder
    if any(name.startswith("code/") or name == "constants.pkl" for name in inner):
        return FileKind.TORCHSCRIPT
    if any(name in ("archive_format", "models/model.json") or name.startswith("models/")
           for name in inner):
        return FileKind.EXPORT
    if "data.pkl" not in inner:
        return FileKind.OTHER
    try:
        with _allow_data_only_globals():
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 -- any failure to disassemble means a damaged archive
        return FileKind.DAMAGED_ZIP
    if unsafe:
        log.debug("%s pickles non-allowlisted globals: %s", path.name, unsafe[:5])
        return FileKind.CODE_ZIP
    return FileKind.WEIGHTS_ZIP


def refuse_untrusted(path: Path, kind: FileKind) -> CheckpointNeedsTrust:
    return CheckpointNeedsTrust(
        f"The checkpoint {path.name!r} is a {kind.value}; loading it would execute code, so it "
        "needs --trust-code (or CONVSCOPE_TRUST_CODE=1).")


def read_weights(path: Path) -> Any:
    """Load a file with weights-only unpickling (or safetensors); never executes code.

    Returns whatever was saved (a state_dict or a wrapper dict). Raises CheckpointUnreadable for
    files that are not checkpoints and CheckpointNeedsTrust for ones that need code execution.
    """
    kind = inspect_file(path)
    if kind in CODE_KINDS:
        raise refuse_untrusted(path, kind)
    _refuse_non_checkpoints(path, kind)
    if kind is FileKind.SAFETENSORS:
        return _read_safetensors(path)
    try:
        with _allow_data_only_globals():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # The restricted unpickler refused a global: a full pickle in the legacy format (or a
        # plain pickle with a payload). Nothing was imported or called.
        if "Unsupported global" in str(error) or "Weights only load failed" in str(error):
            raise refuse_untrusted(path, FileKind.LEGACY_PICKLE) from None
        raise _unreadable(path) from None
    except Exception:  # noqa: BLE001 -- torch raises many types for damaged files
        raise _unreadable(path) from None


def read_trusted(path: Path) -> Any:
    """Load a file that may execute code (full pickle, TorchScript, torch.export). Opt-in only."""
    kind = inspect_file(path)
    _refuse_non_checkpoints(path, kind)
    try:
        if kind is FileKind.TORCHSCRIPT:
            return torch.jit.load(str(path), map_location="cpu")
        if kind is FileKind.EXPORT:
            return ExportedModel(torch.export.load(str(path)).module())
        if kind is FileKind.SAFETENSORS:
            return _read_safetensors(path)
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 -- the file is damaged or its code failed
        log.warning("Trusted load of %s failed.", path.name, exc_info=True)
        raise CheckpointUnreadable(f"The checkpoint {path.name!r} could not be loaded even with "
                                   "--trust-code; it may be damaged.") from None


class ExportedModel(nn.Module):
    """A loaded ``torch.export`` program as a plain module. Exported graphs are frozen in the
    mode they were exported in and raise on ``.train()``/``.eval()``, so this wrapper keeps
    those calls (which every caller makes) from reaching the graph."""

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.program(batch)

    def train(self, mode: bool = True) -> "ExportedModel":
        self.training = mode
        return self


def _refuse_non_checkpoints(path: Path, kind: FileKind) -> None:
    if kind is FileKind.EMPTY:
        raise CheckpointUnreadable(f"The file {path.name!r} is empty.")
    if kind is FileKind.IMAGE:
        raise CheckpointUnreadable(f"The file {path.name!r} is an image, not a checkpoint.")
    if kind is FileKind.DAMAGED_ZIP:
        raise CheckpointUnreadable(f"The checkpoint {path.name!r} is truncated or damaged.")
    if kind is FileKind.OTHER:
        raise CheckpointUnreadable(f"The file {path.name!r} is not a PyTorch checkpoint.")


def _unreadable(path: Path) -> CheckpointUnreadable:
    return CheckpointUnreadable(f"The checkpoint {path.name!r} is truncated, damaged or not a "
                                "PyTorch checkpoint.")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError):
        raise CheckpointUnreadable(f"The safetensors file {path.name!r} is truncated or "
                                   "damaged.") from None


# --- from a loaded object to a state_dict that fits a model ---------------------------------

def is_state_dict(value: Any) -> bool:
    return (isinstance(value, Mapping) and len(value) > 0
            and all(isinstance(key, str) and isinstance(tensor, torch.Tensor)
                    for key, tensor in value.items()))


def find_state_dict(obj: Any, file_name: str) -> dict[str, torch.Tensor]:
    """The state_dict inside a bare dict or a training wrapper (``{"state_dict": ..., "epoch"}``),
    with every tensor checked to be usable as weights (:func:`check_tensors`)."""
    state_dict = _locate_state_dict(obj, file_name)
    check_tensors(state_dict, file_name)
    return state_dict


def check_tensors(state_dict: Mapping[str, torch.Tensor], file_name: str) -> None:
    """Refuse tensors no model can take, before anything computes on them: tensors without data
    (``meta``), sparse, quantized or nested ones, and views that claim more values than the file
    stores (a stride-0 "bomb": a few bytes on disk whose first full-size operation would
    allocate terabytes). Keeps every later step's memory bounded by the file's size."""
    for key, tensor in state_dict.items():
        problem = _unusable(tensor)
        if problem is not None:
            raise CheckpointUnreadable(f"The checkpoint {file_name!r} stores {key[:80]!r} as "
                                       f"{problem}; only dense tensors with data can be loaded.")


def _unusable(tensor: torch.Tensor) -> str | None:
    if tensor.is_meta:
        return "a tensor without data"
    if tensor.is_nested:
        return "a nested tensor"
    if tensor.layout is not torch.strided:
        return f"a {str(tensor.layout).removeprefix('torch.')} tensor"
    if tensor.is_quantized:
        return "a quantized tensor"
    if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
        return "a view larger than the data it stores"
    return None


def _locate_state_dict(obj: Any, file_name: str) -> dict[str, torch.Tensor]:
    if is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if is_state_dict(inner):
                return dict(inner)
            if isinstance(inner, nn.Module):
                return dict(inner.state_dict())
            if isinstance(inner, Mapping):  # one more level, e.g. {"model": {"state_dict": ..}}
                for nested in WRAPPER_KEYS:
                    if is_state_dict(inner.get(nested)):
                        return dict(inner[nested])
    if isinstance(obj, nn.Module):
        return dict(obj.state_dict())
    raise CheckpointUnrecognized(f"The checkpoint {file_name!r} holds no state_dict (looked for a "
                                 f"dict of tensors, or one under {', '.join(WRAPPER_KEYS[:5])}).")


def candidate_prefixes(keys: list[str]) -> list[str]:
    """Leading prefixes shared by every key, at '.' boundaries, longest last ('' first)."""
    if not keys:
        return [""]
    first = keys[0].split(".")
    prefixes = [""]
    for depth in range(1, len(first)):
        prefix = ".".join(first[:depth]) + "."
        if all(key.startswith(prefix) for key in keys):
            prefixes.append(prefix)
        else:
            break
    return prefixes


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix):]: value for key, value in state_dict.items()}


def fit_prefix(state_dict: Mapping[str, torch.Tensor], expected_keys: set[str]) -> dict[str, torch.Tensor]:
    """Remove the one leading prefix (``module.``, ``_orig_mod.``, ``model.``, ...) that makes the
    keys match the model's; found by matching against the model, not from a fixed list.
    When nothing matches exactly, the unstripped dict is returned for a precise mismatch error."""
    keys = list(state_dict)
    best, best_overlap = dict(state_dict), -1
    for prefix in candidate_prefixes(keys):
        stripped = strip_prefix(state_dict, prefix)
        overlap = len(expected_keys.intersection(stripped))
        if set(stripped) == expected_keys:
            return stripped
        if overlap > best_overlap:
            best, best_overlap = stripped, overlap
    return best


def check_finite(state_dict: Mapping[str, torch.Tensor], file_name: str) -> None:
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() or tensor.is_complex():
            if not _all_finite(tensor):
                raise CheckpointNonfinite(f"The checkpoint {file_name!r} has NaN or infinite "
                                          f"values in {key[:80]!r}.")


def load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], file_name: str) -> None:
    """``load_state_dict(strict=True)`` with a one-sentence error naming the first bad keys.

    A module built on ``meta`` gets the checkpoint's tensors assigned (no copy, no init);
    floating tensors are cast to the model's dtype (a float16 checkpoint runs as float32).
    """
    expected = module.state_dict()
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    misshaped = [key for key, value in state_dict.items()
                 if key in expected and tuple(value.shape) != tuple(expected[key].shape)]
    if missing or unexpected or misshaped:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected),
                            ("wrong shape", misshaped)):
            if keys:
                shown = ", ".join(key[:60] for key in keys[:3])
                more = f" and {len(keys) - 3} more" if len(keys) > 3 else ""
                parts.append(f"{label}: {shown}{more}")
        raise CheckpointMismatch(f"The checkpoint {file_name!r} does not fit the model ("
                                 + "; ".join(parts) + ").")
    cast = {key: value.to(expected[key].dtype)
            if value.is_floating_point() and expected[key].is_floating_point() else value
            for key, value in state_dict.items()}
    on_meta = any(tensor.is_meta for tensor in expected.values())
    try:
        module.load_state_dict(cast, strict=True, assign=on_meta)
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as error:
        # Right names and shapes but a dtype the model cannot take: e.g. an integer tensor
        # assigned into a meta-built model cannot become a Parameter.
        log.debug("load_state_dict of %s failed: %s", file_name, error)
        raise CheckpointMismatch(f"The checkpoint {file_name!r} does not fit the model (a tensor "
                                 "has a dtype the model cannot take).") from None
    if on_meta and any(t.is_meta for t in (*module.parameters(), *module.buffers())):
        raise CheckpointMismatch(f"The checkpoint {file_name!r} does not fit the model (it lacks "
                                 "tensors the model keeps outside its state_dict).")


def _all_finite(tensor: torch.Tensor) -> bool:
    try:
        return bool(torch.isfinite(tensor).all())
    except NotImplementedError:  # e.g. float8_e4m3fn has no isfinite kernel: check as float32
        return bool(torch.isfinite(tensor.float()).all())


def read_checkpoint(path: Path, *, trust_code: bool) -> Any:
    """Weights-only read; with the opt-in, fall back to a full load when that is refused."""
    try:
        return read_weights(path)
    except CheckpointNeedsTrust:
        if not trust_code:
            raise
        return read_trusted(path)
