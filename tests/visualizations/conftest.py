"""Fixtures for the visualization tests: tiny models, the trained shape model, and a place to
record measured numbers (hit rates, rank correlations) that are printed after the run."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from model_adapters.base import LoadedModel
from tests.visualizations.models import TinyCnn, train_shape_model, wrap

# Filled by tests, printed in the terminal summary (the hit rates belong in the report).
MEASUREMENTS: dict[str, str] = {}


def record(name: str, value: str) -> None:
    MEASUREMENTS[name] = value


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if MEASUREMENTS:
        terminalreporter.section("visualization measurements")
        for name, value in MEASUREMENTS.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def shape_model() -> LoadedModel:
    """TinyCnn trained on the coloured-square task (about 5-10 s on one CPU thread)."""
    model, accuracy = train_shape_model()
    record("shape model held-out accuracy", f"{accuracy:.3f}")
    assert accuracy > 0.95, "the synthetic task should be learned almost perfectly"
    return model


@pytest.fixture
def tiny_model() -> LoadedModel:
    """An untrained GAP+linear CNN on 32x32 inputs (every method supports it)."""
    torch.manual_seed(0)
    return wrap(TinyCnn(classes=3), class_names=("red", "green", "blue"))


@pytest.fixture
def tiny_image() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
