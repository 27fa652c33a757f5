"""Batch sizes for perturbation and step batches, and the CUDA out-of-memory fallback.

Perturbation methods (occlusion) and path methods (integrated gradients, SmoothGrad) evaluate
the model on many copies of one image. Running the copies in batches is what makes them fast:
on a CPU, batches of 8-16 reach the forward-throughput bound; on a GPU, batch 1 leaves the
device mostly idle. When a batch does not fit in GPU memory, we halve it and retry, down to 1,
and only then give up with ``DeviceOOM``.
"""
from __future__ import annotations

import logging
import os
import weakref
from typing import TYPE_CHECKING, Callable, TypeVar

from app.errors import DeviceOOM

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel
    from visualizations.context import RunContext

log = logging.getLogger(__name__)

T = TypeVar("T")

# On a CPU, throughput stops improving around 8-16 copies per batch (measured for resnet18/50,
# efficientnet-lite0 at 224 px, one thread); larger batches only cost memory and latency.
CPU_BATCH_SIZE = 16
MAX_GPU_BATCH_SIZE = 128
# Memory one batch may use: a share of the free GPU memory (activations are estimated, so keep
# headroom), and on a CPU a share of the available RAM, at most 4 GiB.
GPU_MEMORY_SHARE = 0.5
CPU_MEMORY_SHARE = 0.25
CPU_MEMORY_CAP_BYTES = 4 * 2 ** 30

# Per model (weakly held) and input shape: bytes of activations for one copy.
_ACTIVATION_BYTES: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[int, ...], int]]" = \
    weakref.WeakKeyDictionary()


def choose_batch_size(model: "LoadedModel", sample: "torch.Tensor", context: "RunContext", *,
                      backward: bool) -> int:
    """How many copies of ``sample`` (1, C, H, W) to evaluate at once.

    ``context.batch_size`` wins when given. Otherwise the memory one copy needs is estimated
    from the activation sizes of one probe forward pass (cached per model and input shape;
    doubled with gradients: saved activations plus their gradients), and the batch is what fits
    the device's budget -- on a CPU at most ``CPU_BATCH_SIZE``, which already reaches the
    throughput bound. A wrong estimate on a GPU is caught by the out-of-memory fallback.
    """
    if context.batch_size:
        return max(1, int(context.batch_size))
    per_copy = _activation_bytes_cached(model, sample) * (2 if backward else 1)
    if sample.device.type == "cuda":
        budget, largest = _gpu_budget_bytes(sample.device), MAX_GPU_BATCH_SIZE
    else:
        budget, largest = _cpu_budget_bytes(), CPU_BATCH_SIZE
    return max(1, min(largest, int(budget // max(per_copy, 1))))


def _gpu_budget_bytes(device: "torch.device") -> float:
    """A share of the memory this process can still use on ``device``: what the driver reports
    free plus what PyTorch's caching allocator holds but no tensor uses (after one large run the
    cache keeps most of the memory reserved, and the driver no longer counts it as free)."""
    import torch

    free_bytes, _ = torch.cuda.mem_get_info(device)
    cached_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return (free_bytes + max(0, cached_unused)) * GPU_MEMORY_SHARE


def _cpu_budget_bytes() -> float:
    try:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not Linux-like: assume the cap is fine
        return float(CPU_MEMORY_CAP_BYTES)
    return float(min(CPU_MEMORY_CAP_BYTES, available * CPU_MEMORY_SHARE))


def _activation_bytes_cached(model: "LoadedModel", sample: "torch.Tensor") -> int:
    key = tuple(sample.shape[1:])
    known = _ACTIVATION_BYTES.setdefault(model.module, {})
    if key not in known:
        known[key] = activation_bytes(model.module, sample[:1])
    return known[key]


def activation_bytes(module: "torch.nn.Module", sample: "torch.Tensor") -> int:
    """Total bytes of every leaf module's output for one sample (one probe forward pass).

    With gradients, all of these are kept for the backward pass; without, far fewer are alive
    at once, so this over-estimates forward-only needs (the safe direction).
    """
    import torch

    total = 0

    def count(_module: torch.nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    handles = [leaf.register_forward_hook(count) for leaf in leaves]
    try:
        with torch.inference_mode():
            module(sample)
    finally:
        for handle in handles:
            handle.remove()
    return max(total, sample.numel() * sample.element_size())


# Out-of-memory errors that are not ``torch.OutOfMemoryError``: the CPU allocator's (a plain
# RuntimeError), and CUDA/cuDNN failures that some kernels report as RuntimeError.
_OOM_MESSAGES = ("DefaultCPUAllocator: can't allocate memory", "CUDA out of memory",
                 "CUDNN_STATUS_ALLOC_FAILED", "CUBLAS_STATUS_ALLOC_FAILED")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` means the device (GPU or CPU) could not allocate memory."""
    import torch

    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(text in str(error) for text in _OOM_MESSAGES)


def _release_cached_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _halved_after(error: Exception, size: int, advice: str) -> int:
    """The batch size to retry with after ``error``: half of ``size``. Re-raises anything that
    is not out-of-memory; at size 1 raises DeviceOOM."""
    if not is_out_of_memory(error):
        raise error
    _release_cached_memory()
    if size == 1:
        raise DeviceOOM(f"The device ran out of memory even at batch size 1; try {advice}.") \
            from error
    log.warning("out of memory; retrying with batch size %d", size // 2)
    return size // 2


def call_with_oom_fallback(run: Callable[[int], T], batch_size: int) -> T:
    """Call ``run(batch_size)``; on out-of-memory halve the batch size and call again.

    For methods whose batching happens inside one library call (captum's
    ``internal_batch_size``): a failed call is repeated whole with the smaller size.
    """
    size = max(1, int(batch_size))
    while True:
        try:
            return run(size)
        except Exception as error:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            size = _halved_after(error, size, "a smaller model or fewer samples")


def for_each_batch(total: int, batch_size: int, process: Callable[[int, int], None],
                   context: "RunContext | None" = None) -> int:
    """Call ``process(start, stop)`` over ``range(total)`` in batches, in order.

    On out-of-memory, the failed batch is retried at half the size (later batches keep the
    smaller size), down to 1, then ``DeviceOOM``. Between batches, checks cancellation and
    reports progress ``stop / total``. Returns the batch size that finally worked.
    """
    size = max(1, int(batch_size))
    start = 0
    while start < total:
        if context is not None:
            context.check_cancelled()
        stop = min(total, start + size)
        try:
            process(start, stop)
        except Exception as error:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            size = _halved_after(error, size, "a smaller model or a larger window")
            continue
        start = stop
        if context is not None:
            context.report(stop / total)
    return size
