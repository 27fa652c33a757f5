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


@pytest.fixture
def make_app(tmp_path: Path, checkpoint_dir: Path, dataset_root: Path):
    """Build an app on the colour checkpoint and the dataset folder: ``make_app(**settings)``
    (waits until ready); every app built is shut down afterwards."""
    import torch

    from app import create_app
    from app.catalog import ModelCatalog
    from tests.web.conftest import wait_ready

    built = []

    def build(**settings):
        directory = settings.pop("checkpoint_dir", checkpoint_dir)
        config = {"data_dir": tmp_path / "data", "checkpoint_dir": directory,
                  "dataset_dir": dataset_root, "device": "cpu", "testing": True, **settings}
        config["catalog"] = ModelCatalog(directory, torch.device("cpu"), settle_seconds=0,
                                         rescan_seconds=float("inf"))
        app = create_app(config)
        built.append(app)
        wait_ready(app.test_client())
        return app

    yield build
    for app in built:
        app.extensions["convscope"].shutdown(timeout=10)


@pytest.fixture
def client(make_app):
    return make_app().test_client()
