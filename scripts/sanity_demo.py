"""The cascading randomization sanity check of every registered method on the bundled demo
(EfficientNet-Lite0, the five photos in demo/images/), each at its default parameters.

Prints one line per method (final median Spearman and SSIM, verdict, time) and, with
``--json FILE``, writes every method's full ``SanityResult.to_dict()`` plus its time. With
``--references``, also two unregistered maps for comparison: guided backpropagation alone (the
method Adebayo et al. found insensitive) and the image's own edges (uses no model at all).

    .venv/bin/python scripts/sanity_demo.py                       # all methods (long on a CPU)
    .venv/bin/python scripts/sanity_demo.py --method grad_cam --json out.json
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from visualizations.base import Attribution, Panel, Visualization
from visualizations.common import as_model_input, to_map
from visualizations.guided_backprop import guided_gradients, require_guided_activations


@dataclass(frozen=True)
class NoParams:
    pass


class GuidedBackprop(Visualization):
    name, title, reference = "guided_backprop", "Guided backprop", "https://arxiv.org/abs/1412.6806"
    description = "Guided backpropagation alone (Guided Grad-CAM without the Grad-CAM factor)."
    Params = NoParams

    def cost(self, params, meta) -> int:
        return 1

    def compute(self, model, batch, target, params, context) -> Attribution:
        require_guided_activations(model.module)
        gradients = guided_gradients(model.module, as_model_input(batch), target.index)
        return Attribution((Panel("guided backprop", to_map(gradients.abs().amax(dim=1)),
                                  target=target),))


class ImageEdges(Visualization):
    name, title, reference = "image_edges", "Image edges", "https://arxiv.org/abs/1810.03292"
    description = "Gradient magnitude of the input image; uses no model."
    Params = NoParams

    def compute(self, model, batch, target, params, context) -> Attribution:
        image = batch[0].detach().float().cpu().numpy().mean(axis=0)
        rows, columns = np.gradient(image)
        return Attribution((Panel("edges", np.hypot(rows, columns).astype(np.float32),
                                  target=target),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", help="method name (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="write the full results here")
    parser.add_argument("--references", action="store_true",
                        help="also guided backprop alone and the model-free image edges")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from app.catalog import ModelCatalog, demo_directory
    from visualizations import visualization_registry
    from visualizations.randomization import randomization_steps
    from visualizations.sanity import sanity_check, sanity_cost

    catalog = ModelCatalog(demo_directory(), torch.device(args.device), settle_seconds=0.0)
    model = catalog.load(catalog.get("latest").id)
    photos = sorted((demo_directory() / "images").glob("*.jpg"))
    batches = [model.preprocess([Image.open(path).convert("RGB")]) for path in photos]
    steps = randomization_steps(model.module, batches[0])
    print(f"# {model.meta.architecture}, {len(photos)} photos, {len(steps)} steps: "
          f"{', '.join(step.name for step in steps)}", flush=True)

    methods = [visualization_registry.get(name)
               for name in args.method or visualization_registry.names()]
    if args.references:
        methods += [GuidedBackprop(), ImageEdges()]
    records = {}
    for method in methods:
        name = method.name
        params = method.resolve(method.parse_params({}, model.meta), model.meta)
        cost = sanity_cost(method, params, model.meta, len(batches), len(steps))
        started = time.perf_counter()
        result = sanity_check(model, batches, method, params)
        seconds = time.perf_counter() - started
        final = result.steps[-1]
        records[name] = {**result.to_dict(), "seconds": round(seconds, 1), "evaluations": cost,
                         "spearman_per_image": list(final.spearman_per_image)}
        curve = " ".join(f"{step.spearman:.2f}" for step in result.steps)
        print(f"{name:<22s} final rho={final.spearman:+.3f} ssim={final.ssim:.3f} "
              f"{'passed' if result.passed else 'FAILED'}  {seconds:7.1f} s  "
              f"({cost} evaluations)  rho per step: {curve}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
