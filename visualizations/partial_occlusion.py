"""Partial occlusion: the class probabilities of the top classes as a window hides each cell of a
coarse grid -- the view of Merantix's Picasso (https://github.com/merantix/picasso), after
Zeiler & Fergus (2014), https://arxiv.org/abs/1311.2901.

Unlike ``occlusion`` (a fine, signed map of the drop for one class), this shows one map per
class of the *probability itself* with each cell hidden, all on one shared 0-1 scale, so
classes can be compared: where the map is dark, hiding that cell takes the class away. A
picture of the grid with one example occluded cell shows what the model was given.

Each pixel shows the probability with its nearest window hidden. That is only a measurement for
that pixel when the windows cover the whole image (then the nearest window always covers it), so
settings whose windows leave gaps -- e.g. 2 positions of a 0.1 window, which hide 4 % of the
image -- are refused with ``E_BAD_PARAMETER``, naming the settings that would cover it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from app.errors import BadParameter
from visualizations.base import AUTO, Attribution, Panel, RunContext, TargetInfo, Visualization, param
from visualizations.common import as_model_input, model_view_rgb
from visualizations.incremental.auto import ENGINES
from visualizations.occlusion import FILLS, fill_image, occluded_probabilities

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel, ModelMeta


@dataclass(frozen=True)
class PartialOcclusionParams:
    window_fraction: float = param(0.25, label="Window size", min=0.05, max=0.5,
                                   help="Side of the hidden window as a fraction of the image "
                                        "side.")
    positions: int = param(8, label="Positions per axis", min=2, max=30,
                           help="Window positions along each axis (the grid is positions "
                                "x positions).")
    fill: str = param("mean", label="Fill", choices=FILLS,
                      help="What replaces the hidden window: the training mean colour, black, "
                           "mid gray, or a blurred copy of the image.")
    engine: str | None = param(AUTO, label="Engine", choices=ENGINES,
                               help="How the occluded copies are evaluated (default: "
                                    "incremental where it saves work). incremental: recompute "
                                    "only what each window changes (exact); dense: full "
                                    "forward passes.")
    top_k: int = param(3, label="Classes", min=1, max=10,
                       help="How many classes to show: the target, then the most probable "
                            "others.")


def grid_starts(length: int, window: int, positions: int) -> list[int]:
    """``positions`` window offsets spread evenly from one edge to the other."""
    return [int(round(value)) for value in np.linspace(0, length - window, positions)]


def window_side(fraction: float, length: int) -> int:
    return max(1, round(fraction * length))


def covers(length: int, window: int, positions: int) -> bool:
    """Whether ``positions`` windows of ``window`` pixels, spread by :func:`grid_starts`, hide
    every pixel of an axis of ``length`` pixels at least once."""
    starts = grid_starts(length, window, positions)
    return starts[0] == 0 and starts[-1] + window >= length and \
        all(later - earlier <= window for earlier, later in zip(starts, starts[1:]))


def check_coverage(params: "PartialOcclusionParams", size: tuple[int, int]) -> None:
    """Refuse settings whose windows leave pixels that no window hides (E_BAD_PARAMETER)."""
    def covered(fraction: float, positions: int) -> bool:
        return all(covers(length, window_side(fraction, length), positions) for length in size)

    if covered(params.window_fraction, params.positions):
        return
    spec = {f.name: f.metadata for f in dataclasses.fields(PartialOcclusionParams)}
    most_positions = int(spec["positions"]["max"])
    enough_positions = next((n for n in range(params.positions, most_positions + 1)
                             if covered(params.window_fraction, n)), None)
    fractions = np.arange(round(params.window_fraction, 2), spec["window_fraction"]["max"] + 1e-9,
                          0.01)
    enough_fraction = next((float(f) for f in fractions if covered(float(f), params.positions)),
                           None)
    options = []
    if enough_positions is not None:
        options.append(f"at least {enough_positions} positions")
    if enough_fraction is not None:
        options.append(f"a window fraction of at least {enough_fraction:.2f}")
    raise BadParameter(
        f"{params.positions} positions of a {params.window_fraction:g} window leave parts of the "
        f"image that no window hides, so the map would show values nobody measured; use "
        f"{' or '.join(options)}.",
        fields={"positions": "too few to cover the image with this window",
                "window_fraction": "too small to cover the image with these positions"})


def nearest_cell(length: int, starts: list[int], window: int) -> np.ndarray:
    """For each pixel along an axis, the index of the window whose centre is nearest."""
    centres = np.asarray(starts, dtype=np.float64) + window / 2.0
    pixels = np.arange(length, dtype=np.float64) + 0.5
    return np.abs(pixels[:, None] - centres[None, :]).argmin(axis=1)


def grid_picture(occluded_view: np.ndarray, row_cell: np.ndarray,
                 column_cell: np.ndarray) -> np.ndarray:
    """The occluded example with thin light lines on the cell borders: uint8 (H, W, 3)."""
    picture = occluded_view.astype(np.float32)
    row_border = np.flatnonzero(np.diff(row_cell)) + 1
    column_border = np.flatnonzero(np.diff(column_cell)) + 1
    line = np.zeros(picture.shape[:2], dtype=bool)
    line[row_border, :] = True
    line[:, column_border] = True
    picture[line] = 0.5 * picture[line] + 0.5 * 255.0
    return picture.clip(0, 255).astype(np.uint8)


class PartialOcclusionMap(Visualization):
    name = "partial_occlusion"
    title = "Partial occlusion"
    description = ("Hides each cell of a coarse grid in turn and shows the probability of each "
                   "of the top classes, all on one 0-1 scale: dark cells are where hiding the "
                   "image takes the class away.")
    reference = "https://arxiv.org/abs/1311.2901"
    Params = PartialOcclusionParams
    # Version 2: settings whose windows leave pixels unhidden are refused.
    # Version 3: each class panel notes which path (incremental or dense) computed it.
    version = 3

    def resolve(self, params: Any, meta: "ModelMeta") -> PartialOcclusionParams:
        check_coverage(params, meta.input_size)
        return params

    def cost(self, params: Any, meta: "ModelMeta") -> int:
        return 1 + params.positions ** 2

    def compute(self, model: "LoadedModel", batch: "torch.Tensor", target: TargetInfo,
                params: PartialOcclusionParams, context: RunContext) -> Attribution:
        inputs = as_model_input(batch.detach())
        height, width = inputs.shape[-2:]
        check_coverage(params, (height, width))      # the batch may differ from the meta's size
        window_h = window_side(params.window_fraction, height)
        window_w = window_side(params.window_fraction, width)
        rows = grid_starts(height, window_h, params.positions)
        columns = grid_starts(width, window_w, params.positions)
        windows = [(top, left) for top in rows for left in columns]
        fill = fill_image(params.fill, model.meta, inputs, min(window_h, window_w))

        # The classes: the target first, then the most probable others.
        with_probabilities = occluded_probabilities(
            model, inputs, fill, [None], (window_h, window_w),
            list(range(model.meta.num_classes)),
            # Cancellation but no progress: this single pass is not part of the grid's share.
            RunContext(cancel_event=context.cancel_event, batch_size=context.batch_size),
            engine="dense").probabilities[0]
        ranked = [int(i) for i in np.argsort(-with_probabilities, kind="stable")]
        classes = [target.index] + [i for i in ranked if i != target.index]
        classes = classes[:min(params.top_k, model.meta.num_classes)]

        run = occluded_probabilities(model, inputs, fill, windows, (window_h, window_w), classes,
                                     context, params.engine)
        grid = run.probabilities.reshape(len(rows), len(columns), len(classes))
        row_cell = nearest_cell(height, rows, window_h)
        column_cell = nearest_cell(width, columns, window_w)

        panels = []
        for number, class_index in enumerate(classes):
            values = grid[row_cell[:, None], column_cell[None, :], number].astype(np.float32)
            info = TargetInfo(class_index, model.meta.class_names[class_index],
                              float(with_probabilities[class_index]))
            panels.append(Panel(f"P({info.label}) with each cell hidden", values, signed=False,
                                target=info, scale=(0.0, 1.0), notes=(run.note,),
                            extra={"engine": run.engine}))

        # One example: the window nearest the centre, hidden exactly as the model saw it.
        example = (rows[len(rows) // 2], columns[len(columns) // 2])
        occluded = inputs[:1].clone()
        top, left = example
        occluded[0, :, top:top + window_h, left:left + window_w] = \
            fill[0, :, top:top + window_h, left:left + window_w]
        picture = grid_picture(model_view_rgb(model.meta, occluded), row_cell, column_cell)
        panels.append(Panel(f"The {len(rows)}x{len(columns)} grid, one cell hidden", picture,
                            kind="image"))
        return Attribution(tuple(panels))
