"""Stored results carry each method's ``version``; this test makes sure the version moves when
the output does.

Every registered method runs at its defaults and a few parameter variants on a fixed tiny model
built here (seeded, float64, CPU), and its panels -- maps, titles, metrics, notes -- are compared
with golden copies in ``tests/data/golden_maps.{json,npz}``, recorded together with the method's
version. A method whose output changed while its version did not fails the test: bump the
method's ``version`` (results cached under the old one are then recomputed), then regenerate::

    CONVSCOPE_REGENERATE_GOLDEN=1 PYTHONPATH=. python -m pytest tests/visualizations/test_golden.py

Regenerating refuses to overwrite a changed output whose version was not bumped. Maps are
compared to 1e-4 of their largest value: float64 arithmetic keeps machine and thread-count noise
near 1e-15, far below that, while any change to a method's computation moves it far more.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from model_adapters.base import LoadedModel
from tests.visualizations.models import wrap
from visualizations import visualization_registry

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN_JSON = DATA / "golden_maps.json"
GOLDEN_ARRAYS = DATA / "golden_maps.npz"
REGENERATE = os.environ.get("CONVSCOPE_REGENERATE_GOLDEN") == "1"
HOW_TO = ("Bump the method's `version` class attribute, then regenerate the golden file: "
          "CONVSCOPE_REGENERATE_GOLDEN=1 PYTHONPATH=. python -m pytest "
          "tests/visualizations/test_golden.py")
RELATIVE_TOLERANCE = 1e-4
SIDE = 24

# (method, params): every method's defaults plus variants that reach its other code paths.
CASES: list[tuple[str, dict[str, Any]]] = [
    ("saliency", {}), ("saliency", {"smoothgrad_samples": 0}),
    ("saliency", {"smoothgrad_samples": 4, "smoothgrad_noise": 0.3}),
    ("integrated_gradients", {}), ("integrated_gradients", {"baseline": "black", "steps": 16}),
    ("integrated_gradients", {"baseline": "blurred", "steps": 8}),
    ("integrated_gradients", {"baseline": "noise", "steps": 8}),
    ("occlusion", {}), ("occlusion", {"window": 6, "stride": 3, "fill": "blur"}),
    ("partial_occlusion", {}),
    ("partial_occlusion", {"positions": 4, "window_fraction": 0.3, "fill": "black", "top_k": 2}),
    ("cam", {}),
    ("grad_cam", {}), ("grad_cam", {"relu": False}), ("grad_cam", {"layer": "features.0"}),
    ("guided_grad_cam", {}), ("guided_grad_cam", {"layer": "features.3"}),
    ("adversarial", {}), ("adversarial", {"max_epsilon": 2.0, "steps": 4, "rounds": 1}),
]
TARGETS = [1, 3]


class GoldenNet(nn.Module):
    """Small but not trivial: batch norm, a non-monotone activation (SiLU) and ReLU6, max
    pooling, and a global-average-pool + linear head (so every method runs)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.SiLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def golden_model() -> tuple[LoadedModel, torch.Tensor]:
    torch.manual_seed(1234)
    module = GoldenNet()
    with torch.no_grad():
        batch_norm = module.features[1]
        batch_norm.running_mean.uniform_(-0.3, 0.3)
        batch_norm.running_var.uniform_(0.5, 2.0)
        module.fc.weight.mul_(3.0)
    image = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(5)) * 2 - 1
    model = wrap(module.double(), side=SIDE, class_names=("a", "b", "c", "d"))
    return model, image.double()


def case_id(method: str, params: dict[str, Any]) -> str:
    return method + "".join(f"|{key}={params[key]}" for key in sorted(params))


@dataclass
class Outcome:
    """One case's panels as plain data: ``panels`` (JSON-able) and ``arrays`` by key."""

    version: int
    panels: list[dict[str, Any]]
    arrays: dict[str, np.ndarray]


def compute(model: LoadedModel, image: torch.Tensor) -> dict[str, Outcome]:
    outcomes = {}
    for method, params in CASES:
        visualization = visualization_registry.get(method)
        result = visualization.run(model, image, TARGETS, params)
        key = case_id(method, params)
        panels, arrays = [], {}
        for number, panel in enumerate(result.panels):
            array_key = f"{key}#{number}"
            arrays[array_key] = np.asarray(panel.values)
            panels.append({
                "title": panel.title, "kind": panel.kind, "signed": panel.signed,
                "target": panel.target.index if panel.target else None,
                "metrics": {name: float(value) for name, value in sorted(panel.metrics.items())},
                "notes": list(panel.notes), "array": array_key})
        outcomes[key] = Outcome(type(visualization).version, panels, arrays)
    return outcomes


def load_golden() -> dict[str, Outcome]:
    if not GOLDEN_JSON.exists():
        return {}
    records = json.loads(GOLDEN_JSON.read_text())
    with np.load(GOLDEN_ARRAYS) as stored:
        arrays = {key: stored[key] for key in stored.files}
    return {key: Outcome(record["version"], record["panels"],
                         {panel["array"]: arrays[panel["array"]] for panel in record["panels"]})
            for key, record in records["cases"].items()}


