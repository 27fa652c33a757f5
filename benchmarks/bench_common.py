"""Shared helpers for the benchmark scripts: model setup, timing, ratio printing.

Benchmarks print ratios measured side by side in one run; absolute times on a shared CPU are
noise, ratios much less so. Weights are random (no downloads): speed does not depend on them.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable

import torch


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true",
                        help="resnet18 and fewer repeats (about a minute)")
    parser.add_argument("--model", default=None,
                        help="torchvision architecture (default resnet50; resnet18 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (best is kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    args.model = args.model or ("resnet18" if args.quick else "resnet50")
    args.repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    os.environ["CONVSCOPE_TORCH_THREADS"] = str(args.threads)
    return args


def build_model(architecture: str, device: str, size: int = 224):
    """A random-weight torchvision classifier wrapped as a LoadedModel."""
    import torchvision

    from model_adapters.loading import loaded_model_from_module

    torch.manual_seed(0)
    module = torchvision.models.get_model(architecture, weights=None)
    return loaded_model_from_module(module, architecture=architecture, input_size=(size, size),
                                    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                                    class_names=None, device=device)


def prepared_model_and_target(args: argparse.Namespace):
    """The benchmark's model (channels-last, as the methods leave it), one random image, and
    its predicted class as a ``TargetInfo``: the setup every method benchmark shares."""
    from visualizations.base import TargetInfo
    from visualizations.common import prepare_model

    model = build_model(args.model, args.device)
    inputs = image(args.device)
    prepare_model(model)
    probabilities = model.predict(inputs)[0]
    index = int(probabilities.argmax())
    target = TargetInfo(index, model.meta.class_names[index], float(probabilities[index]))
    return model, inputs, target


def fresh_module(architecture: str, device: str) -> torch.nn.Module:
    """The same architecture as a user would hold it: contiguous NCHW weights, eval mode."""
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.get_model(architecture, weights=None).eval().to(device)


def image(device: str, size: int = 224) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, size, size, generator=generator).to(device)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def wall_seconds(function: Callable[[], object], device: str) -> float:
    """Wall time of one call, until the device has finished its work. No warm-up and no
    repeats here: the callers interleave their rows round by round and keep each row's best,
    so a busy moment on the shared CPU hurts every row alike."""
    started = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - started


def resolved_params(visualization, raw: dict, meta):
    """``raw`` parsed and resolved for ``meta``, as a job does before it runs a method."""
    return visualization.resolve(visualization.parse_params(raw, meta), meta)


def print_header(title: str, args: argparse.Namespace) -> None:
    print(f"# {title}")
    print(f"# model={args.model} device={args.device} threads={args.threads} "
          f"repeats={args.repeats} torch={torch.__version__}")


def print_row(name: str, seconds: float, reference: float, target: str = "") -> None:
    ratio = seconds / reference if reference > 0 else float("nan")
    suffix = f"   (target {target})" if target else ""
    print(f"{name:<58s} {seconds * 1000:10.1f} ms   {ratio:6.2f}x{suffix}")
