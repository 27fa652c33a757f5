"""When to use incremental inference, and the occluded copies' logits through it.

By default (``engine=None``) the model is traced once (cached per model), then, once per
model, input shape and window size, one occluded copy is evaluated both ways: the incremental
engine is used when it matches the full forward pass and its estimated convolution work is at
most ``MAX_WORK_SHARE`` of the full passes'. Otherwise -- or when the model cannot be traced --
the dense batched path runs, and the reason is logged once per model. ``"incremental"`` skips
the work test (the result is exact either way); ``"dense"`` always runs full passes.
"""
from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from visualizations.incremental.engine import DENSE_SHARE, ImageCache, NotIncremental, TracedModel
from visualizations.incremental.patched import cut

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

ENGINES = ("incremental", "dense")
# Above this share of the full passes' convolution work (multiply-accumulates, estimated on the
# probe window), full passes run: little is left to save. The estimate is cautious -- time
# falls faster than the count (mobilenet_v3_large at 224 px, window 16: 77 % of the work in
# 0.57x the dense time, measured side by side) -- but near 1 there is little left to gain
# and the windows' bookkeeping still to pay.
MAX_WORK_SHARE = 0.8
# The probe's incremental logits must match a full forward pass this closely (relative to the
# largest logit); float32 rounding differences are near 1e-6.
PROBE_TOLERANCE = 1e-4
# Where a layer switches to full maps (``engine.DENSE_SHARE``) is chosen by measured time: the
# first map of a model x input x window tries each of these on its first batches (every choice
# gives the same exact result), three times each, interleaved, and keeps the fastest per window.
# Measured side by side (224 px, window 16, stride 8, every second window, 1 thread; time /
# dense batches of 16): resnet18 0.44x / 0.42x / 0.39x / 0.38x at 0.45 / 0.6 / 0.75 / 1.0 (1.0:
# only windows that cover the whole map switch); resnet50 ran fastest at 0.45.
SHARE_CANDIDATES = (0.45, 0.6, 0.75, 1.0)
TRIALS_PER_SHARE = 3
# A batch of fewer windows says little about a full batch's time per window: it is not a trial.
MIN_TRIAL_WINDOWS = 8


@dataclass(frozen=True)
class Choice:
    engine: str          # "incremental" or "dense"
    note: str            # for the panel: which path ran, and why


@dataclass(frozen=True)
class Probe:
    """One centre window evaluated both ways."""

    problem: str         # why the incremental result cannot be used ("" if it can)
    share: float         # its convolution work / the full passes'
    dense_from: str      # where it switched to full maps


_LOCK = threading.Lock()
_TRACED: "weakref.WeakKeyDictionary[torch.nn.Module, TracedModel | NotIncremental]" = \
    weakref.WeakKeyDictionary()
_PROBES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, Probe]]" = \
    weakref.WeakKeyDictionary()
_LOGGED: "weakref.WeakKeyDictionary[torch.nn.Module, set[str]]" = weakref.WeakKeyDictionary()
_SHARES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, float]]" = \
    weakref.WeakKeyDictionary()


class SwitchOverTuner:
    """The dense switch-over share for one model x input x window, chosen by measured time.

    ``share()`` says which share the next batch runs with; ``record()`` takes its seconds. Until
    every candidate has run ``TRIALS_PER_SHARE`` batches, the candidates take turns; then the one
    with the least time per window (best of its trials) is kept for the model, so later maps
    start with it.
    """

    def __init__(self, module: "torch.nn.Module", key: tuple) -> None:
        self.module, self.key = module, key
        with _LOCK:
            known = _SHARES.get(module, {}).get(key)
        self.chosen: float | None = known
        self.trials: list[float] = [] if known is not None else \
            [share for _ in range(TRIALS_PER_SHARE) for share in SHARE_CANDIDATES]
        self.best: dict[float, float] = {}

    def share(self) -> float:
        if self.chosen is not None:
            return self.chosen
        return self.trials[0] if self.trials else DENSE_SHARE

    def record(self, share: float, seconds: float, windows: int) -> None:
        if self.chosen is not None or not self.trials or share != self.trials[0] \
                or windows < MIN_TRIAL_WINDOWS:
            return
        self.trials.pop(0)
        per_window = seconds / max(1, windows)
        self.best[share] = min(per_window, self.best.get(share, per_window))
        if not self.trials:
            self.chosen = min(self.best, key=self.best.__getitem__)
            with _LOCK:
                _SHARES.setdefault(self.module, {})[self.key] = self.chosen
            log.info("incremental occlusion for %s switches to full maps at %.2f of a map "
                     "(seconds per window: %s)", type(self.module).__name__, self.chosen,
                     ", ".join(f"{share}: {value:.4f}" for share, value in self.best.items()))


def input_key(image: "torch.Tensor", size: tuple[int, int]) -> tuple:
    """What the engine's choices depend on besides the model: input shape, window, dtype, device."""
    return (tuple(image.shape), tuple(size), image.dtype, str(image.device))


