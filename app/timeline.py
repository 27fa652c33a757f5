"""The learning process: the same images (and a dataset) across a run's checkpoints.

What ``convscope timeline`` and the server's timeline jobs share, besides ``app.pipeline`` (which
turns each image into predictions and panels on each checkpoint) and ``app.evaluation`` (which
runs a dataset through each checkpoint):

* ``ordered_files``: a checkpoint directory's files in training order (``app.checkpoint_order``),
  for callers that load files themselves, one at a time;
* ``dataset_figures`` and ``find_flips``: accuracy and per-class recall of one checkpoint, and
  the dataset images that became wrong or right between consecutive checkpoints;
* ``strip_range`` and ``render_frame``: one colour scale for a whole filmstrip (every frame of an
  image x method x panel across checkpoints), so a map growing or fading over training shows
  as such instead of each frame being stretched to its own maximum;
* ``difference_map``: checkpoint B's map minus A's, on a symmetric scale;
* ``chart_classes`` and ``line_chart_svg``: the top classes' probabilities (or accuracy) over
  training as an inline SVG -- no chart library, no script -- for the report and the page.

Pure functions over arrays and records; no HTTP, no job records, no disk besides
``ordered_files``' directory listing and checkpoint headers.
"""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from app.checkpoint_order import TrainingProgress, in_training_order, read_progress

if TYPE_CHECKING:
    from PIL import Image

    from app.evaluation_metrics import ImageRecords
    from model_adapters.config import CheckpointConfig

CHART_CLASSES = 5           # classes drawn in a probability chart
CHART_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
                 "#7f7f7f")


# --- checkpoints ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CheckpointFile:
    """One file of the run, before it is loaded."""

    path: Path
    file: str
    progress: TrainingProgress

    def record(self) -> dict[str, Any]:
        """The timeline.json checkpoint fields known before loading."""
        return {"file": self.file, "epoch": self.progress.epoch, "step": self.progress.step,
                "order_by": self.progress.order_by}


def ordered_files(directory: Path, config: "CheckpointConfig | None") -> list[CheckpointFile]:
    """The checkpoint files the catalog would list, first-trained first."""
    from app.catalog import checkpoint_files

    files = []
    for path, name in checkpoint_files(directory, config):
        try:
            modified = path.stat().st_mtime
        except OSError:
            continue
        files.append(CheckpointFile(path, name, read_progress(path, modified)))
    return in_training_order(files, lambda item: item.progress, lambda item: item.file)


# --- a dataset across checkpoints ---------------------------------------------------------------

def dataset_figures(records: "ImageRecords", class_names: Sequence[str],
                    classes: Sequence[int]) -> dict[str, Any]:
    """Accuracy and per-class recall (by class name, over the dataset's classes) of one
    checkpoint, and which images it got right (by dataset path)."""
    correct = np.asarray(records.correct, dtype=bool)
    recall = {}
    for index in classes:
        members = records.targets == index
        recall[class_names[index]] = (float(correct[members].mean()) if members.any()
                                      else None)
    return {"accuracy": float(correct.mean()) if len(correct) else None, "recall": recall,
            "correct": dict(zip(records.paths, correct.tolist()))}


def find_flips(steps: Sequence[tuple[str, Mapping[str, bool] | None]]) -> list[dict[str, Any]]:
    """For each consecutive pair of checkpoints that have dataset results (``steps``: file and
    per-image correctness, None for a checkpoint without results, which is skipped), the images
    that went from right to wrong and from wrong to right (images both evaluated, in path
    order)."""
    usable = [(file, correct) for file, correct in steps if correct is not None]
    flips = []
    for (before_file, before), (after_file, after) in zip(usable, usable[1:]):
        shared = sorted(set(before) & set(after))
        flips.append({"from": before_file, "to": after_file,
                      "right_to_wrong": [path for path in shared
                                         if before[path] and not after[path]],
                      "wrong_to_right": [path for path in shared
                                         if not before[path] and after[path]]})
    return flips


def flips_between(before: Mapping[str, bool], after: Mapping[str, bool]) -> dict[str, list[str]]:
    """The flips between any two checkpoints (not only neighbours)."""
    flip = find_flips([("a", before), ("b", after)])[0]
    return {"right_to_wrong": flip["right_to_wrong"], "wrong_to_right": flip["wrong_to_right"]}


# --- one colour scale per filmstrip -------------------------------------------------------------

def strip_range(panels: Sequence[Mapping[str, Any] | None]) -> tuple[float, float] | None:
    """The colour range shared by a filmstrip's frames (panel records; None for a missing
    frame): the union of the frames' display ranges -- symmetric around 0 for signed maps.
    None when no frame is a heatmap."""
    ranges = [(panel["display"]["range"], bool(panel["signed"])) for panel in panels
              if panel is not None and panel.get("kind") == "heatmap" and panel.get("display")]
    if not ranges:
        return None
    if ranges[0][1]:
        bound = max(max(abs(float(low)), abs(float(high))) for (low, high), _ in ranges)
        return (-bound, bound)
    return (min(float(low) for (low, _), _ in ranges),
            max(float(high) for (_, high), _ in ranges))


