"""Streaming: many tiny files evaluate with flat memory. The suite runs 6,000 files; set
``CONVSCOPE_DATASET_FILES=100000`` for the long run of the issue.

Each file is a small PNG on disk that decodes to a 64 x 64 picture (12 KB), so an engine that
kept its decoded pictures would grow by about 12 KB per image; the records it does keep are a
few dozen bytes per image. The control run keeps the pictures and shows the measurement sees
such growth (a leak of 12 KB per image would be 70 MB over the suite's 6,000 files)."""
from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest
from PIL import Image

import app.evaluation as engine
from app.datasets import match_labels, scan_dataset
from app.evaluation import Evaluation
from app.pipeline import ModelIdentity
from tests.datasets.models import CLASS_NAMES, COLOURS, ColourNet
from tests.visualizations.models import wrap

log = logging.getLogger(__name__)
FILES = int(os.environ.get("CONVSCOPE_DATASET_FILES", "6000"))
GROWTH_LIMIT_MB = 40.0
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE / 2**20


def write_tiny_files(root: Path, count: int) -> Path:
    """``count`` PNG files of 64 x 64 pixels (a few hundred bytes each), in four classes."""
    payloads = {}
    for label in CLASS_NAMES[:4]:
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), COLOURS[label]).save(buffer, format="PNG")
        payloads[label] = buffer.getvalue()
        (root / label).mkdir(parents=True, exist_ok=True)
    for number in range(count):
        label = CLASS_NAMES[number % 4]
        (root / label / f"{number:06d}.png").write_bytes(payloads[label])
    return root


def measure(root: Path, model, files: int) -> tuple[int, float]:
    """Evaluate ``root``; return (images evaluated, resident growth in MB from a quarter of the
    way to the largest reading after it)."""
    labelled = match_labels(scan_dataset(root, max_images=files), model.meta)
    evaluation = Evaluation(lambda: model, ModelIdentity("0" * 64, "f" * 16), labelled,
                            num_classes=len(CLASS_NAMES), batch_size=64)
    baseline = None
    largest = 0.0
    for _ in evaluation.steps():
        if baseline is None and evaluation.fraction >= 0.25:
            baseline = resident_mb()
        elif baseline is not None:
            largest = max(largest, resident_mb())
    assert evaluation.records is not None and baseline is not None
    return len(evaluation.records), largest - baseline


@pytest.fixture(scope="module")
def tiny_model():
    return wrap(ColourNet().eval(), side=16, class_names=CLASS_NAMES)


@pytest.mark.slow
def test_many_tiny_files_evaluate_with_flat_memory(tmp_path: Path, tiny_model) -> None:
    root = write_tiny_files(tmp_path / "many", FILES)
    evaluated, growth = measure(root, tiny_model, FILES)
    log.info("%d files: resident memory grew %.1f MB from 25%% to the end", FILES, growth)
    assert evaluated == FILES
    assert growth < GROWTH_LIMIT_MB, f"resident memory grew {growth:.0f} MB over the run"


@pytest.mark.slow
def test_the_measurement_sees_an_engine_that_keeps_its_pictures(tmp_path: Path, tiny_model,
                                                                monkeypatch) -> None:
    kept = []
    decode = engine.decode_view

    def hoarding_decode(model, root, file):
        view = decode(model, root, file)
        kept.append(Image.new("RGB", (128, 128)))       # what a leaky engine would keep
        return view

    monkeypatch.setattr(engine, "decode_view", hoarding_decode)
    files = 2000                                         # 2,000 x 48 KB = 94 MB kept
    root = write_tiny_files(tmp_path / "leaky", files)
    evaluated, growth = measure(root, tiny_model, files)
    assert evaluated == files and len(kept) == files
    assert growth > GROWTH_LIMIT_MB, f"only {growth:.0f} MB: the measurement is blind"
