"""The catalog notices new, changed and deleted files, waits for half-written ones, ignores
symlinks leading out of the directory, and is safe to use from many threads."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from unittest import mock

import pytest
import torch

from app.catalog import ModelCatalog, demo_directory
from app.errors import UnknownModel
from tests.adapters.conftest import (CPU, logits, probe_batch, set_mtime, small_torchvision_model,
                                     tiny_net)

TINY_CONFIG = ('[model]\nfactory = "tests.adapters.conftest:TinyNet"\n'
               "[preprocess]\ninput_size = [16, 16]\n")


def _tiny_dir(tmp_path: Path) -> Path:
    (tmp_path / "convscope.toml").write_text(TINY_CONFIG)
    return tmp_path


def _save(path: Path, seed: int, seconds_ago: float = 60) -> None:
    torch.save(tiny_net(seed=seed).state_dict(), path)
    set_mtime(path, seconds_ago)


def _files(catalog: ModelCatalog) -> list[str]:
    return [entry.file for entry in catalog.entries()]


def test_lists_newest_first_and_marks_latest(tmp_path: Path) -> None:
    _tiny_dir(tmp_path)
    _save(tmp_path / "epoch_1.pt", 1, seconds_ago=300)
    _save(tmp_path / "epoch_2.pt", 2, seconds_ago=200)
    (tmp_path / "epoch_3.pt").write_text("corrupt")
    set_mtime(tmp_path / "epoch_3.pt", 100)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "labels.csv").write_text("x")

    entries = ModelCatalog(tmp_path, CPU, rescan_seconds=0).entries()

    assert [entry.file for entry in entries] == ["epoch_3.pt", "epoch_2.pt", "epoch_1.pt"]
    assert [entry.latest for entry in entries] == [False, True, False]  # newest *loadable*
    record = entries[1].to_dict()
    assert set(record) == {"id", "file", "latest", "ok", "architecture", "num_classes",
                           "input_size", "modified", "error"}
    assert record["input_size"] == [3, 16, 16] and record["num_classes"] == 3
    assert record["error"] is None and record["architecture"] == "TinyNet"
    assert str(tmp_path) not in str([entry.to_dict() for entry in entries])


def test_ids_are_opaque_and_stable_for_the_same_content(tmp_path: Path) -> None:
    _tiny_dir(tmp_path)
    _save(tmp_path / "a.pt", 1)
    first = ModelCatalog(tmp_path, CPU).entries()[0]
    second = ModelCatalog(tmp_path, CPU).entries()[0]
    assert first.id == second.id and len(first.id) == 12
    assert "a.pt" not in first.id and "/" not in first.id
    assert ModelCatalog(tmp_path, CPU).get(first.id).file == "a.pt"


def test_notices_new_changed_and_deleted_files(tmp_path: Path) -> None:
    _tiny_dir(tmp_path)
    _save(tmp_path / "epoch_1.pt", 1, seconds_ago=100)
    catalog = ModelCatalog(tmp_path, CPU, rescan_seconds=0, settle_seconds=0)
    assert _files(catalog) == ["epoch_1.pt"]
    old_id = catalog.get("latest").id

    _save(tmp_path / "epoch_2.pt", 2, seconds_ago=50)  # a training run writes a new epoch
    assert _files(catalog) == ["epoch_2.pt", "epoch_1.pt"]
    assert catalog.get("latest").file == "epoch_2.pt"

    _save(tmp_path / "epoch_1.pt", 7, seconds_ago=10)  # rewritten in place: new content
    assert catalog.get("latest").file == "epoch_1.pt"
    changed = catalog.get("latest")
    assert changed.id != old_id
    torch.testing.assert_close(logits(catalog.load(changed.id).module, probe_batch(16)),
                               logits(tiny_net(seed=7), probe_batch(16)))
    with pytest.raises(UnknownModel):
        catalog.get(old_id)

    (tmp_path / "epoch_1.pt").unlink()
    assert _files(catalog) == ["epoch_2.pt"]
    assert catalog.get("latest").file == "epoch_2.pt"


def test_half_written_file_waits_to_settle_and_loads_once(tmp_path: Path) -> None:
    _tiny_dir(tmp_path)
    _save(tmp_path / "epoch_1.pt", 1, seconds_ago=100)
    catalog = ModelCatalog(tmp_path, CPU, rescan_seconds=0, settle_seconds=0.4)
    assert _files(catalog) == ["epoch_1.pt"]

    torch.save(tiny_net(seed=2).state_dict(), tmp_path / "full.tmp")
    data = (tmp_path / "full.tmp").read_bytes()
    partial = tmp_path / "epoch_2.pt"
    partial.write_bytes(data[: len(data) // 3])  # the writer is still busy

    from model_adapters import load_checkpoint as real_load

    loads: list[str] = []

    def counting_load(path: Path, *args: object, **kwargs: object) -> object:
        loads.append(path.name)
        return real_load(path, *args, **kwargs)  # type: ignore[arg-type]

    with mock.patch("app.catalog.load_checkpoint", counting_load):
        assert _files(catalog) == ["epoch_1.pt"]  # fresh and not yet settled: not listed
        partial.write_bytes(data[: 2 * len(data) // 3])
        assert _files(catalog) == ["epoch_1.pt"]
        partial.write_bytes(data)                  # finished
        assert _files(catalog) == ["epoch_1.pt"]
        time.sleep(0.5)
        assert _files(catalog) == ["epoch_2.pt", "epoch_1.pt"]
        assert catalog.get("latest").file == "epoch_2.pt"
        for _ in range(3):
            catalog.entries()
    assert loads == ["epoch_2.pt"], "each settled version is loaded exactly once"


def test_a_broken_version_is_not_retried_until_it_changes(tmp_path: Path) -> None:
    _tiny_dir(tmp_path)
    torch.save(tiny_net(seed=2).state_dict(), tmp_path / "full.tmp")
    data = (tmp_path / "full.tmp").read_bytes()
    (tmp_path / "run.pt").write_bytes(data[:100])
    set_mtime(tmp_path / "run.pt", 60)  # the writer stalled: it looks settled
    catalog = ModelCatalog(tmp_path, CPU, rescan_seconds=0, settle_seconds=0)
    with mock.patch("app.catalog.load_checkpoint", wraps=__import__(
            "model_adapters").load_checkpoint) as spy:
        assert catalog.entries()[0].error.code == "E_CHECKPOINT_UNREADABLE"
        catalog.entries()
        assert spy.call_count == 1
        (tmp_path / "run.pt").write_bytes(data)
        set_mtime(tmp_path / "run.pt", 30)
        assert catalog.entries()[0].ok
        assert spy.call_count == 2


def test_symlinks_out_of_the_directory_are_ignored(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (tmp_path / "runs").mkdir()
    inside = _tiny_dir(tmp_path / "runs")
    outside.mkdir()
    _save(outside / "secret.pt", 1)
    _save(inside / "real.pt", 2)
    os.symlink(outside / "secret.pt", inside / "escape.pt")
    os.symlink(inside / "real.pt", inside / "alias.pt")
    os.symlink("/etc/passwd", inside / "passwd.pt")

    files = _files(ModelCatalog(inside, CPU))

    assert sorted(files) == ["alias.pt", "real.pt"]


def test_get_and_load_unknown_ids(tmp_path: Path) -> None:
    _tiny_dir(tmp_path)
    catalog = ModelCatalog(tmp_path, CPU)
    assert catalog.entries() == []
    with pytest.raises(UnknownModel):
        catalog.get("latest")
    _save(tmp_path / "a.pt", 1)
    catalog.refresh()
    with pytest.raises(UnknownModel):
        catalog.load("../../etc/passwd")
    assert catalog.load("latest").meta.checkpoint_file == "a.pt"


def test_loaded_models_are_cached_in_a_small_lru(tmp_path: Path) -> None:
    _tiny_dir(tmp_path)
    for seed in range(4):
        _save(tmp_path / f"m{seed}.pt", seed, seconds_ago=100 - seed)
    catalog = ModelCatalog(tmp_path, CPU, max_loaded=2)
    entries = catalog.entries()
    assert len(entries) == 4 and all(entry.meta is not None for entry in entries)
    first = catalog.load(entries[0].id)
    assert catalog.load(entries[0].id) is first       # cached
    for entry in entries[1:]:
        catalog.load(entry.id)
    again = catalog.load(entries[0].id)               # evicted, reloaded from disk
    assert again is not first
    assert again.meta == first.meta
    assert again.meta.sha256 == entries[0].sha256 and len(entries[0].sha256) == 64
    torch.testing.assert_close(logits(again.module, probe_batch(16)),
                               logits(first.module, probe_batch(16)))


def test_config_errors_are_reported_for_every_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "convscope.toml").write_text("[model]\nnum_clases = 3\n")
    _save(tmp_path / "a.pt", 1)
    catalog = ModelCatalog(tmp_path, CPU, rescan_seconds=0)
    entry = catalog.entries()[0]
    assert entry.error is not None and entry.error.code == "E_CONFIG_INVALID"
    assert "model.num_clases" in entry.error.message
    (tmp_path / "convscope.toml").write_text(TINY_CONFIG)  # fixed while running
    assert catalog.entries()[0].ok


def test_config_error_without_checkpoints_is_still_listed(tmp_path: Path) -> None:
    (tmp_path / "convscope.toml").write_text("model = 3\n")
    entries = ModelCatalog(tmp_path, CPU).entries()
    assert [(entry.file, entry.error.code) for entry in entries] == [
        ("convscope.toml", "E_CONFIG_INVALID")]


def test_labels_mismatch_is_reported(tmp_path: Path) -> None:
    _tiny_dir(tmp_path)
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    _save(tmp_path / "a.pt", 1)
    entry = ModelCatalog(tmp_path, CPU).entries()[0]
    assert entry.error is not None and entry.error.code == "E_LABELS_MISMATCH"
    assert "labels.txt" in entry.error.message


def test_many_threads_share_one_catalog(tmp_path: Path) -> None:
    _tiny_dir(tmp_path)
    for seed in range(3):
        _save(tmp_path / f"m{seed}.pt", seed, seconds_ago=100 - seed)
    catalog = ModelCatalog(tmp_path, CPU, rescan_seconds=0, max_loaded=1)
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for round_ in range(5):
                entries = catalog.entries()
                assert len(entries) == 3
                model = catalog.load(entries[(index + round_) % 3].id)
                assert model.meta.num_classes == 3
        except BaseException as error:  # noqa: BLE001 -- reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors


def test_demo_directory_lists_the_packaged_model_only() -> None:
    directory = demo_directory()
    assert (directory / "convscope.toml").is_file() and (directory / "images").is_dir()
    entries = ModelCatalog(directory, CPU).entries()
    assert [entry.file for entry in entries] == ["efficientnet-lite0-57934424.pth"]
    assert entries[0].ok and entries[0].latest
    assert entries[0].meta is not None and entries[0].meta.architecture == "efficientnet-lite0"


def test_small_torchvision_model_directory(tmp_path: Path) -> None:
    torch.save(small_torchvision_model().state_dict(), tmp_path / "sq.pt")
    set_mtime(tmp_path / "sq.pt", 10)
    entry = ModelCatalog(tmp_path, CPU).entries()[0]
    assert entry.ok and entry.meta is not None and entry.meta.default_cam_layer == "classifier.2"


def test_device_oom_while_loading_is_retried_not_listed_as_broken_for_good(
        tmp_path: Path) -> None:
    from app.errors import DeviceOOM
    from model_adapters import load_checkpoint as real_load

    _tiny_dir(tmp_path)
    _save(tmp_path / "a.pt", 1)
    calls: list[str] = []

    def flaky_load(path: Path, *args: object, **kwargs: object) -> object:
        calls.append(path.name)
        if len(calls) == 1:  # another job held the GPU memory
            raise DeviceOOM("The device ran out of memory loading this model.")
        return real_load(path, *args, **kwargs)  # type: ignore[arg-type]

    catalog = ModelCatalog(tmp_path, CPU, rescan_seconds=0, retry_seconds=0.2)
    with mock.patch("app.catalog.load_checkpoint", flaky_load):
        entry = catalog.entries()[0]
        assert entry.error is not None and entry.error.code == "E_DEVICE_OOM"
        catalog.entries()
        assert calls == ["a.pt"], "not retried before retry_seconds"
        time.sleep(0.3)
        assert catalog.entries()[0].ok
        assert catalog.get("latest").file == "a.pt"
        catalog.entries()
    assert calls == ["a.pt", "a.pt"]


def test_device_oom_moving_weights_to_the_device_is_a_device_oom_error() -> None:
    from app.errors import DeviceOOM
    from model_adapters.loading import loaded_model_from_module

    model = tiny_net()
    with mock.patch.object(type(model), "to",
                           side_effect=torch.cuda.OutOfMemoryError("CUDA out of memory")):
        with pytest.raises(DeviceOOM):
            loaded_model_from_module(model, architecture="tiny", input_size=(8, 8), mean=[0.5],
                                     std=[0.5], class_names=None)
