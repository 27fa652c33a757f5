"""Fixtures for timelines: a colour classifier trained for a few epochs (once per session), its
checkpoint run in mixed shapes, and a labelled dataset."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.datasets.models import write_dataset_with_mistakes
from tests.timeline.training import train_epochs, write_run


@pytest.fixture(scope="session")
def epoch_states():
    return train_epochs()


@pytest.fixture(scope="session")
def _session_run(tmp_path_factory, epoch_states) -> tuple[Path, list]:
    root = tmp_path_factory.mktemp("timeline")
    saved = write_run(root / "run", epoch_states)
    write_dataset_with_mistakes(root / "datasets" / "colours", per_class=4)
    return root, saved


@pytest.fixture
def run_dir(_session_run, tmp_path: Path) -> Path:
    """This test's own copy of the checkpoint run (mtimes kept)."""
    return shutil.copytree(_session_run[0] / "run", tmp_path / "run")


@pytest.fixture
def saved(_session_run) -> list:
    return _session_run[1]


@pytest.fixture
def dataset_root(_session_run, tmp_path: Path) -> Path:
    return shutil.copytree(_session_run[0] / "datasets", tmp_path / "datasets")
