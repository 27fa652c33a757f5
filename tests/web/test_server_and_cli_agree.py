"""The server and ``convscope visualize`` share one pipeline: for the same image, checkpoint,
method, parameters and target they produce byte-identical arrays and the same panel records."""
from __future__ import annotations

import json
from pathlib import Path

from app.cli import main
from tests.web.conftest import png_bytes, run_job, upload

METHODS = [{"name": "grad_cam", "params": {"relu": False}},
           {"name": "occlusion", "params": {"window": 8, "stride": 4}},
           {"name": "partial_occlusion", "params": {"positions": 3, "window_fraction": 0.4}}]
TARGETS = ["predicted", "bird"]
# Everything in a panel record but its file paths, which name where the files were written.
SHARED_FIELDS = ("title", "kind", "signed", "target", "value_range", "display", "metrics",
                 "notes", "faithfulness")


def _server_arrays(client, job: dict) -> dict[tuple[str, int, int], tuple[bytes, dict]]:
    arrays = {}
    for visualization in job["results"][0]["visualizations"]:
        assert visualization["status"] == "done", visualization
        for number, panel in enumerate(visualization["panels"]):
            response = client.get(panel["array_url"])
            assert response.status_code == 200
            key = (visualization["name"], panel["target"]["index"] if panel["target"] else -1,
                   number)
            arrays[key] = (response.data, panel)
    return arrays


def _cli_arrays(out_dir: Path) -> dict[tuple[str, int, int], tuple[bytes, dict]]:
    results = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    arrays = {}
    for visualization in results["images"][0]["visualizations"]:
        for number, panel in enumerate(visualization["panels"]):
            key = (visualization["method"], panel["target"]["index"] if panel["target"] else -1,
                   number)
            arrays[key] = ((out_dir / panel["array"]).read_bytes(), panel)
    return arrays


def _by_method_and_target(arrays: dict) -> dict:
    """Panel numbers restart per target on the server and run on per method in the CLI; key
    both by (method, target index, position among that target's panels)."""
    grouped: dict = {}
    for (method, target, _), value in sorted(arrays.items(), key=lambda item: item[0][2]):
        grouped.setdefault((method, target), []).append(value)
    return grouped


def test_server_and_cli_give_byte_identical_arrays(client, checkpoint_dir: Path,
                                                   tmp_path: Path, capsys) -> None:
    data = png_bytes(size=(48, 40), seed=21)
    image_path = tmp_path / "photo.png"
    image_path.write_bytes(data)
    image_id = upload(client, (data, "photo.png"))[0]["id"]
    job = run_job(client, [image_id], METHODS, targets=TARGETS)
    assert job["status"] == "done", job
    server = _by_method_and_target(_server_arrays(client, job))

    out_dir = tmp_path / "report"
    arguments = ["visualize", str(checkpoint_dir), str(image_path), "--out", str(out_dir)]
    for method in METHODS:
        arguments += ["--method", method["name"]]
        arguments += [f"--param={method['name']}.{key}={str(value).lower()}"
                      for key, value in method["params"].items()]
    for target in TARGETS:
        arguments += ["--target", target]
    assert main(arguments) == 0, capsys.readouterr().err
    cli = _by_method_and_target(_cli_arrays(out_dir))

    assert set(server) == set(cli) and len(server) >= 5
    for key, server_panels in server.items():
        assert len(server_panels) == len(cli[key]), key
        for (server_bytes, server_panel), (cli_bytes, cli_panel) in zip(server_panels, cli[key]):
            assert server_bytes == cli_bytes, f"{key}: arrays differ"
            assert {field: server_panel[field] for field in SHARED_FIELDS} == \
                   {field: cli_panel[field] for field in SHARED_FIELDS}, key
