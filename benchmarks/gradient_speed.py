"""Gradient-method speed, side by side in one run (prints ratios).

* Integrated gradients (32 steps) and SmoothGrad (16 samples) against the best batched
  forward+backward throughput of the same model: steps x (seconds per image at the best of
  batch sizes 8/16) -- target <= 1.3x.
* Saliency, Grad-CAM, CAM and Guided Grad-CAM against one forward+backward pass of one image
  -- target <= 1.5x for the first three (Guided Grad-CAM does two passes by design). Both the
  method's own work (``compute``) and the whole ``run`` (which adds the prediction's forward
  pass) are shown.

    python benchmarks/gradient_speed.py            # resnet50
    python benchmarks/gradient_speed.py --quick    # resnet18, under a minute
"""
from __future__ import annotations

import torch

from bench_common import (parse_args, prepared_model_and_target, print_header, print_row,
                          resolved_params, wall_seconds)

IG_STEPS, SMOOTHGRAD_SAMPLES = 32, 16


def forward_backward(model, inputs: torch.Tensor, target: int) -> None:
    """One forward and backward pass to the input, the way gradient methods need it."""
    leaf = inputs.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
    logits = model.module(leaf)
    torch.autograd.grad(logits[:, target].sum(), leaf)


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    print_header("gradient method speed", args)
    from visualizations import visualization_registry
    from visualizations.base import RunContext

    model, inputs, target = prepared_model_and_target(args)
    index = target.index
    repeats = args.repeats + 2

    def method(name: str, raw: dict) -> tuple:
        visualization = visualization_registry.get(name)
        params = resolved_params(visualization, raw, model.meta)

        def compute() -> None:
            visualization.compute(model, inputs, target, params, RunContext())

        def run() -> None:
            visualization.run(model, inputs, [index], params, RunContext())

        return compute, run

    copies = {size: inputs.expand(size, -1, -1, -1) for size in (8, 16)}
    timed = {
        "batched_8": lambda: forward_backward(model, copies[8], index),
        "batched_16": lambda: forward_backward(model, copies[16], index),
        "single": lambda: forward_backward(model, inputs, index),
        "ig": method("integrated_gradients", {"steps": IG_STEPS})[0],
        "smoothgrad": method("saliency", {"smoothgrad_samples": SMOOTHGRAD_SAMPLES})[0],
    }
    for name in ("saliency", "grad_cam", "cam", "guided_grad_cam"):
        timed[name], timed[name + "_run"] = method(name, {})
    # Interleaved rounds, best of each: a busy neighbour on the shared CPU hurts all rows alike.
    best = {name: float("inf") for name in timed}
    for function in timed.values():
        function()  # warm-up
    for _ in range(repeats):
        for name, function in timed.items():
            best[name] = min(best[name], wall_seconds(function, args.device))
    per_image = min(best["batched_8"] / 8, best["batched_16"] / 16)
    single = best["single"]

    print(f"{'':<58s} {'time':>13s}   {'ratio':>7s}")
    bound = IG_STEPS * per_image
    print_row(f"bound: {IG_STEPS} x best batched forward+backward", bound, bound)
    print_row(f"integrated_gradients, {IG_STEPS} steps", best["ig"], bound, "<= 1.3x")
    bound = SMOOTHGRAD_SAMPLES * per_image
    print_row(f"bound: {SMOOTHGRAD_SAMPLES} x best batched forward+backward", bound, bound)
    print_row(f"saliency with SmoothGrad, {SMOOTHGRAD_SAMPLES} samples", best["smoothgrad"],
              bound, "<= 1.3x")
    print_row("reference: one forward+backward, batch 1", single, single)
    for name, target_text in (("saliency", "<= 1.5x"), ("grad_cam", "<= 1.5x"),
                              ("cam", "<= 1.5x"), ("guided_grad_cam", "2 passes")):
        print_row(f"{name}: compute", best[name], single, target_text)
        print_row(f"{name}: run (adds the prediction's forward)", best[name + "_run"], single)

if __name__ == "__main__":
    main()
