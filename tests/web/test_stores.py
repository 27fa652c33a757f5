"""The stores: content addressing, atomic writes, lookups that never join ids into paths."""
from __future__ import annotations

import os

import pytest

from app.errors import NotFound
from app.stores import ResultStore, atomic_write_bytes, result_key


def test_result_store_round_trip_and_lookup(tmp_path):
    store = ResultStore(tmp_path / "results")
    key = result_key(image="a", method="m", params={"b": 1, "a": 2}, target=3)
    assert key == result_key(target=3, params={"a": 2, "b": 1}, method="m", image="a")
    assert key != result_key(image="a", method="m", params={"b": 1, "a": 2}, target=4)
    assert store.get(key) is None
    stored = store.put(key, {"kind": "test"}, {"panel-0-values.npy": b"123"})
    assert stored.files == ["panel-0-values.npy"]
    path, mimetype = store.file(key, "panel-0-values.npy")
    assert path.read_bytes() == b"123" and mimetype == "application/octet-stream"
    with pytest.raises(NotFound):
        store.file(key, "../" + key + "/result.json")
    # Another process sharing the directory finds it too (the index refreshes on a miss).
    assert ResultStore(tmp_path / "results").get(key).record["kind"] == "test"
    # Storing the same key again is harmless.
    store.put(key, {"kind": "test"}, {"panel-0-values.npy": b"123"})
    assert not [name for name in os.listdir(tmp_path / "results") if name.startswith(".tmp")]
    store.delete(key)
    assert store.get(key) is None


@pytest.mark.parametrize("key", ["..", "../results", "/etc", "A" * 64, "0" * 63, ""])
def test_malformed_keys_are_never_looked_up_on_disk(tmp_path, key):
    store = ResultStore(tmp_path / "results")
    assert store.get(key) is None
    with pytest.raises(NotFound):
        store.file(key, "result.json")


def test_atomic_write_leaves_no_partial_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "file.json"
    atomic_write_bytes(target, b"old")

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(Exception) as caught:
        atomic_write_bytes(target, b"new")
    assert getattr(caught.value, "code", "") == "E_STORAGE_FULL"
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["file.json"]


def test_result_keys_change_with_the_method_version() -> None:
    """A method whose output changed bumps its version; its old results are then never served
    (the package version, 0.1.0 for ever, no longer stands in for that)."""
    from app.pipeline import MethodRequest, ModelIdentity, visualization_key

    model = ModelIdentity("c" * 64, "f" * 16)
    request = MethodRequest("grad_cam", {"layer": "x"}, cost=1, version=1)
    before = visualization_key("a" * 64, model, request, 3)
    assert visualization_key("a" * 64, model, request, 3) == before
    bumped = MethodRequest("grad_cam", {"layer": "x"}, cost=1, version=2)
    assert visualization_key("a" * 64, model, bumped, 3) != before
    assert visualization_key("a" * 64, model, request, 4) != before