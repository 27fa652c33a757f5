"""Every registered visualization passes the same contract: it describes itself, its parameters
are bounded, parse and round-trip, bad values are E_BAD_PARAMETER, its output has the right
shape, range and finiteness, hooks are gone afterwards, it reports monotone progress, stops
when cancelled, and two threads on one model do not disturb each other."""
from __future__ import annotations

import json
import logging
import threading
import time

import numpy as np
import pytest
import torch
from torch import nn

from app.errors import BadParameter, Cancelled, MethodUnsupported, ModelOutputInvalid
from model_adapters.base import LoadedModel
from tests.visualizations.models import (NanModel, NanWhenOccluded, TinyCnn, TinyTransformer,
                                         TwoLinearHead, wrap)
from visualizations import visualization_registry
from visualizations.base import RunContext, hook_ids, params_to_dict

METHODS = visualization_registry.names()
CAM_FAMILY = {"cam", "grad_cam", "guided_grad_cam"}
# Methods that evaluate the model many times, in batches, with progress in between.
BATCHED = {"integrated_gradients": {"steps": 16}, "occlusion": {"window": 4, "stride": 2},
           "partial_occlusion": {"positions": 6}, "saliency": {"smoothgrad_samples": 12}}


def test_registry_holds_exactly_the_eight_methods() -> None:
    assert METHODS == ["saliency", "integrated_gradients", "occlusion", "partial_occlusion",
                       "cam", "grad_cam", "guided_grad_cam", "adversarial"]


@pytest.mark.parametrize("name", METHODS)
def test_describes_itself_with_bounded_parameters(name: str, tiny_model: LoadedModel) -> None:
    method = visualization_registry.get(name)
    description = method.describe(tiny_model.meta)
    json.dumps(description)  # serializable as is, for the JSON API
    assert description["name"] == name
    assert description["title"] and description["description"]
    assert description["reference"].startswith("https://")
    for spec in method.param_specs(tiny_model.meta):
        assert spec.label and spec.help, spec.name
        if spec.kind in ("int", "float"):
            assert spec.min is not None and spec.max is not None, f"{spec.name} is unbounded"
            if spec.default is not None:
                assert spec.min <= spec.default <= spec.max
        if spec.kind == "choice":
            assert spec.choices, spec.name
            assert spec.default is None or spec.default in spec.choices


@pytest.mark.parametrize("name", METHODS)
def test_parameters_round_trip(name: str, tiny_model: LoadedModel) -> None:
    method = visualization_registry.get(name)
    meta = tiny_model.meta
    resolved = method.resolve(method.parse_params({}, meta), meta)
    as_dict = params_to_dict(resolved)
    assert method.parse_params(as_dict, meta) == resolved
    assert method.parse_params(json.loads(json.dumps(as_dict)), meta) == resolved
    # Form fields and --param values arrive as strings.
    as_text = {key: str(value).lower() if isinstance(value, bool) else str(value)
               for key, value in as_dict.items() if value is not None}
    assert method.parse_params(as_text, meta) == resolved


def _bad_values(spec) -> list[object]:
    if spec.kind == "int":
        return [spec.min - 1, spec.max + 1, "abc", 1.5, True]
    if spec.kind == "float":
        return [spec.min - 0.001, spec.max + 1, "abc", "nan", "inf"]
    if spec.kind == "bool":
        return ["maybe", 3]
    if spec.kind == "choice":
        return ["no-such-choice", 7]
    return [123]


@pytest.mark.parametrize("name", METHODS)
def test_bad_values_are_bad_parameter_errors(name: str, tiny_model: LoadedModel) -> None:
    method = visualization_registry.get(name)
    for spec in method.param_specs(tiny_model.meta):
        for value in _bad_values(spec):
            with pytest.raises(BadParameter) as caught:
                method.parse_params({spec.name: value}, tiny_model.meta)
            assert caught.value.code == "E_BAD_PARAMETER"
            assert spec.name in caught.value.fields, (spec.name, value)
            assert spec.name in caught.value.message
    with pytest.raises(BadParameter):
        method.parse_params({"no_such_parameter": 1}, tiny_model.meta)
    # run() validates too, before touching the model.
    with pytest.raises(BadParameter):
        method.run(tiny_model, torch.zeros(1, 3, 32, 32), None, {"no_such_parameter": 1})


def test_out_of_range_message_names_the_allowed_range(tiny_model: LoadedModel) -> None:
    with pytest.raises(BadParameter) as caught:
        visualization_registry.get("integrated_gradients").parse_params({"steps": 9999})
    assert "steps" in caught.value.message and "[4, 1024]" in caught.value.message


