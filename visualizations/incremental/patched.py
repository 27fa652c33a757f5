"""Feature maps that differ from a cached map only inside one window per copy.

A :class:`Patched` value stands for a batch of ``B`` feature maps (B, C, H, W): each equals the
cached map of the unoccluded image, except inside its own window, where it equals its slice of
``patch``. :func:`gather` cuts any other window out of such a batch (zero or ``-inf`` outside
the map, as convolution and max-pooling padding need); :func:`materialize` builds the full maps.
Both gather rows of ``C`` channel values from a channels-last (H, W, C) view in one indexing
call per tensor, so a batch costs a handful of kernels rather than a Python loop per copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass
class Patched:
    cache: "torch.Tensor"        # (1, C, H, W): the unoccluded image's map
    patch: "torch.Tensor"        # (B, C, h, w): each copy's values inside its window
    top: np.ndarray              # (B,) window rows start here
    left: np.ndarray             # (B,) window columns start here

    @property
    def batch(self) -> int:
        return int(self.patch.shape[0])

    @property
    def map_size(self) -> tuple[int, int]:
        return int(self.cache.shape[-2]), int(self.cache.shape[-1])

    @property
    def window_size(self) -> tuple[int, int]:
        return int(self.patch.shape[-2]), int(self.patch.shape[-1])

    def logical_shape(self) -> "torch.Size":
        import torch

        return torch.Size((self.batch, *self.cache.shape[1:]))

    def covers(self, top: np.ndarray, left: np.ndarray, size: tuple[int, int]) -> bool:
        """Whether this value's windows are exactly the given ones."""
        return (self.window_size == tuple(size) and np.array_equal(self.top, top)
                and np.array_equal(self.left, left))


def _channels_last_rows(tensor: "torch.Tensor") -> "torch.Tensor":
    """(N, C, H, W) as (N, H, W, C), contiguous (free for channels-last tensors)."""
    return tensor.permute(0, 2, 3, 1).contiguous()


def _to_nchw(rows: "torch.Tensor") -> "torch.Tensor":
    """(N, H, W, C) contiguous as a channels-last (N, C, H, W) tensor, without copying."""
    return rows.permute(0, 3, 1, 2)


def gather(value: Patched, top: np.ndarray, left: np.ndarray, size: tuple[int, int],
           outside: float = 0.0) -> "torch.Tensor":
    """The (B, C, h, w) channels-last windows of ``value``'s maps at (top, left) of ``size``;
    positions outside the map read ``outside``."""
    import torch

    height, width = value.map_size
    h, w = size
    rows = top[:, None] + np.arange(h)[None, :]                    # (B, h)
    columns = left[:, None] + np.arange(w)[None, :]                # (B, w)
    index = (np.clip(rows, 0, height - 1)[:, :, None] * width
             + np.clip(columns, 0, width - 1)[:, None, :])           # (B, h, w)
    device = value.cache.device
    source = _channels_last_rows(value.cache).view(height * width, -1)
    channels = source.shape[1]
    out = source.index_select(0, torch.from_numpy(index.reshape(-1)).to(device))
    out = out.view(value.batch, h, w, channels)
    inside_rows = (rows >= 0) & (rows < height)
    inside_columns = (columns >= 0) & (columns < width)
    if not (inside_rows.all() and inside_columns.all()):
        outside_mask = ~(inside_rows[:, :, None] & inside_columns[:, None, :])
        out.masked_fill_(torch.from_numpy(outside_mask).to(device)[..., None], outside)
    _overlay(out, value, top, left)
    return _to_nchw(out)


def _overlay(out: "torch.Tensor", value: Patched, top: np.ndarray, left: np.ndarray) -> None:
    """Write ``value``'s patches into ``out`` (B, h, w, C): windows at (top, left)."""
    import torch

    batch, h, w, channels = out.shape
    ph, pw = value.window_size
    if ph * pw == 0:
        return
    # Each patch position relative to the output window; keep those that fall inside it.
    rows = (value.top - top)[:, None] + np.arange(ph)[None, :]            # (B, ph)
    columns = (value.left - left)[:, None] + np.arange(pw)[None, :]       # (B, pw)
    destination = (np.arange(batch)[:, None, None] * (h * w) + rows[:, :, None] * w
                   + columns[:, None, :])                                  # (B, ph, pw)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((columns >= 0) & (columns < w))[:, None, :]
    source = _channels_last_rows(value.patch).view(-1, channels)
    flat = out.view(-1, channels)
    device = out.device
    if inside.all():
        flat.index_copy_(0, torch.from_numpy(destination.reshape(-1)).to(device), source)
        return
    keep = np.flatnonzero(inside.reshape(-1))
    if keep.size:
        flat.index_copy_(0, torch.from_numpy(destination.reshape(-1)[keep]).to(device),
                         source.index_select(0, torch.from_numpy(keep).to(device)))


def materialize(value: Patched) -> "torch.Tensor":
    """The full (B, C, H, W) channels-last maps."""
    import torch

    batch = value.batch
    # A copy even for one copy (``contiguous`` would return the cache itself, and the
    # overlay below would then write into it).
    rows = _channels_last_rows(value.cache).expand(batch, -1, -1, -1).clone(
        memory_format=torch.contiguous_format)
    _overlay(rows, value, np.zeros(batch, dtype=np.int64), np.zeros(batch, dtype=np.int64))
    return _to_nchw(rows).contiguous(memory_format=torch.channels_last)


def cut(tensor: "torch.Tensor", top: np.ndarray, left: np.ndarray,
        size: tuple[int, int]) -> "torch.Tensor":
    """Windows of one unchanging (1, C, H, W) map, one per copy: (B, C, h, w)."""
    holder = Patched(tensor, tensor.new_empty((len(top), tensor.shape[1], 0, 0)), top, left)
    return gather(holder, top, left, size)
