"""Occlusion speed, side by side in one run (prints ratios).

For one 224x224 image, window 16 and stride 8 (27 x 27 = 729 windows), per model, the windows
are taken in chunks of 48 and, chunk by chunk, each of the three first rows below runs on the
same chunk in turn (rotating which goes first). A busy neighbour on the shared CPU therefore
slows all three alike, which whole-row timings of a minute each could not promise.

* the batched-forward bound: windows / best forward throughput of the same model
  (channels-last, inference mode, the best of batch sizes 8/16/32, each timed over a sustained
  run) -- what any method that runs every occluded copy through the whole network costs;
* convscope's ``occlusion`` as it runs by default: incremental inference where the graph
  allows it (goal: <= 0.5x the bound on resnet18 and resnet50), and its note (the share of
  the convolution work it does);
* ``occlusion`` with ``engine=dense`` (full batched passes; target <= 1.25x the bound);

The incremental row counts the image's activation cache (one forward pass) once, as one map
does, not once per chunk; its first batches try the switch-over shares, as a model's first map
does.
* with ``--full``: whole ``occlusion`` and ``partial_occlusion`` maps (27 x 27 positions, top
  3), default engine, timed as whole rows, best of the repeats;
* with ``--captum``: captum's ``Occlusion`` batched (16 per evaluation, inference mode) and as
  users usually call it (1 per evaluation, input requiring grad).

    python benchmarks/occlusion_speed.py           # resnet18, resnet50, demo (about 10 minutes)
    python benchmarks/occlusion_speed.py --quick   # resnet18 and demo, one repeat
    python benchmarks/occlusion_speed.py --models resnet50 --captum
"""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Iterator

import torch

from bench_common import (fresh_module, prepared_model_and_target, print_row, synchronize,
                          wall_seconds)

WINDOW, STRIDE = 16, 8
BOUND_BATCH_SIZES = (8, 16, 32)