@pytest.mark.parametrize("name", METHODS)
def test_cost_counts_model_evaluations(name: str, tiny_model: LoadedModel) -> None:
    method = visualization_registry.get(name)
    params = method.resolve(method.parse_params({}, tiny_model.meta), tiny_model.meta)
    cost = method.cost(params, tiny_model.meta)
    assert isinstance(cost, int) and cost >= 1


def test_cost_grows_with_the_work() -> None:
    model = wrap(TinyCnn())
    occlusion = visualization_registry.get("occlusion")
    fine = occlusion.parse_params({"window": 4, "stride": 1}, model.meta)
    coarse = occlusion.parse_params({"window": 4, "stride": 4}, model.meta)
    assert occlusion.cost(fine, model.meta) == 1 + 29 * 29
    assert occlusion.cost(coarse, model.meta) == 1 + 8 * 8
    partial = visualization_registry.get("partial_occlusion")
    assert partial.cost(partial.parse_params({"positions": 10}), model.meta) == 101
    ig = visualization_registry.get("integrated_gradients")
    assert ig.cost(ig.parse_params({"steps": 200}), model.meta) == 202   # + completeness pass


@pytest.mark.parametrize("name", METHODS)
def test_output_shape_range_and_finiteness(name: str, tiny_model: LoadedModel,
                                           tiny_image: torch.Tensor) -> None:
    method = visualization_registry.get(name)
    result = method.run(tiny_model, tiny_image, ["predicted", "blue", 0], {})
    assert result.method == name
    assert result.elapsed_ms > 0
    assert result.probabilities.shape == (3,)
    assert result.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    heatmaps = [panel for panel in result.panels if panel.kind == "heatmap"]
    targets = {panel.target.index for panel in heatmaps}
    assert {int(np.argmax(result.probabilities)), 2, 0} <= targets
    for panel in result.panels:
        if panel.kind == "image":
            assert panel.values.dtype == np.uint8 and panel.values.shape == (32, 32, 3)
            continue
        assert panel.values.dtype == np.float32 and panel.values.shape == (32, 32)
        assert np.isfinite(panel.values).all()
        assert panel.title and panel.target is not None
        assert panel.target.label == tiny_model.meta.class_names[panel.target.index]
        low, high = panel.value_range
        assert low <= float(panel.values.min()) and float(panel.values.max()) <= high
        if panel.signed:
            assert low == -high
        else:
            assert float(panel.values.min()) >= 0.0
    assert json.dumps(result.params)


@pytest.mark.parametrize("name", METHODS)
def test_hooks_are_gone_afterwards(name: str, tiny_model: LoadedModel,
                                   tiny_image: torch.Tensor,
                                   caplog: pytest.LogCaptureFixture) -> None:
    own_hook = tiny_model.module.features[0].register_forward_hook(lambda *args: None)
    before = hook_ids(tiny_model.module)
    with caplog.at_level(logging.ERROR, logger="visualizations.base"):
        visualization_registry.get(name).run(tiny_model, tiny_image, None, {})
    assert hook_ids(tiny_model.module) == before, "a hook was left behind (or ours removed)"
    # The method removed its own hooks; the base class's backstop had nothing to do.
    assert not [r for r in caplog.records if "leaked" in r.getMessage()]
    own_hook.remove()
    assert not hook_ids(tiny_model.module)
    assert all(parameter.grad is None for parameter in tiny_model.module.parameters())


