"""Out-of-memory fallback, tested on the CPU by injecting ``torch.OutOfMemoryError``: batches
halve and retry down to 1, then the run fails with E_DEVICE_OOM."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from app.errors import DeviceOOM
from tests.visualizations.models import TinyCnn, wrap
from visualizations import visualization_registry
from visualizations.base import RunContext, hook_ids
from visualizations import batching
from visualizations.batching import (CPU_BATCH_SIZE, activation_bytes, call_with_oom_fallback,
                                     choose_batch_size, for_each_batch)


def injected_oom() -> torch.OutOfMemoryError:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")


def test_for_each_batch_halves_on_oom_and_covers_everything() -> None:
    attempts: list[tuple[int, int]] = []
    done: list[int] = []

    def process(start: int, stop: int) -> None:
        attempts.append((start, stop))
        if stop - start > 3:
            raise injected_oom()
        done.extend(range(start, stop))

    final = for_each_batch(20, 16, process)
    assert done == list(range(20)), "every item exactly once, in order"
    assert final == 2  # 16 -> 8 -> 4 -> 2
    assert [stop - start for start, stop in attempts[:4]] == [16, 8, 4, 2]


def test_for_each_batch_gives_up_at_one_with_device_oom() -> None:
    def process(start: int, stop: int) -> None:
        raise injected_oom()

    with pytest.raises(DeviceOOM) as caught:
        for_each_batch(5, 8, process)
    assert caught.value.code == "E_DEVICE_OOM"


def cpu_allocator_oom() -> RuntimeError:
    """What the CPU allocator raises: a plain RuntimeError, not torch.OutOfMemoryError."""
    return RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                        "can't allocate memory: you tried to allocate 1125899906842624 bytes.")


def test_cpu_and_runtime_error_ooms_also_halve_the_batch() -> None:
    for error in (cpu_allocator_oom(), RuntimeError("CUDA out of memory. Tried to allocate")):
        sizes: list[int] = []

        def process(start: int, stop: int, error: RuntimeError = error) -> None:
            sizes.append(stop - start)
            if stop - start > 2:
                raise error

        assert for_each_batch(6, 8, process) == 2
        assert sizes[:3] == [6, 4, 2]  # batch 8 (6 left) -> 4 -> 2
    assert batching.is_out_of_memory(injected_oom())
    assert not batching.is_out_of_memory(RuntimeError("shape mismatch"))


def test_other_errors_are_not_swallowed() -> None:
    def process(start: int, stop: int) -> None:
        raise RuntimeError("not memory")

    with pytest.raises(RuntimeError, match="not memory"):
        for_each_batch(5, 8, process)
    with pytest.raises(RuntimeError, match="not memory"):
        call_with_oom_fallback(lambda size: process(0, size), 8)


def test_call_with_oom_fallback_retries_with_half_the_batch() -> None:
    sizes: list[int] = []

    def run(size: int) -> int:
        sizes.append(size)
        if size > 5:
            raise injected_oom()
        return size

    assert call_with_oom_fallback(run, 32) == 4
    assert sizes == [32, 16, 8, 4]
    with pytest.raises(DeviceOOM):
        call_with_oom_fallback(lambda size: (_ for _ in ()).throw(injected_oom()), 4)


def test_for_each_batch_reports_progress_and_checks_cancellation() -> None:
    seen: list[float] = []
    for_each_batch(10, 4, lambda start, stop: None, RunContext(progress=seen.append))
    assert seen == [0.4, 0.8, 1.0]


def test_batch_size_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    model = wrap(TinyCnn())
    sample = torch.zeros(1, 3, 32, 32)
    assert choose_batch_size(model, sample, RunContext(batch_size=3), backward=True) == 3
    assert choose_batch_size(model, sample, RunContext(), backward=False) == CPU_BATCH_SIZE
    # With a budget of four copies' worth of activations, the batch follows the memory.
    per_copy = activation_bytes(model.module, sample)
    assert per_copy >= 4 * 16 * 32 * 32  # at least the first conv's float32 output
    monkeypatch.setattr(batching, "CPU_MEMORY_CAP_BYTES", 4 * per_copy + 1)
    assert choose_batch_size(model, sample, RunContext(), backward=False) == 4
    assert choose_batch_size(model, sample, RunContext(), backward=True) == 2
    monkeypatch.setattr(batching, "CPU_MEMORY_CAP_BYTES", 1)
    assert choose_batch_size(model, sample, RunContext(), backward=True) == 1


class OomAboveBatch(nn.Module):
    """TinyCnn that raises CUDA's out-of-memory error for batches larger than ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.inner = TinyCnn()
        self.limit = limit
        self.largest_ok = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise injected_oom()
        self.largest_ok = max(self.largest_ok, x.shape[0])
        return self.inner(x)