def render_frame(values: np.ndarray, signed: bool, value_range: tuple[float, float],
                 view: "Image.Image | None" = None) -> bytes:
    """One frame as a PNG at ``value_range``: the coloured map, blended over ``view`` (the
    picture the model saw) when given."""
    from app.rendering import OVERLAY_OPACITY, colorize, encode_png, overlay

    heat = colorize(np.asarray(values, dtype=np.float32), signed, value_range)
    return encode_png(overlay(view, heat, OVERLAY_OPACITY) if view is not None else heat)


def difference_map(before: np.ndarray, after: np.ndarray
                   ) -> tuple[np.ndarray, tuple[float, float]]:
    """``after - before`` and its symmetric colour range (red: grew, blue: faded)."""
    before = np.nan_to_num(np.asarray(before, dtype=np.float32))
    after = np.nan_to_num(np.asarray(after, dtype=np.float32))
    if before.shape != after.shape:
        raise ValueError(f"maps of different shapes {before.shape} and {after.shape}")
    difference = after - before
    bound = float(np.abs(difference).max()) if difference.size else 0.0
    return difference, (-bound, bound)


# --- charts ---------------------------------------------------------------------------------------

def chart_classes(probabilities: Sequence[np.ndarray | None], count: int = CHART_CLASSES
                  ) -> list[int]:
    """Which classes a probability chart draws: every checkpoint's top-1, then the classes with
    the highest probability at any checkpoint, ``count`` at most (top-1s first)."""
    rows = [np.asarray(row) for row in probabilities if row is not None]
    if not rows:
        return []
    chosen: list[int] = []
    for row in rows:
        top = int(np.argmax(row))
        if top not in chosen:
            chosen.append(top)
    peak = np.max(np.stack(rows), axis=0)
    for index in np.argsort(-peak, kind="stable"):
        if len(chosen) >= count:
            break
        if int(index) not in chosen:
            chosen.append(int(index))
    return chosen[:count]


def line_chart_svg(x_labels: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]],
                   *, title: str, y_label: str = "probability", width: int = 560,
                   height: int = 220) -> str:
    """A small line chart as inline SVG (values in 0..1; None leaves a gap), with a legend and
    a ``<title>`` per point for hover text. Escaped: labels may be any class or file name."""
    left, right, top, bottom = 44, 150, 14, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    count = len(x_labels)

    def x(position: int) -> float:
        return left + (plot_w * position / (count - 1) if count > 1 else plot_w / 2)

    def y(value: float) -> float:
        return top + plot_h * (1.0 - min(1.0, max(0.0, value)))

    esc = html.escape
    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} '
             f'{height}" width="{width}" height="{height}" role="img" aria-label="{esc(title)}">',
             f"<title>{esc(title)}</title>"]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(tick):.1f}" '
                     f'y2="{y(tick):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y(tick) + 4:.1f}" text-anchor="end" '
                     f'font-size="10">{tick:g}</text>')
    step = max(1, count // 8)
    for position, label in enumerate(x_labels):
        if position % step == 0 or position == count - 1:
            parts.append(f'<text x="{x(position):.1f}" y="{top + plot_h + 14}" '
                         f'text-anchor="middle" font-size="10">{esc(label[:14])}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" text-anchor="middle" '
                 f'font-size="10">checkpoint (training order)</text>')
    parts.append(f'<text x="10" y="{top + plot_h / 2:.1f}" font-size="10" '
                 f'transform="rotate(-90 10 {top + plot_h / 2:.1f})" text-anchor="middle">'
                 f"{esc(y_label)}</text>")
    for number, (name, values) in enumerate(series):
        colour = CHART_COLOURS[number % len(CHART_COLOURS)]
        segments: list[list[str]] = [[]]
        for position, value in enumerate(values):
            if value is None:
                segments.append([])
                continue
            segments[-1].append(f"{x(position):.1f},{y(float(value)):.1f}")
        for points in segments:
            if len(points) > 1:
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" '
                             f'points="{" ".join(points)}"/>')
        for position, value in enumerate(values):
            if value is not None:
                parts.append(f'<circle cx="{x(position):.1f}" cy="{y(float(value)):.1f}" r="3" '
                             f'fill="{colour}"><title>{esc(name)} at '
                             f"{esc(x_labels[position])}: {float(value):.3f}</title></circle>")
        legend_y = top + 12 + 16 * number
        parts.append(f'<rect x="{left + plot_w + 10}" y="{legend_y - 8}" width="10" height="10" '
                     f'fill="{colour}"/><text x="{left + plot_w + 24}" y="{legend_y + 1}" '
                     f'font-size="11">{esc(name[:20])}</text>')
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["CheckpointFile", "chart_classes", "dataset_figures", "difference_map", "find_flips",
           "flips_between", "line_chart_svg", "ordered_files", "render_frame", "strip_range"]
