"""Occlusion: how much the target probability drops when a square patch of the image is hidden.

Zeiler & Fergus (2014), "Visualizing and Understanding Convolutional Networks",
https://arxiv.org/abs/1311.2901. A window slides over the image; for every position the patch
is replaced by a fill and the model is evaluated again. Each pixel's value is the mean drop in
the target's probability over all windows that cover it (as captum's ``Occlusion`` computes
it), so the map is signed: positive where hiding the pixel hurts the prediction, negative where
hiding it helps.

The occluded copies run in batches under ``torch.inference_mode()`` in channels-last memory.
This is our own sliding window rather than captum's ``Occlusion``: the same arithmetic, but it
reports progress, stops on cancellation between batches, and retries a batch at half the size
after running out of GPU memory (see ``benchmarks/occlusion_speed.py`` for the timings).

When the model's graph allows it (``engine`` left at its default), the copies are not run in full: the
unoccluded image's activations are cached and only the part of each layer a window changes is
recomputed (``visualizations.incremental``, after Krypton, Nakandala et al. 2019). That is the
same arithmetic on the same numbers, so the map equals the dense one up to float rounding; the
panel's note says which path ran. ``engine="dense"`` forces full forward passes.

Caveat: the map is only as fine as the stride, and the fill itself is a stimulus the model may
react to (a black square is not "nothing").
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.errors import BadParameter
from visualizations.base import (AUTO, Attribution, Panel, RunContext, TargetInfo, Visualization,
                                 param)
from visualizations.batching import choose_batch_size, for_each_batch, is_out_of_memory
from visualizations.common import as_model_input, blurred, check_finite, pixel_values
from visualizations.incremental.auto import (ENGINES, SwitchOverTuner, choose, input_key,
                                             windows_patch)

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel, ModelMeta

log = logging.getLogger(__name__)

FILLS = ("mean", "black", "gray", "blur")
MAX_WINDOW_PX = 2048


@dataclass(frozen=True)
class OcclusionParams:
    window: int | None = param(AUTO, label="Window (px)", min=1, max=MAX_WINDOW_PX,
                               help="Side of the hidden square in model-input pixels "
                                    "(default: 1/8 of the input side).")
    stride: int | None = param(AUTO, label="Stride (px)", min=1, max=MAX_WINDOW_PX,
                               help="Step between window positions, at most the window "
                                    "(default: half the window).")
    fill: str = param("mean", label="Fill", choices=FILLS,
                      help="What replaces the hidden patch: the training mean colour, black, "
                           "mid gray, or a blurred copy of the image.")
    engine: str | None = param(AUTO, label="Engine", choices=ENGINES,
                               help="How the occluded copies are evaluated (default: "
                                    "incremental where it saves work). incremental: recompute "
                                    "only what each window changes (exact); dense: full "
                                    "forward passes.")


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride`` pixels, plus a last window flush with
    the far edge so every pixel is covered."""
    starts = list(range(0, length - window + 1, stride))
    if starts[-1] != length - window:
        starts.append(length - window)
    return starts


def fill_image(kind: str, meta: "ModelMeta", inputs: "torch.Tensor",
               window: int) -> "torch.Tensor":
    """What the hidden patch shows, as a full (1, C, H, W) image to copy patches from.

    ``mean`` is the normalization mean colour (0 after normalization: what the model saw on
    average in training); ``gray`` is mid gray 0.5; ``blur`` is the image blurred so a window's
    content is unrecognizable (sigma = window / 2).
    """
    if kind == "blur":
        return blurred(inputs, max(1.0, window / 2.0))
    value = {"black": 0.0, "gray": 0.5}.get(kind)
    if value is None:  # mean
        return (inputs * 0).contiguous()
    return pixel_values(meta, inputs, value).expand_as(inputs).contiguous()


@dataclass(frozen=True)
class OccludedRun:
    """The probabilities of the chosen classes for every occluded copy, and which path ran."""

    probabilities: np.ndarray      # (copies, classes)
    engine: str                    # "incremental" or "dense"
    note: str