class CountingModule(nn.Module):
    """TinyCnn that counts its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyCnn()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(x)


@pytest.mark.parametrize("name", METHODS)
def test_cancelled_before_start(name: str, tiny_model: LoadedModel,
                                tiny_image: torch.Tensor) -> None:
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled) as caught:
        visualization_registry.get(name).run(tiny_model, tiny_image, None, {},
                                             RunContext(cancel_event=event))
    assert caught.value.code == "E_CANCELLED"
    assert not hook_ids(tiny_model.module)


@pytest.mark.parametrize("name", sorted(BATCHED))
def test_cancelled_midway_stops_promptly(name: str, tiny_image: torch.Tensor) -> None:
    module = CountingModule()
    model = wrap(module)
    event = threading.Event()
    calls_at_cancel: list[int] = []

    def progress(fraction: float) -> None:
        if 0 < fraction < 1 and not event.is_set():
            event.set()
            calls_at_cancel.append(module.calls)

    with pytest.raises(Cancelled):
        visualization_registry.get(name).run(model, tiny_image, None, BATCHED[name],
                                             RunContext(progress=progress, cancel_event=event,
                                                        batch_size=2))
    assert calls_at_cancel, "no progress was reported before the end"
    assert module.calls - calls_at_cancel[0] <= 1, "kept evaluating after the cancel"
    assert not hook_ids(model.module)


@pytest.mark.parametrize("name", METHODS)
def test_progress_is_monotone_and_ends_at_one(name: str, tiny_model: LoadedModel,
                                              tiny_image: torch.Tensor) -> None:
    seen: list[float] = []
    raw = BATCHED.get(name, {})
    visualization_registry.get(name).run(tiny_model, tiny_image, ["predicted", 1], raw,
                                         RunContext(progress=seen.append, batch_size=2))
    assert seen and seen[-1] == 1.0
    assert all(0.0 <= value <= 1.0 for value in seen)
    assert all(a <= b for a, b in zip(seen, seen[1:])), seen
    if name in BATCHED:
        assert len(set(seen)) >= 4, "long methods should report progress as they go"


@pytest.mark.parametrize("name", METHODS)
def test_batch_size_does_not_change_the_result(name: str, tiny_model: LoadedModel,
                                               tiny_image: torch.Tensor) -> None:
    method = visualization_registry.get(name)
    raw = BATCHED.get(name, {})
    one = method.run(tiny_model, tiny_image, None, raw, RunContext(batch_size=1))
    many = method.run(tiny_model, tiny_image, None, raw, RunContext(batch_size=16))
    for a, b in zip(one.panels, many.panels):
        # float32 probabilities carry ~1e-7 absolute rounding that depends on the batch.
        atol = max(1e-6, 1e-4 * float(np.abs(b.values).max()))
        np.testing.assert_allclose(a.values, b.values, rtol=1e-4, atol=atol)


class SlowTinyCnn(TinyCnn):
    """TinyCnn that pauses between its features and its head, releasing the GIL, so two
    threads' forward passes interleave (a hook one installs would see the other's data)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        time.sleep(0.002)
        return self.fc(torch.flatten(self.pool(features), 1))