def forward_seconds_per_image(model, inputs: torch.Tensor, images: int, batch_size: int,
                              device: str) -> float:
    """Seconds per image over a sustained run of ``images`` copies at ``batch_size``
    (channels-last, inference mode). Sustained, not a short probe: a probe catches quiet
    moments of the shared CPU and would make the bound too optimistic."""
    copies = inputs.expand(batch_size, -1, -1, -1).contiguous(memory_format=torch.channels_last)
    batches = max(1, -(-images // batch_size))

    def forward() -> None:
        with torch.inference_mode():
            for _ in range(batches):
                model.module(copies)

    return wall_seconds(forward, device) / (batches * batch_size)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="resnet18 and demo, one repeat")
    parser.add_argument("--models", default=None,
                        help="comma-separated torchvision architectures and/or 'demo' "
                             "(default resnet18,resnet50,demo)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (best kept)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--captum", action="store_true", help="add captum's Occlusion rows")
    parser.add_argument("--full", action="store_true",
                        help="add whole-map rows for occlusion and partial_occlusion")
    args = parser.parse_args()
    default = "resnet18,demo" if args.quick else "resnet18,resnet50,demo"
    args.models = [name.strip() for name in (args.models or default).split(",") if name.strip()]
    args.repeats = args.repeats or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    os.environ["CONVSCOPE_TORCH_THREADS"] = str(args.threads)
    return args


def model_and_target(name: str, args: argparse.Namespace):
    if name == "demo":
        from faithfulness_speed import demo_model_and_target

        return demo_model_and_target(args)
    args.model = name
    return prepared_model_and_target(args)


CHUNK = 48


@contextlib.contextmanager
def one_image_cache(model, inputs: torch.Tensor, device: str) -> Iterator[float]:
    """While open, the traced model hands out one cache of ``inputs`` (a forward pass keeping
    every activation); yields the seconds that cache took."""
    from visualizations.incremental.auto import traced
    from visualizations.incremental.engine import NotIncremental

    try:
        graph = traced(model.module)
    except NotIncremental:
        yield 0.0
        return
    cached = []
    seconds = wall_seconds(lambda: cached.append(graph.cache(inputs)), device)
    graph.cache = lambda image: cached[0]
    try:
        yield seconds
    finally:
        del graph.cache          # the class's method again


def paired_seconds(model, inputs: torch.Tensor, index: int,
                   args: argparse.Namespace) -> tuple[dict[str, float], str, int]:
    """Seconds for all windows: incremental, dense, and the bound, measured chunk by chunk."""
    import numpy as np

    from visualizations.base import RunContext
    from visualizations.occlusion import fill_image, occluded_probabilities, window_starts

    height, width = inputs.shape[-2:]
    corners = [(top, left) for top in window_starts(height, WINDOW, STRIDE)
               for left in window_starts(width, WINDOW, STRIDE)]
    # Shuffled so every chunk mixes border and inner windows, as a whole map does.
    corners = [corners[i] for i in np.random.default_rng(0).permutation(len(corners))]
    fill = fill_image("mean", model.meta, inputs, WINDOW)

    def occlusion(chunk: list, engine: str | None) -> str:
        run = occluded_probabilities(model, inputs, fill, chunk, (WINDOW, WINDOW), [index],
                                     RunContext(), engine)
        return run.note

    note = occlusion(corners[:2], None)             # trace and probe once, untimed
    occlusion(corners[:2], "dense")
    # A map caches the unoccluded image's activations once (one forward pass); so does this
    # run, and counts that pass once, not once per chunk.
    with one_image_cache(model, inputs, args.device) as cache_seconds:
        totals = run_rows(corners, occlusion, model, inputs, args)
    totals["incremental"] += cache_seconds
    return totals, note, len(corners)


def run_rows(corners: list, occlusion, model, inputs: torch.Tensor,
             args: argparse.Namespace) -> dict[str, float]:
    """Each chunk through the three rows in turn (rotating which goes first); their totals."""

    def bound(chunk: list) -> float:
        # The best batch size's throughput, each size over a third of the chunk: a min of
        # noisy samples, so the bound errs fast (the ratios err conservative).
        return len(chunk) * min(forward_seconds_per_image(model, inputs, len(chunk) // 3, size,
                                                          args.device)
                                for size in BOUND_BATCH_SIZES)

    rows = {"incremental": lambda chunk: wall_seconds(lambda: occlusion(chunk, None),
                                                      args.device),
            "dense": lambda chunk: wall_seconds(lambda: occlusion(chunk, "dense"), args.device),
            "bound": bound}
    totals = {row: 0.0 for row in rows}
    names = list(rows)
    for number, start in enumerate(range(0, len(corners), CHUNK)):
        chunk = corners[start:start + CHUNK]
        for row in names[number % 3:] + names[:number % 3]:
            totals[row] += rows[row](chunk)
    return totals


def bench_model(name: str, args: argparse.Namespace) -> dict[str, float]:
    from visualizations import visualization_registry
    from visualizations.base import RunContext

    model, inputs, target = model_and_target(name, args)
    results: dict[str, float] = {row: float("inf") for row in ("incremental", "dense", "bound")}
    note = ""
    for _ in range(args.repeats):
        totals, note, windows = paired_seconds(model, inputs, target.index, args)
        # Keep the repeat whose bound was fastest, with its own incremental and dense times.
        if totals["bound"] < results["bound"]:
            results = dict(totals)
    runs = {}
    if args.full:
        occlusion = visualization_registry.get("occlusion")
        params = occlusion.resolve(occlusion.parse_params(
            {"window": WINDOW, "stride": STRIDE}, model.meta), model.meta)
        partial = visualization_registry.get("partial_occlusion")
        partial_params = partial.resolve(partial.parse_params(
            {"positions": 27, "window_fraction": WINDOW / 224, "top_k": 3}, model.meta),
            model.meta)
        runs["occlusion map"] = lambda: wall_seconds(lambda: occlusion.compute(
            model, inputs, target, params, RunContext()), args.device)
        runs["partial map"] = lambda: wall_seconds(lambda: partial.compute(
            model, inputs, target, partial_params, RunContext()), args.device)
    if args.captum:
        runs.update(captum_runs(model, inputs, target.index, args))
    for row in runs:
        results[row] = float("inf")
    for _ in range(args.repeats):
        for row, run in runs.items():
            results[row] = min(results[row], run())

    print(f"\n## {name}: {windows} windows (window {WINDOW}, stride {STRIDE}), in chunks of "
          f"{CHUNK}")
    print(f"# {note}")
    print(f"{'':<58s} {'time':>13s}   {'vs bound':>7s}")
    reference = results["bound"]
    print_row("lower bound: windows / best forward throughput", reference, reference)
    print_row("occlusion, default engine (incremental)", results["incremental"], reference,
              "<= 0.5x")
    print_row("occlusion, engine=dense (batched, channels-last)", results["dense"], reference,
              "<= 1.25x")
    labels = {"occlusion map": "whole occlusion map, default engine (row timing)",
              "partial map": "whole partial_occlusion map, 27x27, top 3 (row timing)",
              "captum_batched": "captum Occlusion, perturbations_per_eval=16, inference",
              "captum_default": "captum Occlusion default (1 per eval, input w/ grad)"}
    for row in runs:
        print_row(labels[row], results[row], reference)
    print(f"incremental: {results['dense'] / results['incremental']:.2f}x faster than the dense "
          f"path, {reference / results['incremental']:.2f}x faster than the bound")
    return {row: value / reference for row, value in results.items()}


def captum_runs(model, inputs: torch.Tensor, index: int, args: argparse.Namespace):
    from captum.attr import Occlusion

    def softmax_forward(batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(model.module(batch.contiguous(memory_format=torch.channels_last)),
                             dim=1)

    def captum_batched() -> None:
        with torch.inference_mode():
            Occlusion(softmax_forward).attribute(
                inputs, sliding_window_shapes=(3, WINDOW, WINDOW), strides=(3, STRIDE, STRIDE),
                baselines=0.0, target=index, perturbations_per_eval=16)

    user_module = fresh_module(model.meta.architecture, args.device) \
        if model.meta.architecture != "efficientnet-lite0" else model.module
    user_input = inputs.clone().requires_grad_(True)
    synchronize(args.device)

    def captum_default() -> None:
        Occlusion(user_module).attribute(
            user_input, sliding_window_shapes=(3, WINDOW, WINDOW), strides=(3, STRIDE, STRIDE),
            baselines=0.0, target=index)

    return {"captum_batched": lambda: wall_seconds(captum_batched, args.device),
            "captum_default": lambda: wall_seconds(captum_default, args.device)}


def main() -> None:
    args = parse_args()
    print("# occlusion speed")
    print(f"# models={','.join(args.models)} device={args.device} threads={args.threads} "
          f"repeats={args.repeats} torch={torch.__version__}")
    ratios = {name: bench_model(name, args) for name in args.models}
    print("\n## summary (time / bound)")
    print(f"{'':<34s}" + "".join(f"{name:>12s}" for name in ratios))
    for row in ratios[args.models[0]]:
        print(f"{row:<34s}" + "".join(f"{ratios[name].get(row, float('nan')):>11.2f}x"
                                      for name in ratios))


if __name__ == "__main__":
    main()
