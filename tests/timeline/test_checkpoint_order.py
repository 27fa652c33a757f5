"""Checkpoints come out in training order -- by the epoch/step stored in their wrappers, else
their names, else their mtimes -- whatever their shapes and modification times; a broken file
keeps its place with its error; reading the counters never runs code."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from app.catalog import ModelCatalog
from app.checkpoint_order import (counters_of, every_kth, in_training_order, progress_from_name,
                                  read_counters, read_progress, training_progress)
from tests.adapters.conftest import write_canary_pickle, write_canary_zip

CPU = torch.device("cpu")


def _catalog(directory: Path) -> ModelCatalog:
    return ModelCatalog(directory, CPU, settle_seconds=0, rescan_seconds=float("inf"))


@pytest.mark.parametrize("name, expected", [
    ("epoch_07.pt", (7, None, 7)),
    ("model-step=12000.ckpt", (None, 12000, 12000)),
    ("epoch=3-step=1200.ckpt", (3, 1200, 1200)),
    ("iter_500.pth", (None, 500, 500)),
    ("ckpt-0012.pt", (None, None, 12)),
    ("resnet50_ep4.pt", (4, None, 4)),       # the "50" of resnet50 is not the epoch ...
    ("resnet50.pt", (None, None, 50)),       # ... but it is the name's last integer
    ("final.pt", (None, None, None)),
    ("steps-2.safetensors", (None, 2, 2)),
])
def test_progress_from_file_names(name: str, expected: tuple) -> None:
    assert progress_from_name(name) == expected


def test_counters_from_wrapper_shapes() -> None:
    assert counters_of({"epoch": 3, "global_step": 300, "state_dict": {}}) == (3, 300)
    assert counters_of({"epoch": torch.tensor(2), "step": np.int64(40)}) == (2, 40)
    assert counters_of({"iteration": 7.0}) == (None, 7)
    assert counters_of({"meta": {"epoch": 5, "iter": 50}}) == (5, 50)
    assert counters_of({"epoch": "4", "global_step": "40"}) == (4, 40)       # safetensors metadata
    # Things that are not counters are ignored, not guessed.
    assert counters_of({"epoch": True, "step": [1, 2], "iteration": float("nan")}) == (None, None)
    assert counters_of({"epoch": -1, "step": torch.ones(3)}) == (None, None)
    assert counters_of([1, 2]) == (None, None)


def test_the_mixed_run_comes_out_in_training_order(run_dir: Path, saved: list) -> None:
    # The files' mtimes say the reverse of training; their names sort another way again.
    by_mtime = sorted(os.listdir(run_dir), key=lambda name: os.stat(run_dir / name).st_mtime)
    checkpoints = [name for name in by_mtime if name.endswith((".pt", ".pth", ".ckpt",
                                                               ".safetensors"))]
    assert checkpoints[0] != saved[0].file and sorted(checkpoints)[0] != saved[0].file

    ordered = _catalog(run_dir).in_training_order()

    files = [entry.file for entry in ordered]
    expected = [c.file for c in saved[:3]] + ["epoch=2-step=20.pt"] + [c.file for c in saved[3:]]
    assert files == expected
    by_file = {entry.file: entry for entry in ordered}
    for checkpoint in saved:
        progress = by_file[checkpoint.file].progress
        assert (progress.epoch, progress.step) == (checkpoint.epoch, checkpoint.step)
        assert by_file[checkpoint.file].ok
    assert by_file["lightning-last.ckpt"].progress.order_by == "epoch"
    assert by_file["epoch=3-step=24.pt"].progress.order_by == "name"
    assert by_file["aaa-final.safetensors"].progress.order_by == "epoch"
    broken = by_file["epoch=2-step=20.pt"]
    assert not broken.ok and broken.error.code == "E_CHECKPOINT_UNREADABLE"
    assert broken.progress.order_by == "name"


def test_names_order_bare_state_dicts_and_mtime_the_rest(tmp_path: Path) -> None:
    now = time.time()
    for number, (name, age) in enumerate([("run-10.pt", 500), ("run-2.pt", 100),
                                          ("run-33.pt", 900), ("last.pt", 2000),
                                          ("best.pt", 1000)]):
        torch.save({"w": torch.zeros(1)}, tmp_path / name)
        os.utime(tmp_path / name, (now - age, now - age))
    progress = {name: read_progress(tmp_path / name) for name in os.listdir(tmp_path)}
    ordered = in_training_order(list(progress), progress.__getitem__, str)
    # Numbers order the numbered files (2 < 10 < 33, not "10" < "2"); the unnumbered ones by
    # mtime among themselves and against the numbered ones.
    assert ordered == ["last.pt", "best.pt", "run-2.pt", "run-10.pt", "run-33.pt"]
    assert progress["best.pt"].order_by == "mtime" and progress["run-2.pt"].order_by == "name"


def test_stored_counters_beat_the_name_and_the_mtime(tmp_path: Path) -> None:
    now = time.time()
    torch.save({"epoch": 9, "state_dict": {"w": torch.zeros(1)}}, tmp_path / "epoch_1.pt")
    torch.save({"epoch": 2, "state_dict": {"w": torch.zeros(1)}}, tmp_path / "epoch_8.pt")
    os.utime(tmp_path / "epoch_1.pt", (now - 500, now - 500))
    progress = {name: read_progress(tmp_path / name) for name in os.listdir(tmp_path)}
    assert in_training_order(list(progress), progress.__getitem__, str) == ["epoch_8.pt",
                                                                          "epoch_1.pt"]
    assert progress["epoch_1.pt"].epoch == 9 and progress["epoch_1.pt"].order_by == "epoch"


def test_reading_counters_never_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    write_canary_zip(tmp_path / "epoch_4.pt", marker)
    write_canary_pickle(tmp_path / "epoch_5.pt", marker)
    assert read_counters(tmp_path / "epoch_4.pt") == (None, None)
    assert read_counters(tmp_path / "epoch_5.pt") == (None, None)
    assert not marker.exists()
    # ... and such files still get a place, by their names.
    assert read_progress(tmp_path / "epoch_4.pt").order_by == "name"
    assert read_progress(tmp_path / "epoch_4.pt").epoch == 4


def test_reading_counters_leaves_the_tensors_on_disk(tmp_path: Path) -> None:
    """mmap: the counters of a 256 MB checkpoint are read without reading its weights."""
    import psutil

    path = tmp_path / "big.pt"
    torch.save({"epoch": 3, "global_step": 99, "state_dict": {"w": torch.ones(64, 1024, 1024)}},
               path)
    process = psutil.Process()
    with open(path, "rb") as handle:    # drop nothing from the page cache; only our RSS counts
        handle.read(16)
    before = process.memory_info().rss
    assert read_counters(path) == (3, 99)
    grown = process.memory_info().rss - before
    assert grown < 64 * 2 ** 20, f"reading the counters grew RSS by {grown / 2**20:.0f} MB"


def test_unreadable_and_odd_files_get_name_or_mtime(tmp_path: Path) -> None:
    (tmp_path / "epoch_3.pt").write_bytes(b"")
    (tmp_path / "x.pt").write_bytes(b"garbage")
    assert read_progress(tmp_path / "epoch_3.pt").epoch == 3
    assert read_progress(tmp_path / "x.pt").order_by == "mtime"
    assert training_progress("a.pt", 5.0).to_dict() == {"epoch": None, "step": None,
                                                         "order_by": "mtime"}


@pytest.mark.parametrize("count, k, expected", [
    (10, 3, [0, 3, 6, 9]), (10, 4, [0, 4, 8, 9]), (5, 1, [0, 1, 2, 3, 4]),
    (5, 10, [0, 4]), (1, 3, [0]), (2, 5, [0, 1]), (0, 2, []),
])
def test_every_kth_keeps_the_first_and_the_last(count: int, k: int, expected: list) -> None:
    assert every_kth(list(range(count)), k) == expected
