"""Callers that already predicted (the job executor, the CLI report) pass the probabilities in,
and the method then runs no extra forward pass for them."""
from __future__ import annotations

import numpy as np
import pytest

from model_adapters.base import LoadedModel
from visualizations import visualization_registry


@pytest.mark.parametrize("name", ["saliency", "grad_cam"])
def test_given_probabilities_skip_the_prediction_pass(name: str, tiny_model: LoadedModel,
                                                      tiny_image, monkeypatch) -> None:
    method = visualization_registry.get(name)
    expected = method.run(tiny_model, tiny_image, ["predicted"], {})
    calls = []
    original_predict = type(tiny_model).predict
    monkeypatch.setattr(type(tiny_model), "predict",
                        lambda self, batch: calls.append(1) or original_predict(self, batch))

    given = method.run(tiny_model, tiny_image, ["predicted"], {},
                       probabilities=expected.probabilities)

    assert calls == []
    np.testing.assert_allclose(given.probabilities, expected.probabilities)
    assert [p.target for p in given.panels] == [p.target for p in expected.panels]
    np.testing.assert_allclose(given.panels[0].values, expected.panels[0].values, atol=1e-6)