def _log_once(module: "torch.nn.Module", reason: str) -> None:
    with _LOCK:
        seen = _LOGGED.setdefault(module, set())
        if reason in seen:
            return
        seen.add(reason)
    log.info("occlusion runs full forward passes for %s: %s", type(module).__name__, reason)


def traced(module: "torch.nn.Module") -> TracedModel:
    """The model's traced graph (cached per model); raises NotIncremental with the reason."""
    with _LOCK:
        known = _TRACED.get(module)
    if known is None:
        try:
            known = TracedModel(module)
        except NotIncremental as error:
            known = error
        with _LOCK:
            _TRACED[module] = known
    if isinstance(known, NotIncremental):
        raise known
    return known


def windows_patch(fill: "torch.Tensor", image: "torch.Tensor",
                  corners: list[tuple[int, int] | None],
                  size: tuple[int, int]) -> tuple["torch.Tensor", np.ndarray, np.ndarray]:
    """The input patches of occluded copies: ``fill``'s windows at ``corners``; ``None`` (the
    unoccluded image) is the image's own top-left window, which changes nothing."""
    top = np.array([corner[0] if corner else 0 for corner in corners], dtype=np.int64)
    left = np.array([corner[1] if corner else 0 for corner in corners], dtype=np.int64)
    patch = cut(fill, top, left, size)
    for row, corner in enumerate(corners):
        if corner is None:
            patch[row] = image[0, :, :size[0], :size[1]]
    return patch, top, left


def choose(module: "torch.nn.Module", engine: str | None, image: "torch.Tensor",
           fill: "torch.Tensor", size: tuple[int, int],
           cache_of: Callable[[TracedModel], ImageCache]) -> tuple[Choice, TracedModel | None,
                                                                     ImageCache | None]:
    """Which path runs, with the traced model and the image's cache when it is incremental."""
    if engine == "dense":
        return Choice("dense", "Computed with full forward passes (engine=dense)."), None, None
    try:
        model = traced(module)
    except NotIncremental as error:
        return _dense(module, f"{error}"), None, None
    key = input_key(image, size)
    with _LOCK:
        probe = _PROBES.get(module, {}).get(key)
    if probe is not None and probe.problem:
        return _dense(module, probe.problem), None, None
    try:
        cache = cache_of(model)
        if probe is None:
            probe = _probe(module, model, cache, image, fill, size)
    except Exception as error:  # noqa: BLE001 - an engine failure must never fail the map
        log.warning("incremental occlusion failed for %s", type(module).__name__, exc_info=True)
        probe = Probe(f"incremental inference failed ({type(error).__name__}: "
                      f"{str(error)[:120]})", 1.0, "")
    with _LOCK:
        _PROBES.setdefault(module, {})[key] = probe
    if probe.problem:
        return _dense(module, probe.problem), None, None
    where = f"; from {probe.dense_from} on, layers run in full" if probe.dense_from else ""
    if probe.share > MAX_WORK_SHARE and engine != "incremental":
        return _dense(module, f"incremental inference would still do {probe.share:.0%} of "
                              f"their convolution work{where}"), None, None
    return (Choice("incremental", f"Computed incrementally (exact): {probe.share:.0%} of the "
                                  f"convolution work of full forward passes{where}."),
            model, cache)


def _dense(module: "torch.nn.Module", reason: str) -> Choice:
    _log_once(module, reason)
    return Choice("dense", f"Computed with full forward passes: {reason}.")


def _probe(module: "torch.nn.Module", model: TracedModel, cache: ImageCache,
           image: "torch.Tensor", fill: "torch.Tensor", size: tuple[int, int]) -> Probe:
    """One window at the centre, both ways: is it exact here, and how much work does it save?"""
    import torch

    height, width = image.shape[-2:]
    corner = ((height - size[0]) // 2, (width - size[1]) // 2)
    patch, top, left = windows_patch(fill, image, [corner], size)
    logits, stats = model.run(cache, patch, top, left)
    copy = image.clone(memory_format=torch.channels_last)
    copy[:, :, corner[0]:corner[0] + size[0], corner[1]:corner[1] + size[1]] = \
        fill[:, :, corner[0]:corner[0] + size[0], corner[1]:corner[1] + size[1]]
    with torch.inference_mode():
        reference = module(copy)
    if not isinstance(logits, torch.Tensor) or not isinstance(reference, torch.Tensor) or \
            logits.shape != reference.shape:
        return Probe("the model's output is not one tensor", 1.0, "")
    error = float((logits.double() - reference.double()).abs().max())
    scale = max(1.0, float(reference.double().abs().max()))
    if not error <= PROBE_TOLERANCE * scale:
        log.warning("incremental inference differs from a full pass by %.3g for %s", error,
                    type(module).__name__)
        return Probe(f"incremental inference differed from a full pass by {error:.2g}", 1.0, "")
    return Probe("", stats.share, stats.dense_from)
