"""Window arithmetic for incremental inference: which part of a feature map can change.

Pure numpy on (B,) vectors of window starts, one axis at a time. A *window* is a run of
``size`` positions starting at ``starts[b]`` for each copy ``b`` of the batch; all copies of a
batch share the size, so their windows stack into one tensor. A window may be larger than the
set of positions that really changed: everything inside it is recomputed exactly, so only
missing a changed position would be wrong, never covering an unchanged one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SlidingAxis:
    """One spatial axis of a sliding-window operation (convolution or pooling)."""

    kernel: int
    stride: int
    padding: int        # positions of padding before the first input position
    dilation: int
    out_size: int       # the operation's output length along this axis (from the cached run)

    @property
    def reach(self) -> int:
        """How far past its first input position one output reads."""
        return self.dilation * (self.kernel - 1)


def affected_outputs(starts: np.ndarray, size: int, axis: SlidingAxis) -> tuple[np.ndarray, int]:
    """Output windows (starts, shared size) holding every output that reads an input position
    in ``[starts[b], starts[b] + size)``.

    Output ``o`` reads inputs ``o * stride - padding + j * dilation`` for ``j < kernel``, so it
    is affected when ``o * stride - padding <= last`` and ``o * stride - padding + reach >=
    first``. Windows are clamped into the map (shifted, not shrunk, so the size stays shared).
    """
    first = starts.astype(np.int64)
    last = first + size - 1
    low = np.maximum(0, -((-(first + axis.padding - axis.reach)) // axis.stride))  # ceil
    high = np.minimum(axis.out_size - 1, (last + axis.padding) // axis.stride)
    out = int(min(axis.out_size, max(1, int((high - low + 1).max()))))
    return np.clip(low, 0, axis.out_size - out), out


def input_span(out_starts: np.ndarray, out_size: int,
               axis: SlidingAxis) -> tuple[np.ndarray, int]:
    """The input positions (starts, shared size) that output windows read, padding included:
    starts may be negative and windows may run past the map's end."""
    return (out_starts * axis.stride - axis.padding,
            (out_size - 1) * axis.stride + axis.reach + 1)


def union(windows: list[tuple[np.ndarray, int]], length: int) -> tuple[np.ndarray, int]:
    """One window per copy covering all of ``windows`` (each (starts, size)) on an axis of
    ``length`` positions."""
    low = np.min([starts for starts, _ in windows], axis=0)
    high = np.max([starts + size for starts, size in windows], axis=0)
    size = int(min(length, (high - low).max()))
    return np.clip(low, 0, length - size), size
