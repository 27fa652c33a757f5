"""Faithfulness scores of methods on the bundled demo (EfficientNet-Lite0, the photos in
demo/images/), each at its default parameters, for each photo's top-1 class: the README's
"Faithfulness scores" table. A random map (uniform noise, seed 1) is scored beside them.

Scores go through ``app.faithfulness_scores.FaithfulnessScorer`` as every panel's do, so each
photo's random reference is computed once and shared by its methods.

    .venv/bin/python scripts/faithfulness_demo.py                          # cheap methods
    .venv/bin/python scripts/faithfulness_demo.py --method occlusion --image chelsea.jpg
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DEMO_IMAGES = Path(__file__).resolve().parent.parent / "demo" / "images"
DEFAULT_METHODS = ("grad_cam", "cam", "saliency", "guided_grad_cam")
KEYS = ("deletion_auc", "random_deletion_auc", "insertion_auc", "random_insertion_auc")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", action="append", dest="methods", default=None)
    parser.add_argument("--image", action="append", dest="images", default=None,
                        help="a file name in demo/images (default: all)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    from app.catalog import ModelCatalog, demo_directory
    from app.faithfulness_scores import FaithfulnessScorer, verdict
    from app.pipeline import predict
    from visualizations import visualization_registry
    from visualizations.base import Panel, TargetInfo

    catalog = ModelCatalog(demo_directory(), torch.device("cpu"), settle_seconds=0.0)
    model = catalog.load(catalog.get("latest").id)
    scorer = FaithfulnessScorer()
    paths = ([DEMO_IMAGES / name for name in args.images] if args.images
             else sorted(DEMO_IMAGES.glob("*.jpg")))
    print("photo p method " + " ".join(KEYS) + " badge")
    for path in paths:
        with Image.open(path) as image:
            prediction = predict(model, image.convert("RGB"), 5, with_uncertainty=False)
        target = prediction.predicted
        probability = float(prediction.probabilities[target])
        target_info = TargetInfo(target, model.meta.class_names[target], probability)
        for name in (*(args.methods or DEFAULT_METHODS), "random map"):
            if name == "random map":
                size = tuple(prediction.batch.shape[-2:])
                noise = np.random.default_rng(1).random(size).astype(np.float32)
                panels = [Panel("random", noise, target=target_info)]
                params, method = {}, "grad_cam"      # mean fill, like every fill-less method
            else:
                result = visualization_registry.get(name).run(
                    model, prediction.batch, [target], {},
                    probabilities=prediction.probabilities)
                panels, params, method = list(result.panels), result.params, name
            scores = next(score for score in scorer.score_panels(
                model, method, params, prediction.batch, panels) if score is not None)
            print(path.name, f"{probability:.3f}", name.replace(" ", "_"),
                  " ".join(f"{scores[key]:.3f}" for key in KEYS),
                  verdict(scores, probability)["label"].replace(" ", "_"), flush=True)


if __name__ == "__main__":
    main()
