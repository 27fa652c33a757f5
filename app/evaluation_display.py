"""What the evaluation page and the CLI's ``report.html`` draw, from a stored summary and its
per-image records: the confusion matrix as coloured, linked cells (at most ``MATRIX_MAX``
classes, those with the most confusions), the per-class table in a chosen order, the images of
one cell, and the reliability diagram's geometry. Plain dicts and numbers -- no Flask, no
files; links are made by the caller's ``cell_link`` (so the page links to itself and the static
report to its own anchors).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np

from app.evaluation_metrics import ImageRecords

MATRIX_MAX = 30
LEVELS = 9          # colour steps of a cell: 0 (empty) .. LEVELS
OTHER = "other"
SORT_KEYS = ("recall", "precision", "support", "correct", "label", "index")


def parse_cell(raw: Any) -> tuple[int, int | str] | None:
    """``"3:5"`` or ``"3:other"`` -> (3, 5) / (3, "other"); anything else -> None."""
    if not isinstance(raw, str) or raw.count(":") != 1:
        return None
    row, column = raw.split(":")
    if not row.isdigit() or not (column.isdigit() or column == OTHER):
        return None
    return int(row), int(column) if column.isdigit() else OTHER


def shown_classes(summary: Mapping[str, Any], limit: int = MATRIX_MAX) -> list[int]:
    """The dataset's classes when few enough, else the ``limit`` with the most confusions
    (missed plus wrongly predicted), in index order."""
    classes = summary["confusion"]["labels"]
    if len(classes) <= limit:
        return list(classes)
    errors = {row["index"]: (row["support"] - row["correct"]) + (row["predicted"] - row["correct"])
              for row in summary["classes"]}
    chosen = sorted(classes, key=lambda index: (-errors.get(index, 0), index))[:limit]
    return sorted(chosen)


def matrix_view(summary: Mapping[str, Any], class_names: Sequence[str],
                cell_link: Callable[[int, int | str], str],
                selected: tuple[int, int | str] | None = None) -> dict[str, Any]:
    """Rows and cells of the displayed matrix: counts, a colour level per cell (its share of the
    row: blue on the diagonal, red off it) and the link that opens its images."""
    confusion = summary["confusion"]
    labels = confusion["labels"]
    full = np.asarray(confusion["matrix"], dtype=np.int64).reshape(len(labels), -1)
    position = {index: number for number, index in enumerate(labels)}
    shown = shown_classes(summary)
    columns = [position[index] for index in shown]
    rows = []
    any_other = False
    for index in shown:
        counts = full[position[index]]
        total = int(counts.sum())
        other = total - int(counts[columns].sum())
        any_other = any_other or other > 0
        cells = [_cell(index, column_index, int(counts[position[column_index]]), total,
                       cell_link, selected) for column_index in shown]
        cells.append(_cell(index, OTHER, other, total, cell_link, selected))
        rows.append({"index": index, "label": class_names[index], "total": total,
                     "cells": cells})
    if not any_other:
        for row in rows:
            row["cells"].pop()
    return {"columns": [{"index": index, "label": class_names[index]} for index in shown],
            "other": any_other, "rows": rows, "shown": len(shown), "classes": len(labels)}


def _cell(row: int, column: int | str, count: int, total: int,
          cell_link: Callable[[int, int | str], str],
          selected: tuple[int, int | str] | None) -> dict[str, Any]:
    share = count / total if total else 0.0
    level = 0 if count == 0 else max(1, round(share * LEVELS))
    return {"row": row, "column": column, "count": count, "share": share,
            "level": level, "diagonal": column == row,
            "url": cell_link(row, column) if count else None,
            "selected": selected == (row, column)}


def cell_members(records: ImageRecords, summary: Mapping[str, Any],
                 cell: tuple[int, int | str]) -> np.ndarray:
    """Numbers of the images in one displayed cell, most confident first."""
    row, column = cell
    in_row = records.targets == row
    if column == OTHER:
        shown = np.asarray(shown_classes(summary), dtype=np.int64)
        chosen = in_row & ~np.isin(records.predicted, shown)
    else:
        chosen = in_row & (records.predicted == column)
    numbers = np.flatnonzero(chosen)
    return numbers[np.argsort(-records.probability[numbers], kind="stable")]


def sorted_classes(rows: Sequence[Mapping[str, Any]], key: str = "recall",
                   descending: bool = False) -> list[Mapping[str, Any]]:
    """The per-class table ordered by ``key`` (worst recall first by default); missing values
    (no support, nothing predicted) go last either way."""
    if key not in SORT_KEYS:
        key = "recall"
    present = [row for row in rows if row[key] is not None]
    missing = [row for row in rows if row[key] is None]
    present.sort(key=lambda row: (row[key], row["index"]), reverse=descending)
    return present + missing


def reliability_diagram(calibration: Mapping[str, Any], width: int = 320,
                        height: int = 240, margin: int = 36) -> dict[str, Any]:
    """Geometry of the reliability diagram (an inline SVG): one bar per bin at its accuracy,
    the gap to its mean confidence, and the diagonal of perfect calibration."""
    inner_w, inner_h = width - 2 * margin, height - 2 * margin
    bins = calibration["bins"]
    bar_w = inner_w / len(bins)
    bars = []
    for number, entry in enumerate(bins):
        x = margin + number * bar_w
        if not entry["count"]:
            continue
        accuracy_y = margin + inner_h * (1 - entry["accuracy"])
        confidence_y = margin + inner_h * (1 - entry["confidence"])
        bars.append({"x": round(x + 1, 2), "width": round(bar_w - 2, 2),
                     "y": round(accuracy_y, 2), "height": round(margin + inner_h - accuracy_y, 2),
                     "gap_y": round(min(accuracy_y, confidence_y), 2),
                     "gap_height": round(abs(accuracy_y - confidence_y), 2),
                     "title": f"{entry['lower']:.2f}–{entry['upper']:.2f}: {entry['count']} "
                              f"images, accuracy {entry['accuracy']:.2f}, "
                              f"confidence {entry['confidence']:.2f}"})
    ticks = [{"value": f"{value:.1f}", "x": round(margin + inner_w * value, 2),
              "y": round(margin + inner_h * (1 - value), 2)} for value in (0, 0.5, 1.0)]
    return {"width": width, "height": height, "left": margin, "top": margin,
            "right": margin + inner_w, "bottom": margin + inner_h, "bars": bars, "ticks": ticks,
            "ece": calibration["ece"]}
