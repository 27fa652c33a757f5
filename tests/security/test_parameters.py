"""Parameters, table-driven from the visualization registry: every declared parameter of every
method refused when out of range, wrongly typed, non-finite or unknown; unknown method, model,
layer and class; missing fields; and the cost cap (E_TOO_EXPENSIVE saying how to be cheaper).

Each case checks the status, the stable code, a one-sentence message naming the parameter, no
leaks, and that nothing was queued."""
from __future__ import annotations

import io
from typing import Any

import pytest

from tests.security.conftest import assert_html_error, assert_json_error
from tests.web.conftest import csrf_from, png_bytes, upload
from visualizations import visualization_registry


MISSING = object()      # a job field left out of the request


def _bad_values(spec: dict[str, Any]) -> list[tuple[str, Any]]:
    """(what is wrong, value) for one declared parameter."""
    kind = spec["kind"]
    cases: list[tuple[str, Any]] = [("a list", [1]), ("an object", {"x": 1})]
    if kind in ("int", "float"):
        cases += [("text", "abc"), ("a boolean", True), ("NaN", "nan"), ("infinity", "inf"),
                  ("-infinity", "-Infinity"), ("huge", "9" * 400)]
        if kind == "int":
            cases += [("a fraction", 2.5), ("exponent text", "1e3")]
        step = 1 if kind == "int" else 0.001
        if spec["min"] is not None:
            cases.append(("below the minimum", spec["min"] - step))
            cases.append(("far below", -10 ** 9))
        if spec["max"] is not None:
            cases.append(("above the maximum", spec["max"] + step))
            cases.append(("far above", 10 ** 9))
    elif kind == "bool":
        cases += [("text", "maybe"), ("a number", 2)]
    elif kind == "choice":
        cases += [("not a choice", "nope"), ("a number", 5), ("script", "<script>")]
    return cases


def _cases() -> list[Any]:
    cases = []
    for visualization in visualization_registry:
        for spec in visualization.describe(None)["params"]:
            for label, value in _bad_values(spec):
                cases.append(pytest.param(visualization.name, spec["name"], value,
                                          id=f"{visualization.name}.{spec['name']}-{label}"))
    return cases


def _job(image: str, name: str, params: dict[str, Any]) -> dict[str, Any]:
    return {"model": "latest", "images": [image],
            "visualizations": [{"name": name, "params": params}]}


def _job_records(client) -> int:
    return len(list(client.application.extensions["convscope"].jobs.root.glob("*.json")))


def _post_refused(client, body: Any):
    """POST a job that must be refused: nothing may be recorded or queued."""
    before = _job_records(client)
    response = client.post("/api/v1/jobs", json=body)
    assert _job_records(client) == before, "a refused job was recorded"
    return response


@pytest.fixture(scope="module")
def module_app(tmp_path_factory):
    """One app for the large table (building one per case would dominate the runtime)."""
    import torch

    from app import create_app
    from app.catalog import ModelCatalog
    from tests.web.conftest import wait_ready, write_checkpoint_dir

    root = tmp_path_factory.mktemp("parameters")
    directory = write_checkpoint_dir(root / "checkpoints")
    app = create_app({"data_dir": root / "data", "checkpoint_dir": directory, "device": "cpu",
                      "testing": True, "max_cost": 50,
                      "catalog": ModelCatalog(directory, torch.device("cpu"), settle_seconds=0,
                                              rescan_seconds=float("inf"))})
    wait_ready(app.test_client())
    yield app
    app.extensions["convscope"].shutdown(timeout=10)


@pytest.fixture(scope="module")
def module_image(module_app) -> str:
    return upload(module_app.test_client(), (png_bytes(seed=21), "p.png"))[0]["id"]


@pytest.mark.parametrize("method, name, value", _cases())
def test_every_bad_parameter_value_is_refused(module_app, module_image, method, name, value):
    client = module_app.test_client()
    response = _post_refused(client, _job(module_image, method, {name: value}))
    error = assert_json_error(response, 400, "E_BAD_PARAMETER")
    assert name in error["fields"] and name in error["message"]
    assert error["message"].count(". ") == 0 and error["message"].endswith(".")   # one sentence


@pytest.mark.parametrize("method", visualization_registry.names())
def test_unknown_parameters_are_refused_naming_the_known_ones(module_app, module_image, method):
    client = module_app.test_client()
    response = _post_refused(client, _job(module_image, method, {"colour": "red"}))
    error = assert_json_error(response, 400, "E_BAD_PARAMETER")
    assert "colour" in error["message"] and error["fields"] == {"colour": "unknown parameter"}


@pytest.mark.parametrize("method", visualization_registry.names())
def test_missing_parameters_take_their_defaults(module_app, module_image, method):
    client = module_app.test_client()
    response = client.post("/api/v1/jobs", json=_job(module_image, method, {}))
    assert response.status_code in (202, 422), response.json       # 422: too costly at defaults
    if response.status_code == 422:
        assert response.json["error"]["code"] == "E_TOO_EXPENSIVE"
    else:
        client.delete(f"/api/v1/jobs/{response.json['id']}")


