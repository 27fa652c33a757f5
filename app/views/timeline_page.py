"""What the page of one finished timeline draws (``templates/pages/timeline.html``): per image
its filmstrips (frame URLs on the strip's shared scale, the prediction under each frame) and the
top classes' probability chart, the checkpoints' accuracy and per-class recall charts, and the
Compare-two-checkpoints view (two chosen steps side by side with their difference map)."""
from __future__ import annotations

from typing import Any, Mapping

from flask import url_for
from markupsafe import Markup

from app.timeline import chart_classes, line_chart_svg, strip_range


def _chart(*args: Any, **kwargs: Any) -> Markup:
    """A chart the page inserts as it is: ``line_chart_svg`` escapes every label it writes, so
    the templates never switch autoescaping off."""
    return Markup(line_chart_svg(*args, **kwargs))


def _label(file: str) -> str:
    return file.rsplit(".", 1)[0][:18]


def _pick(args: Mapping[str, str], name: str, default: int, count: int) -> int:
    raw = args.get(name, "")
    return int(raw) if raw.isdigit() and int(raw) < count else default


def _class_names(document: Mapping[str, Any]) -> list[str]:
    """Class names by index, from the stored top-k lists (all a page needs to label a chart)."""
    names: dict[int, str] = {}
    for image in document["images"]:
        for step in image["steps"]:
            names.update({entry["index"]: entry["label"] for entry in step["predictions"]})
    return [names.get(index, str(index)) for index in range(max(names, default=-1) + 1)]


def page_sections(view: Mapping[str, Any], svc: Any, args: Mapping[str, str], *,
                  flips: Mapping[str, Any] | None) -> dict[str, Any]:
    document = view["timeline"]
    job_id = view["id"]
    class_names = _class_names(document)
    checkpoints = document["checkpoints"]
    images = []
    for image_number, image in enumerate(document["images"]):
        steps = image["steps"]
        labels = [_label(step["checkpoint"]) for step in steps]
        by_file = {c["file"]: c for c in checkpoints}
        strips = []
        for method_number, method in enumerate(document["methods"]):
            positions = max((len(step["visualizations"][method_number]["panels"])
                             for step in steps), default=0)
            for panel_number in range(positions):
                panels = [step["visualizations"][method_number]["panels"][panel_number]
                          if panel_number < len(step["visualizations"][method_number]["panels"])
                          else None for step in steps]
                frames = []
                previous = None
                for step_number, (step, panel) in enumerate(zip(steps, panels)):
                    top = step["predictions"][0]
                    checkpoint = by_file.get(step["checkpoint"], {})
                    frames.append({
                        "checkpoint": step["checkpoint"], "epoch": checkpoint.get("epoch"),
                        "step": checkpoint.get("step"), "error": None, "prediction": top,
                        "changed": previous is not None and previous != top["index"],
                        "picture": (url_for("timelines_api.frame", job_id=job_id,
                                            image=image_number, method=method_number,
                                            panel=panel_number, step=step_number)
                                    if panel is not None else None)})
                    previous = top["index"]
                title = next((p["title"] for p in panels if p), method)
                strips.append({"title": title, "range": strip_range(panels), "frames": frames,
                               "method": method_number, "panel": panel_number})
        series = _probability_series(svc, steps, class_names)
        images.append({"file": image["file"], "strips": strips, "steps": len(steps),
                       "labels": labels,
                       "chart": _chart(labels, series, title="Top classes' "
                                               "probability over training")})
    count = max((image["steps"] for image in images), default=0)
    compare = {"a": _pick(args, "a", max(0, count - 2), max(count, 1)),
               "b": _pick(args, "b", max(0, count - 1), max(count, 1)),
               "choices": [{"number": n, "file": step["checkpoint"]} for n, step in
                           enumerate(document["images"][0]["steps"])] if images else []}
    charts = None
    if document.get("dataset"):
        labels = [_label(c["file"]) for c in checkpoints]
        classes = sorted({name for c in checkpoints for name in (c.get("recall") or {})})
        charts = {"accuracy": _chart(labels, [("accuracy", [c["accuracy"] for c in
                                                                   checkpoints])],
                                             title="Dataset accuracy over training",
                                             y_label="accuracy"),
                  "recall": _chart(labels, [(name, [(c.get("recall") or {}).get(name)
                                                            for c in checkpoints])
                                                    for name in classes],
                                           title="Per-class recall over training",
                                           y_label="recall")}
    return {"images": images, "compare": compare, "charts": charts, "flips": flips}


def _probability_series(svc: Any, steps: list[Mapping[str, Any]], class_names: list[str]
                        ) -> list[tuple[str, list[float | None]]]:
    """The chart's classes and their probability at every step, from each stored prediction's
    full probability vector (a step whose prediction was evicted is a gap)."""
    import numpy as np

    from app.errors import ConvscopeError

    rows: list[np.ndarray | None] = []
    for step in steps:
        try:
            path, _ = svc.results.file(step["prediction_key"], "probabilities.npy")
            rows.append(np.load(path, allow_pickle=False))
        except (ConvscopeError, OSError, ValueError):
            rows.append(None)
    return [(class_names[index] if index < len(class_names) else str(index),
             [float(row[index]) if row is not None else None for row in rows])
            for index in chart_classes(rows)]