def save_golden(outcomes: dict[str, Outcome]) -> None:
    records = {"about": "Golden outputs of every method on tests/visualizations/test_golden.py's "
                        "GoldenNet; regenerate with CONVSCOPE_REGENERATE_GOLDEN=1 (see there).",
               "cases": {key: {"version": outcome.version, "panels": outcome.panels}
                         for key, outcome in sorted(outcomes.items())}}
    GOLDEN_JSON.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    arrays = {key: array for outcome in outcomes.values() for key, array in outcome.arrays.items()}
    np.savez_compressed(GOLDEN_ARRAYS, **arrays)


def differences(golden: Outcome, current: Outcome) -> list[str]:
    """How ``current`` differs from ``golden`` beyond float noise (empty: the same output)."""
    found = []
    if len(golden.panels) != len(current.panels):
        return [f"{len(current.panels)} panels instead of {len(golden.panels)}"]
    for number, (old, new) in enumerate(zip(golden.panels, current.panels)):
        for field in ("title", "kind", "signed", "target", "notes"):
            if old[field] != new[field]:
                found.append(f"panel {number} {field}: {old[field]!r} -> {new[field]!r}")
        if sorted(old["metrics"]) != sorted(new["metrics"]):
            found.append(f"panel {number} metrics: {sorted(old['metrics'])} -> "
                         f"{sorted(new['metrics'])}")
        else:
            for name, value in old["metrics"].items():
                if not np.isclose(new["metrics"][name], value, rtol=RELATIVE_TOLERANCE,
                                  atol=1e-9):
                    found.append(f"panel {number} metric {name}: {value} -> "
                                 f"{new['metrics'][name]}")
        before, after = golden.arrays[old["array"]], current.arrays[new["array"]]
        if before.shape != after.shape:
            found.append(f"panel {number} shape {before.shape} -> {after.shape}")
            continue
        scale = float(np.abs(before.astype(np.float64)).max())
        change = float(np.abs(after.astype(np.float64) - before.astype(np.float64)).max())
        if change > RELATIVE_TOLERANCE * scale + 1e-9:
            found.append(f"panel {number} values changed by {change:.3g} "
                         f"(largest value {scale:.3g})")
    return found


def problems(golden: dict[str, Outcome], current: dict[str, Outcome]) -> tuple[list[str], bool]:
    """(messages, whether any output changed without a version bump)."""
    messages, unbumped = [], False
    for key, outcome in current.items():
        if key not in golden:
            messages.append(f"{key}: no golden output yet (regenerate)")
            continue
        changed = differences(golden[key], outcome)
        if golden[key].version == outcome.version and changed:
            unbumped = True
            messages.append(f"{key}: output changed but version is still {outcome.version} -- "
                            + "; ".join(changed[:4]))
        elif golden[key].version != outcome.version:
            messages.append(f"{key}: version {golden[key].version} -> {outcome.version}, golden "
                            "output is stale (regenerate)")
    for key in sorted(set(golden) - set(current)):
        messages.append(f"{key}: golden output for a case that no longer exists (regenerate)")
    return messages, unbumped


def test_every_method_declares_its_own_version() -> None:
    for name in visualization_registry.names():
        method_class = type(visualization_registry.get(name))
        assert "version" in vars(method_class), f"{name} must set `version` explicitly"
        assert isinstance(method_class.version, int) and method_class.version >= 1


def test_every_registered_method_has_golden_cases() -> None:
    covered = {method for method, _ in CASES}
    assert covered == set(visualization_registry.names()), \
        "add the new method's defaults (and variants) to CASES, then regenerate"


def test_method_outputs_match_their_golden_copies_for_their_version() -> None:
    model, image = golden_model()
    current = compute(model, image)
    messages, unbumped = problems(load_golden(), current)
    if REGENERATE and messages:
        assert not unbumped, ("Refusing to regenerate: " + "\n".join(messages)
                              + "\nBump those methods' versions first.")
        save_golden(current)
        return
    assert not messages, "\n".join(messages) + "\n" + HOW_TO


def test_the_check_catches_a_change_without_a_version_bump() -> None:
    """The comparison itself: a change above the tolerance with the same version is reported as
    unbumped; float noise is not; a bumped version asks for regeneration instead."""
    golden = load_golden()
    key = case_id("grad_cam", {})
    assert key in golden, "golden file missing: regenerate"
    original = golden[key]

    def variant(scale: float, version: int) -> dict[str, Outcome]:
        arrays = {name: (array * scale).astype(array.dtype)
                  for name, array in original.arrays.items()}
        return {key: Outcome(version, original.panels, arrays)}

    messages, unbumped = problems({key: original}, variant(1.001, original.version))
    assert unbumped and "output changed but version is still" in messages[0]
    assert problems({key: original}, variant(1 + 1e-7, original.version)) == ([], False)
    messages, unbumped = problems({key: original}, variant(1.001, original.version + 1))
    assert not unbumped and "stale" in messages[0]


@pytest.mark.parametrize("threads", [1])
def test_the_golden_outputs_do_not_depend_on_the_thread_count(threads: int) -> None:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model, image = golden_model()
        current = compute(model, image)
    finally:
        torch.set_num_threads(previous)
    golden = load_golden()
    assert all(not differences(golden[key], outcome) for key, outcome in current.items()
               if key in golden and golden[key].version == outcome.version)