@pytest.mark.parametrize("change, status, code, named", [
    ({"visualizations": [{"name": "no_such_method"}]}, 400, "E_UNKNOWN_VISUALIZATION", None),
    ({"visualizations": [{"name": "<script>"}]}, 400, "E_UNKNOWN_VISUALIZATION", None),
    ({"visualizations": [{"params": {}}]}, 400, "E_BAD_REQUEST", "visualizations"),
    ({"visualizations": [{"name": 5}]}, 400, "E_BAD_REQUEST", "visualizations"),
    ({"visualizations": ["grad_cam"]}, 400, "E_BAD_REQUEST", "visualizations"),
    ({"visualizations": [{"name": "grad_cam", "params": [1]}]}, 400, "E_BAD_PARAMETER",
     "params"),
    ({"model": "no-such-model"}, 404, "E_UNKNOWN_MODEL", "model"),
    ({"model": 7}, 400, "E_BAD_REQUEST", "model"),
    ({"visualizations": [{"name": "grad_cam", "params": {"layer": "features.99"}}]}, 400,
     "E_BAD_PARAMETER", "layer"),
    ({"visualizations": [{"name": "cam", "params": {"layer": "../fc"}}]}, 400,
     "E_BAD_PARAMETER", "layer"),
    ({"targets": ["unicorn"]}, 400, "E_UNKNOWN_CLASS", None),
    ({"targets": [4]}, 400, "E_UNKNOWN_CLASS", None),
    ({"targets": [-1]}, 400, "E_UNKNOWN_CLASS", None),
    ({"targets": [1.5]}, 400, "E_BAD_PARAMETER", "targets"),
    ({"targets": [None]}, 400, "E_BAD_PARAMETER", "targets"),
    ({"targets": "cat"}, 400, "E_BAD_REQUEST", "targets"),
    ({"targets": ["cat"] * 50}, 400, "E_BAD_REQUEST", "targets"),
    ({"images": MISSING}, 400, "E_BAD_REQUEST", "images"),
    ({"images": []}, 400, "E_BAD_REQUEST", "images"),
    ({"images": [5]}, 400, "E_BAD_REQUEST", "images"),
    ({"visualizations": MISSING}, 400, "E_BAD_REQUEST", "visualizations"),
    ({"visualizations": []}, 400, "E_BAD_REQUEST", "visualizations"),
    ({"true_labels": ["cat"]}, 400, "E_BAD_REQUEST", "true_labels"),
    ({"priority": "high"}, 400, "E_BAD_REQUEST", "priority"),
])
def test_bad_job_fields(module_app, module_image, change, status, code, named):
    client = module_app.test_client()
    body = {**_job(module_image, "grad_cam", {}), **change}
    body = {key: value for key, value in body.items() if value is not MISSING}
    response = _post_refused(client, body)
    error = assert_json_error(response, status, code)
    if named:
        assert named in error.get("fields", {}) or named in error["message"], error


@pytest.mark.parametrize("params, method, advice", [
    ({"window": 1, "stride": 1}, "occlusion", ("larger window or stride",)),
    ({"steps": 256}, "integrated_gradients", ("fewer steps",)),
    ({"positions": 30}, "partial_occlusion", ("cheaper",)),
    ({"smoothgrad_samples": 64}, "saliency", ("samples",)),
])
def test_too_expensive_requests_say_how_to_be_cheaper(module_app, module_image, params, method,
                                                      advice):
    client = module_app.test_client()
    response = _post_refused(client, _job(module_image, method, params))
    error = assert_json_error(response, 422, "E_TOO_EXPENSIVE")
    assert "limit of 50" in error["message"] and "cheaper" in error["message"]
    for words in advice:
        assert words in error["message"], error["message"]


def test_cost_cap_allows_cheap_requests_and_is_configurable(make_app):
    client = make_app(max_cost=10_000).test_client()
    image = upload(client, (png_bytes(seed=22), "p.png"))[0]["id"]
    response = client.post("/api/v1/jobs", json=_job(image, "occlusion",
                                                     {"window": 1, "stride": 1}))
    assert response.status_code == 202, response.json


def test_bad_parameters_in_the_workbench_form_come_back_as_a_page(module_app):
    client = module_app.test_client()
    token = csrf_from(client.get("/").data)
    before = _job_records(client)
    for field, value, code, status in [
            ("param.occlusion.window", "-5", "E_BAD_PARAMETER", 400),
            ("param.occlusion.window", "abc", "E_BAD_PARAMETER", 400),
            ("param.occlusion.stride", "1", "E_TOO_EXPENSIVE", 422)]:
        data = {"csrf_token": token, "method": "occlusion", field: value,
                "param.occlusion.window": value if field.endswith("window") else "1",
                "image": (io.BytesIO(png_bytes(seed=23)), "p.png")}
        response = client.post("/", data=data, content_type="multipart/form-data")
        assert_html_error(response, status, code)
        assert b'name="method" value="occlusion" checked' in response.data   # form kept
    assert _job_records(client) == before