@pytest.mark.parametrize(("name", "raw"), [
    ("occlusion", {"window": 4, "stride": 2}), ("partial_occlusion", {"positions": 5}),
    ("integrated_gradients", {"steps": 20}), ("saliency", {"smoothgrad_samples": 10})])
def test_methods_fall_back_to_smaller_batches(name: str, raw: dict) -> None:
    torch.manual_seed(0)
    module = OomAboveBatch(limit=3)
    model = wrap(module)
    image = torch.randn(1, 3, 32, 32)
    method = visualization_registry.get(name)
    result = method.run(model, image, None, raw, RunContext(batch_size=16))
    assert module.largest_ok == 2  # 16 -> 8 -> 4 -> 2
    reference = method.run(model, image, None, raw, RunContext(batch_size=2))
    for got, want in zip(result.panels, reference.panels):
        np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-6)
    assert not hook_ids(model.module)


@pytest.mark.parametrize("make_error", [injected_oom, cpu_allocator_oom])
@pytest.mark.parametrize("name", ["occlusion", "integrated_gradients", "grad_cam"])
def test_oom_even_at_batch_one_is_device_oom(name: str, make_error) -> None:
    torch.manual_seed(0)
    model = wrap(TinyCnn())
    image = torch.randn(1, 3, 32, 32)
    method = visualization_registry.get(name)
    original_forward = model.module.forward
    calls = {"count": 0}

    def forward_failing_after_prediction(x: torch.Tensor) -> torch.Tensor:
        calls["count"] += 1
        if calls["count"] > 1:  # the prediction succeeds; the method's passes do not
            raise make_error()
        return original_forward(x)

    model.module.forward = forward_failing_after_prediction  # type: ignore[method-assign]
    with pytest.raises(DeviceOOM) as caught:
        method.run(model, image, None, {}, RunContext(batch_size=4))
    assert caught.value.http_status == 503
    assert not hook_ids(model.module)


def test_gpu_budget_counts_memory_cached_by_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a large run PyTorch's allocator keeps memory reserved; the driver reports it as
    used, but the next batch can use it (checked on the CPU with the CUDA queries faked)."""
    gib = 2 ** 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 60 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * gib)
    budget = batching._gpu_budget_bytes(torch.device("cuda:0"))
    assert budget == (2 + 50) * gib * batching.GPU_MEMORY_SHARE


class _OomInBackward(torch.autograd.Function):
    """Identity forward; the backward of a batch larger than ``limit`` runs out of memory
    (as on a GPU, where the backward pass needs the most memory)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, limit: int) -> torch.Tensor:  # type: ignore[override]
        ctx.limit = limit
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        if grad.shape[0] > ctx.limit:
            raise injected_oom()
        return grad, None


class OomInBackwardAbove(nn.Module):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.inner = TinyCnn()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(_OomInBackward.apply(x, self.limit))


@pytest.mark.parametrize(("name", "raw"), [("integrated_gradients", {"steps": 20}),
                                           ("saliency", {"smoothgrad_samples": 10})])
def test_progress_never_goes_back_when_a_backward_pass_is_retried(name: str, raw: dict) -> None:
    torch.manual_seed(0)
    model = wrap(OomInBackwardAbove(limit=3))
    seen: list[float] = []
    visualization_registry.get(name).run(model, torch.randn(1, 3, 32, 32), None, raw,
                                         RunContext(progress=seen.append, batch_size=16))
    assert seen[-1] == 1.0
    assert all(a <= b for a, b in zip(seen, seen[1:])), seen