@pytest.mark.parametrize("name", METHODS)
def test_two_threads_on_one_model(name: str, tiny_image: torch.Tensor) -> None:
    torch.manual_seed(0)
    model = wrap(SlowTinyCnn())
    method = visualization_registry.get(name)
    raw = BATCHED.get(name, {})
    images = [tiny_image, torch.flip(tiny_image, dims=[3])]
    expected = [method.run(model, image, [index], raw) for index, image in enumerate(images)]
    barrier = threading.Barrier(2)
    results: list[object] = [None, None]

    def work(slot: int) -> None:
        barrier.wait()
        try:
            results[slot] = method.run(model, images[slot], [slot], raw)
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            results[slot] = error

    threads = [threading.Thread(target=work, args=(slot,)) for slot in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for slot in (0, 1):
        assert not isinstance(results[slot], Exception), results[slot]
        for got, want in zip(results[slot].panels, expected[slot].panels):
            np.testing.assert_allclose(got.values, want.values, rtol=1e-5, atol=1e-6)
    assert not hook_ids(model.module)


def test_elapsed_time_excludes_waiting_for_the_model(tiny_model: LoadedModel,
                                                    tiny_image: torch.Tensor) -> None:
    holding, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with tiny_model.lock:
            holding.set()
            release.wait(5)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    holding.wait(5)
    threading.Timer(1.0, release.set).start()
    result = visualization_registry.get("cam").run(tiny_model, tiny_image, None, {})
    holder.join()
    assert result.elapsed_ms < 900, "the second spent waiting for the lock was counted"


@pytest.mark.parametrize("name", METHODS)
def test_nan_model_output_is_an_error(name: str, tiny_image: torch.Tensor) -> None:
    with pytest.raises(ModelOutputInvalid) as caught:
        visualization_registry.get(name).run(wrap(NanModel()), tiny_image, None, {})
    assert caught.value.code == "E_MODEL_OUTPUT_INVALID"


@pytest.mark.parametrize("name", ["occlusion", "partial_occlusion"])
def test_nan_on_occluded_copies_is_an_error(name: str, tiny_image: torch.Tensor) -> None:
    model = wrap(NanWhenOccluded())
    with pytest.raises(ModelOutputInvalid):
        visualization_registry.get(name).run(model, tiny_image, None, {"fill": "mean"})


@pytest.mark.parametrize("name", METHODS)
def test_a_transformer_gets_every_method_but_exact_cam(name: str) -> None:
    """Patch tokens are a CAM layer (default: the last attention's input); CAM itself needs a
    global-average-pool + linear head, and this one reads the class token."""
    model = wrap(TinyTransformer())
    assert model.meta.default_cam_layer == "norm"
    method = visualization_registry.get(name)
    assert method.supports(model.meta) is None
    image = torch.rand(1, 3, 32, 32)
    if name == "cam":
        with pytest.raises(MethodUnsupported) as caught:
            method.run(model, image, None, {})
        assert caught.value.code == "E_METHOD_UNSUPPORTED" and "grad_cam" in caught.value.message
    else:
        result = method.run(model, image, None, BATCHED.get(name, {}))
        assert all(panel.values.shape == (32, 32) for panel in result.panels
                   if panel.kind == "heatmap")


def test_cam_refuses_other_heads_and_points_to_grad_cam() -> None:
    model = wrap(TwoLinearHead())
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(MethodUnsupported) as caught:
        visualization_registry.get("cam").run(model, image, None, {})
    assert "grad_cam" in caught.value.message
    visualization_registry.get("grad_cam").run(model, image, None, {})  # works there


def test_layer_choices_come_from_the_model(tiny_model: LoadedModel,
                                           tiny_image: torch.Tensor) -> None:
    grad_cam = visualization_registry.get("grad_cam")
    spec = next(s for s in grad_cam.param_specs(tiny_model.meta) if s.name == "layer")
    assert spec.choices == tiny_model.meta.cam_layers and "features.0" in spec.choices
    result = grad_cam.run(tiny_model, tiny_image, None, {"layer": "features.0"})
    assert "features.0" in result.panels[0].title
    assert result.params["layer"] == "features.0"
    default = grad_cam.run(tiny_model, tiny_image, None, {})
    assert default.params["layer"] == tiny_model.meta.default_cam_layer
    with pytest.raises(BadParameter) as caught:
        grad_cam.run(tiny_model, tiny_image, None, {"layer": "fc"})
    assert "layer" in caught.value.fields


def test_occlusion_window_and_stride_are_checked_against_the_model() -> None:
    model = wrap(TinyCnn())
    occlusion = visualization_registry.get("occlusion")
    image = torch.zeros(1, 3, 32, 32)
    with pytest.raises(BadParameter) as caught:
        occlusion.run(model, image, None, {"window": 33})
    assert "window" in caught.value.fields and "[1, 32]" in caught.value.message
    with pytest.raises(BadParameter) as caught:
        occlusion.run(model, image, None, {"window": 4, "stride": 5})
    assert "stride" in caught.value.fields
    resolved = occlusion.resolve(occlusion.parse_params({}), model.meta)
    assert (resolved.window, resolved.stride) == (4, 2)  # 1/8 of the side, half the window


@pytest.mark.parametrize("fill", ["mean", "black", "gray", "blur"])
def test_every_occlusion_fill_runs(fill: str, tiny_model: LoadedModel,
                                   tiny_image: torch.Tensor) -> None:
    for name in ("occlusion", "partial_occlusion"):
        result = visualization_registry.get(name).run(tiny_model, tiny_image, None,
                                                      {"fill": fill})
        assert np.isfinite(result.panels[0].values).all()


def test_partial_occlusion_shows_top_classes_on_one_scale(tiny_model: LoadedModel,
                                                          tiny_image: torch.Tensor) -> None:
    result = visualization_registry.get("partial_occlusion").run(
        tiny_model, tiny_image, [1], {"top_k": 3, "positions": 4})
    heatmaps = [panel for panel in result.panels if panel.kind == "heatmap"]
    images = [panel for panel in result.panels if panel.kind == "image"]
    assert [panel.target.index for panel in heatmaps][0] == 1  # the target comes first
    assert sorted(panel.target.index for panel in heatmaps) == [0, 1, 2]
    assert all(panel.value_range == (0.0, 1.0) for panel in heatmaps)
    assert all(0.0 <= panel.values.min() and panel.values.max() <= 1.0 for panel in heatmaps)
    assert len(images) == 1
    # A 4x4 grid: 4 distinct cells per row, each a constant value.
    assert len(np.unique(heatmaps[0].values[0, :])) <= 4


@pytest.mark.gpu
@pytest.mark.parametrize("name", METHODS)
def test_cuda_matches_cpu(name: str, tiny_image: torch.Tensor) -> None:
    torch.manual_seed(0)
    module = TinyCnn()
    cpu_model = wrap(module)
    cuda_model = wrap(TinyCnn(), device="cuda")
    cuda_model.module.load_state_dict(module.state_dict())
    method = visualization_registry.get(name)
    raw = BATCHED.get(name, {})
    on_cpu = method.run(cpu_model, tiny_image, None, raw)
    on_cuda = method.run(cuda_model, tiny_image.cuda(), None, raw)
    for a, b in zip(on_cpu.panels, on_cuda.panels):
        if a.kind == "heatmap":
            atol = max(1e-5, 1e-3 * float(np.abs(a.values).max()))
            np.testing.assert_allclose(b.values, a.values, rtol=1e-3, atol=atol)


@pytest.mark.gpu
@pytest.mark.parametrize("name", METHODS)
def test_a_cpu_batch_runs_on_a_cuda_model(name: str, tiny_image: torch.Tensor) -> None:
    model = wrap(TinyCnn(), device="cuda")
    result = visualization_registry.get(name).run(model, tiny_image, None,
                                                  BATCHED.get(name, {}))
    assert all(np.isfinite(panel.values).all() for panel in result.panels)
