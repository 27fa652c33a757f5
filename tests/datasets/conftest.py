"""Fixtures for dataset mode: a colour classifier trained once per test session, its checkpoint
directory, and a generated labelled dataset with known mistakes."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.datasets.models import train_colour_net, write_checkpoint_dir, write_dataset_with_mistakes


@pytest.fixture(scope="session")
def trained_net():
    return train_colour_net()


@pytest.fixture(scope="session")
def _session_files(tmp_path_factory, trained_net) -> Path:
    root = tmp_path_factory.mktemp("dataset-mode")
    write_checkpoint_dir(root / "checkpoints", trained_net)
    write_dataset_with_mistakes(root / "datasets" / "colours")
    return root


@pytest.fixture
def checkpoint_dir(_session_files: Path, tmp_path: Path) -> Path:
    return shutil.copytree(_session_files / "checkpoints", tmp_path / "checkpoints")


@pytest.fixture
def dataset_root(_session_files: Path, tmp_path: Path) -> Path:
    """A folder of datasets (this test's own copy): ``colours`` inside."""
    return shutil.copytree(_session_files / "datasets", tmp_path / "datasets")


@pytest.fixture
def colours(dataset_root: Path) -> Path:
    return dataset_root / "colours"