def occluded_probabilities(model: "LoadedModel", inputs: "torch.Tensor",
                           fill: "torch.Tensor", windows: list[tuple[int, int] | None],
                           size: tuple[int, int], classes: list[int],
                           context: RunContext, engine: str | None = None) -> OccludedRun:
    """Probabilities of ``classes`` for every occluded copy: (len(windows), len(classes)).

    ``windows`` are (top, left) corners of ``size`` (height, width) rectangles; ``None`` means
    the unoccluded image (so the reference probability comes from the very same computation).
    Copies are evaluated in batches under inference mode, incrementally unless ``engine`` is
    ``"dense"`` and where the model allows it (see ``choose``); progress is the share done.
    """
    import torch

    height, width = size
    results = np.empty((len(windows), len(classes)), dtype=np.float64)
    class_index = torch.tensor(classes, device=inputs.device)
    choice, traced, cache = choose(model.module, engine, inputs, fill, size,
                                   lambda traced_model: traced_model.cache(inputs))

    failure: list[str] = []

    tuner = SwitchOverTuner(model.module, input_key(inputs, size)) if traced else None

    def outputs(start: int, stop: int) -> "torch.Tensor":
        if traced is not None and cache is not None and tuner is not None and not failure:
            patch, top, left = windows_patch(fill, inputs, windows[start:stop], size)
            share = tuner.share()
            try:
                started = time.perf_counter()
                logits = traced.run(cache, patch, top, left, dense_share=share)[0]
                if logits.is_cuda:      # time the work, not its queueing
                    torch.cuda.synchronize(logits.device)
                tuner.record(share, time.perf_counter() - started, stop - start)
                return logits
            except Exception as error:  # noqa: BLE001 - never fail a map the dense path can do
                if is_out_of_memory(error):
                    raise
                log.warning("incremental occlusion failed; running full passes", exc_info=True)
                failure.append(f"{type(error).__name__}: {str(error)[:120]}")
        copies = inputs.expand(stop - start, -1, -1, -1).clone(
            memory_format=torch.channels_last)
        for row, corner in enumerate(windows[start:stop]):
            if corner is None:
                continue
            top, left = corner
            copies[row, :, top:top + height, left:left + width] = \
                fill[0, :, top:top + height, left:left + width]
        return model.module(copies)

    def process(start: int, stop: int) -> None:
        with torch.inference_mode():
            logits = outputs(start, stop)
            check_finite(logits, "outputs for an occluded image")
            probabilities = torch.softmax(logits.float(), dim=1).index_select(1, class_index)
        results[start:stop] = probabilities.cpu().numpy()

    size_hint = choose_batch_size(model, inputs, context, backward=False)
    for_each_batch(len(windows), size_hint, process, context)
    if failure:
        return OccludedRun(results, "dense", "Computed with full forward passes from the batch "
                                             "where incremental inference failed "
                                             f"({failure[0]}) on.")
    return OccludedRun(results, choice.engine, choice.note)


def resolve_window(params: OcclusionParams, meta: "ModelMeta") -> OcclusionParams:
    side = min(meta.input_size)
    window = params.window if params.window is not None else max(1, round(side / 8))
    if window > side:
        raise BadParameter(f"Parameter 'window' = {window} is larger than the model's input "
                           f"side; it must be in [1, {side}].", fields={"window": f"in [1, {side}]"})
    stride = params.stride if params.stride is not None else max(1, window // 2)
    if stride > window:
        raise BadParameter(f"Parameter 'stride' = {stride} is larger than the window; it must "
                           f"be in [1, {window}].", fields={"stride": f"in [1, {window}]"})
    return OcclusionParams(window=window, stride=stride, fill=params.fill, engine=params.engine)


class OcclusionMap(Visualization):
    name = "occlusion"
    title = "Occlusion"
    description = ("Hides one square patch at a time and shows how much the class probability "
                   "drops. Signed: red where hiding the patch hurts the prediction, blue where "
                   "it helps.")
    reference = "https://arxiv.org/abs/1311.2901"
    Params = OcclusionParams
    # Version 2: the panel notes which path (incremental or dense) computed the map.
    version = 2

    def resolve(self, params: Any, meta: "ModelMeta") -> OcclusionParams:
        return resolve_window(params, meta)

    def cost(self, params: Any, meta: "ModelMeta") -> int:
        params = resolve_window(params, meta)
        height, width = meta.input_size
        return 1 + (len(window_starts(height, params.window, params.stride))
                    * len(window_starts(width, params.window, params.stride)))

    def compute(self, model: "LoadedModel", batch: "torch.Tensor", target: TargetInfo,
                params: OcclusionParams, context: RunContext) -> Attribution:
        inputs = as_model_input(batch.detach())
        height, width = inputs.shape[-2:]
        window, stride = params.window, params.stride
        rows, columns = window_starts(height, window, stride), window_starts(width, window, stride)
        windows = [(top, left) for top in rows for left in columns]
        fill = fill_image(params.fill, model.meta, inputs, window)
        run = occluded_probabilities(model, inputs, fill, [None, *windows], (window, window),
                                     [target.index], context, params.engine)
        probabilities = run.probabilities[:, 0]
        drops = probabilities[0] - probabilities[1:]
        # Each pixel: the mean drop over the windows that cover it.
        total = np.zeros((height, width), dtype=np.float64)
        count = np.zeros((height, width), dtype=np.float64)
        for (top, left), drop in zip(windows, drops):
            total[top:top + window, left:left + window] += drop
            count[top:top + window, left:left + window] += 1
        values = (total / np.maximum(count, 1)).astype(np.float32)
        return Attribution((Panel(f"Occlusion for {target.label} (probability drop)", values,
                                  signed=True, target=target, notes=(run.note,),
                                  extra={"engine": run.engine}),))
