"""Faithfulness scores on every panel (``app.faithfulness_scores`` through ``app.pipeline``).

The engine's own correctness (hand-computed curves; occlusion beating random on a model that
reads one known region while a random map does not) is ``test_faithfulness.py``, in particular
``test_occlusion_beats_random_and_a_random_map_does_not``. Here: which panels are scored, with
which orientation, the badge's verdict on that same known-good / random pair, the record's
exact keys, the cache key, the cost estimate against real runs, and that the random reference
is computed once per image x target across methods.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from app import faithfulness_scores
from app.faithfulness_scores import (SCORE_KEYS, FaithfulnessScorer, evaluations_per_target,
                                     scored_panels, verdict)
from app.pipeline import (MethodRequest, ModelIdentity, method_request, predict,
                          visualization_key, visualize)
from tests.visualizations.models import TinyCnn, wrap
from tests.visualizations.test_faithfulness import SIDE, region_image, region_model
from visualizations import faithfulness as engine
from visualizations import visualization_registry
from visualizations.base import Panel, TargetInfo

__all__ = ["region_image", "region_model"]      # fixtures used below

# Cheap parameters for the methods that have costly defaults (enough to score their panels).
CHEAP = {"integrated_gradients": {"steps": 8}, "saliency": {"smoothgrad_samples": 2},
         "occlusion": {"window": 8, "stride": 8}, "partial_occlusion": {"positions": 4},
         "adversarial": {"steps": 2, "rounds": 1}}


@pytest.fixture
def counted_references(monkeypatch) -> list[int]:
    """Every random reference computed, by target."""
    targets: list[int] = []
    original = engine.random_reference

    def counting(model, images, target, context=None):
        targets.append(target)
        return original(model, images, target, context)

    monkeypatch.setattr(faithfulness_scores.engine, "random_reference", counting)
    return targets


@pytest.fixture
def tiny_inputs():
    torch.manual_seed(0)
    model = wrap(TinyCnn(classes=3), class_names=("red", "green", "blue"))
    pixels = np.random.default_rng(4).integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)
    return model, predict(model, Image.fromarray(pixels), 3, with_uncertainty=False)


def _request(name: str, model, **params) -> MethodRequest:
    visualization = visualization_registry.get(name)
    cheap = {key: value for key, value in CHEAP.get(name, {}).items()
             if key in {f for f in visualization.Params.__dataclass_fields__}}
    return method_request(visualization, {**cheap, **params}, model.meta)


def test_every_method_scores_the_panels_its_cost_counts(tiny_inputs) -> None:
    """The job's cost check counts ``scored_panels`` per method; a real run must score exactly
    that many, with the exact keys, and no image panel or panel without a target."""
    model, inputs = tiny_inputs
    scorer = FaithfulnessScorer()
    for name in visualization_registry.names():
        request = _request(name, model)
        panel_set = visualize(model, visualization_registry.get(name), request, inputs,
                              inputs.predicted, scorer=scorer)
        panels = panel_set.record["panels"]
        scored = [panel for panel in panels if panel["faithfulness"] is not None]
        assert len(scored) == scored_panels(name, request.params, model.meta), name
        for panel in panels:
            if panel in scored:
                assert tuple(panel["faithfulness"]) == SCORE_KEYS, name
                assert all(isinstance(v, float) and 0.0 <= v <= 1.0
                           for v in panel["faithfulness"].values()), name
                assert panel["kind"] == "heatmap" and panel["target"] is not None
            else:
                assert panel["faithfulness"] is None
        assert panel_set.record["faithfulness_ms"] > 0


def test_adversarial_scores_no_map_of_the_perturbed_image(tiny_inputs) -> None:
    model, inputs = tiny_inputs
    request = _request("adversarial", model)
    panel_set = visualize(model, visualization_registry.get("adversarial"), request, inputs,
                          inputs.predicted, scorer=FaithfulnessScorer())
    by_title = {panel["title"]: panel["faithfulness"] for panel in panel_set.record["panels"]}
    perturbed = [title for title in by_title if title.startswith("Grad-CAM of the perturbed")]
    original = [title for title in by_title if title.startswith("Grad-CAM of the original")]
    assert perturbed and original, list(by_title)
    assert by_title[perturbed[0]] is None and by_title[original[0]] is not None


def test_without_a_scorer_no_panel_is_scored(tiny_inputs) -> None:
    model, inputs = tiny_inputs
    panel_set = visualize(model, visualization_registry.get("grad_cam"),
                          _request("grad_cam", model), inputs, inputs.predicted)
    assert [panel["faithfulness"] for panel in panel_set.record["panels"]] == [None]
    assert panel_set.record["faithfulness_ms"] is None


def test_the_random_reference_is_computed_once_per_image_and_target(tiny_inputs,
                                                                   counted_references) -> None:
    model, inputs = tiny_inputs
    scorer = FaithfulnessScorer()
    other = (inputs.predicted + 1) % 3
    for name in ("grad_cam", "saliency", "occlusion", "cam"):
        for target in (inputs.predicted, other):
            visualize(model, visualization_registry.get(name), _request(name, model), inputs,
                      target, scorer=scorer)
    assert sorted(counted_references) == sorted([inputs.predicted, other])
    # Another fill is another reference (deleted pixels look different); the mean fill's
    # references are still shared.
    gray = _request("occlusion", model, fill="gray")
    visualize(model, visualization_registry.get("occlusion"), gray, inputs, other,
              scorer=scorer)
    assert len(counted_references) == 3
    # Another image is another reference.
    pixels = np.random.default_rng(9).integers(0, 256, size=(SIDE, SIDE, 3), dtype=np.uint8)
    second = predict(model, Image.fromarray(pixels), 3, with_uncertainty=False)
    visualize(model, visualization_registry.get("grad_cam"), _request("grad_cam", model), second,
              other, scorer=scorer)
    assert len(counted_references) == 4


def test_the_cost_estimate_bounds_the_references_of_every_method(tiny_inputs,
                                                                 counted_references) -> None:
    """Each method alone, with a fresh scorer: the references it computes (partial occlusion:
    one per class shown) fit in what ``evaluations_per_target`` counts for it."""
    model, inputs = tiny_inputs
    for name in visualization_registry.names():
        request = _request(name, model)
        counted_references.clear()
        panel_set = visualize(model, visualization_registry.get(name), request, inputs,
                              inputs.predicted, scorer=FaithfulnessScorer())
        panels = sum(panel["faithfulness"] is not None for panel in panel_set.record["panels"])
        used = panels * engine.EVALUATIONS_PER_MAP + \
            len(counted_references) * engine.REFERENCE_EVALUATIONS
        assert used <= evaluations_per_target([request], model.meta), name
    partial = _request("partial_occlusion", model, top_k=3)
    counted_references.clear()
    visualize(model, visualization_registry.get("partial_occlusion"), partial, inputs,
              inputs.predicted, scorer=FaithfulnessScorer())
    assert sorted(counted_references) == [0, 1, 2]


def test_the_reference_cache_is_bounded(tiny_inputs, counted_references) -> None:
    model, inputs = tiny_inputs
    scorer = FaithfulnessScorer(reference_cache_size=1)
    request = _request("grad_cam", model)
    for target in (0, 1, 0):
        visualize(model, visualization_registry.get("grad_cam"), request, inputs, target,
                  scorer=scorer)
    assert counted_references == [0, 1, 0], "one entry kept: the first target was dropped"


def test_known_good_map_gets_the_good_badge_and_a_random_map_does_not(region_model,
                                                                      region_image) -> None:
    """The engine test's known-good / random pair, through the scorer and the badge's rule."""
    occlusion = visualization_registry.get("occlusion").run(region_model, region_image, [0], {})
    (good,) = occlusion.panels
    noise = Panel("random", np.random.default_rng(7).random((SIDE, SIDE)).astype(np.float32),
                  target=good.target)
    scores = FaithfulnessScorer().score_panels(region_model, "occlusion", occlusion.params,
                                               region_image, [good, noise])
    probability = good.target.probability
    assert verdict(scores[0], probability)["better_than_random"] is True
    assert verdict(scores[1], probability)["better_than_random"] is False
    assert verdict(scores[1], probability)["label"] == "no better than random"
    assert "Deletion AUC" in verdict(scores[0], probability)["summary"]
    assert verdict(None, probability) is None


def test_partial_occlusion_is_ranked_lowest_probability_first(region_model,
                                                              region_image) -> None:
    """Its map is the target's probability with each cell hidden: low where the evidence is.
    Ranked highest first, the region model's region would be deleted last (worse than
    random); ranked as the scorer does, it beats random."""
    result = visualization_registry.get("partial_occlusion").run(
        region_model, region_image, [0], {"positions": 4, "top_k": 1})
    scored = FaithfulnessScorer().score_panels(region_model, "partial_occlusion", result.params,
                                               region_image, result.panels)
    scores = scored[0]
    assert scores["deletion_auc"] < scores["random_deletion_auc"] - 0.1
    assert verdict(scores, result.panels[0].target.probability)["better_than_random"]
    assert scored[-1] is None                      # the grid picture


def test_verdict_rule_needs_both_curves_beyond_a_tenth_of_the_probability() -> None:
    base = {"random_deletion_auc": 0.5, "random_insertion_auc": 0.5}
    # At probability 0.8 each curve must beat random by 0.08.
    assert verdict({**base, "deletion_auc": 0.41, "insertion_auc": 0.59}, 0.8)["better_than_random"]
    assert not verdict({**base, "deletion_auc": 0.41, "insertion_auc": 0.57},
                       0.8)["better_than_random"]
    assert not verdict({**base, "deletion_auc": 0.43, "insertion_auc": 0.9},
                       0.8)["better_than_random"]
    # At probability 0.2 the margin is 0.02.
    assert verdict({**base, "deletion_auc": 0.47, "insertion_auc": 0.53}, 0.2)["better_than_random"]
    # And never below 0.01, however unlikely the class.
    assert not verdict({**base, "deletion_auc": 0.495, "insertion_auc": 0.505},
                       0.001)["better_than_random"]
    mixed = verdict({**base, "deletion_auc": 0.6, "insertion_auc": 0.7}, 0.8)
    assert "worse by 0.100" in mixed["summary"] and "better by 0.200" in mixed["summary"]
    assert (mixed["state"], mixed["label"]) == ("mixed", "better than random on insertion only")
    assert not mixed["better_than_random"]
    poor = verdict({**base, "deletion_auc": 0.5, "insertion_auc": 0.5}, 0.8)
    assert (poor["state"], poor["label"]) == ("poor", "no better than random")
    assert verdict({**base, "deletion_auc": 0.41, "insertion_auc": 0.59}, 0.8)["state"] == "good"


def test_cache_key_distinguishes_scored_results() -> None:
    model = ModelIdentity("c" * 64, "f" * 16)
    request = MethodRequest("grad_cam", {"layer": "x"}, 1, 1)
    without = visualization_key("a" * 64, model, request, 3)
    assert visualization_key("a" * 64, model, request, 3, faithfulness=False) == without
    assert visualization_key("a" * 64, model, request, 3, faithfulness=True) != without


def test_cost_estimate_counts_panels_and_shared_references() -> None:
    meta = wrap(TinyCnn(classes=3), class_names=("red", "green", "blue")).meta
    methods = [MethodRequest("grad_cam", {}, 1, 1), MethodRequest("saliency", {}, 16, 1),
               MethodRequest("partial_occlusion", {"top_k": 2, "fill": "mean"}, 65, 1)]
    # 4 scored panels x 66; one reference shared for the target (every fill is the mean) and
    # one for partial occlusion's second class, x 198.
    assert evaluations_per_target(methods, meta) == 4 * 66 + 2 * 198
    gray = MethodRequest("occlusion", {"fill": "gray", "window": 4}, 100, 1)
    assert evaluations_per_target([*methods, gray], meta) == 5 * 66 + 3 * 198


def test_unscored_panel_kinds() -> None:
    target = TargetInfo(0, "red", 0.5)
    values = np.zeros((4, 4), np.float32)
    assert faithfulness_scores.is_scored("grad_cam", Panel("map", values, target=target))
    assert not faithfulness_scores.is_scored("grad_cam", Panel("map", values))
    assert not faithfulness_scores.is_scored(
        "occlusion", Panel("grid", np.zeros((4, 4, 3), np.uint8), target=target, kind="image"))

