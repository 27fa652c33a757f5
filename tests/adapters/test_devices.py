"""Device specs and the torch thread setting."""
from __future__ import annotations

import pytest
import torch

from app.devices import configure_threads, resolve_device
from app.errors import DeviceUnavailable


def test_cpu_and_auto() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected


@pytest.mark.parametrize("spec", ["tpu", "cuda:x", "cuda:-1", "graphics", "cuda:0:1"])
def test_unknown_specs_are_refused(spec: str) -> None:
    with pytest.raises(DeviceUnavailable) as raised:
        resolve_device(spec)
    assert raised.value.code == "E_DEVICE_UNAVAILABLE"


def test_missing_cuda_device_is_refused() -> None:
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DeviceUnavailable):
        resolve_device(f"cuda:{count}")
    if count == 0:
        with pytest.raises(DeviceUnavailable):
            resolve_device("cuda")


@pytest.mark.gpu
def test_cuda_resolves_when_present() -> None:
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_configure_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("CONVSCOPE_TORCH_THREADS", "1")
        assert configure_threads() == 1 and torch.get_num_threads() == 1
        for bad in ("0", "many", "-2"):
            monkeypatch.setenv("CONVSCOPE_TORCH_THREADS", bad)
            assert configure_threads() is None
        monkeypatch.delenv("CONVSCOPE_TORCH_THREADS")
        assert configure_threads() is None
    finally:
        torch.set_num_threads(before)
