"""``convscope sanity``: the exact --json object, the table, exit codes and CODE: message for
what a user got wrong, the CONVSCOPE_MAX_COST bound, and agreement with the server's check."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from app.cli import main
from tests.web.conftest import write_checkpoint_dir

DEMO_IMAGES = Path(__file__).resolve().parents[2] / "demo" / "images"
PHOTOS = [str(DEMO_IMAGES / "chelsea.jpg"), str(DEMO_IMAGES / "coffee.jpg")]


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return write_checkpoint_dir(tmp_path / "checkpoints")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["sanity", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_json_is_exactly_the_contract_object(capsys, tiny_dir) -> None:
    status, out, _ = run(capsys, str(tiny_dir), *PHOTOS, "--method", "grad_cam",
                         "--param", "relu=false", "--json", "--device", "cpu")
    assert status == 0
    document = json.loads(out)          # one object, nothing else on stdout
    assert list(document) == ["method", "checkpoint", "params", "images", "steps", "passed",
                              "threshold"]
    assert document["method"] == "grad_cam" and document["checkpoint"] == "tiny.pt"
    assert document["params"]["relu"] is False and document["images"] == 2
    assert [step["randomized"] for step in document["steps"]] == ["fc", "features.2",
                                                                  "features.0"]
    for step in document["steps"]:
        assert list(step) == ["randomized", "spearman", "ssim"]
        assert -1.0 <= step["spearman"] <= 1.0 and -1.0 <= step["ssim"] <= 1.0
    assert document["threshold"] == 0.5
    assert document["passed"] == (document["steps"][-1]["spearman"] < 0.5)


def test_method_prefixed_params_and_the_table(capsys, tiny_dir) -> None:
    status, out, _ = run(capsys, str(tiny_dir), PHOTOS[0], "--method", "saliency",
                         "--param", "saliency.smoothgrad_samples=0", "--device", "cpu")
    assert status == 0
    lines = out.splitlines()
    assert lines[0].startswith("Sanity check of saliency (") and "smoothgrad_samples=0" in lines[0]
    assert "1 image:" in lines[0]
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert [row[1] for row in rows] == ["fc", "features.2", "features.0"]
    assert lines[-1].startswith(("PASSED", "FAILED"))


@pytest.mark.parametrize("argv, code", [
    (["--method", "no_such_method"], "E_UNKNOWN_VISUALIZATION"),
    (["--method", "grad_cam", "--param", "relu=maybe"], "E_BAD_PARAMETER"),
    (["--method", "grad_cam", "--param", "nonsense"], "E_BAD_PARAMETER"),
    (["--method", "grad_cam", "--param", "occlusion.window=4"], "E_BAD_PARAMETER"),
    (["--method", "grad_cam", "--checkpoint", "missing.pt"], "E_NOT_FOUND"),
])
def test_usage_errors_exit_2_with_code_and_message(capsys, tiny_dir, argv, code) -> None:
    status, out, err = run(capsys, str(tiny_dir), PHOTOS[0], *argv, "--json",
                           "--device", "cpu")
    assert status == 2 and json.loads(out)["error"]["code"] == code
    assert err.startswith(f"convscope sanity: {code}: ")
    assert "Traceback" not in err


def test_a_missing_or_broken_image_exits_2(capsys, tiny_dir, tmp_path) -> None:
    status, _, err = run(capsys, str(tiny_dir), str(tmp_path / "nope.jpg"), "--method", "cam")
    assert status == 2 and "E_NOT_FOUND" in err
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a picture")
    status, _, err = run(capsys, str(tiny_dir), str(broken), "--method", "cam")
    assert status == 2 and err.startswith("convscope sanity: E_IMAGE_")


def test_max_cost_bounds_the_whole_check(capsys, tiny_dir, monkeypatch) -> None:
    # Occlusion, window 8, stride 8 on 32 px: 16 windows + 1 = 17 evaluations per map, + 1
    # prediction = 18; TinyNet has 3 steps: 2 probes + 1 image x (1 + 4 maps x 18) = 75.
    argv = [str(tiny_dir), PHOTOS[0], "--method", "occlusion", "--param", "window=8",
            "--param", "stride=8", "--json", "--device", "cpu"]
    monkeypatch.setenv("CONVSCOPE_MAX_COST", "74")
    status, out, err = run(capsys, *argv)
    assert status == 2 and json.loads(out)["error"]["code"] == "E_TOO_EXPENSIVE"
    assert err.startswith("convscope sanity: E_TOO_EXPENSIVE: ") and "75" in err
    monkeypatch.setenv("CONVSCOPE_MAX_COST", "75")
    status, out, _ = run(capsys, *argv)
    assert status == 0 and json.loads(out)["method"] == "occlusion"
    monkeypatch.setenv("CONVSCOPE_MAX_COST", "lots")
    status, _, err = run(capsys, *argv)
    assert status == 2 and "CONVSCOPE_MAX_COST" in err


def test_cli_and_server_agree(capsys, tiny_dir, make_app) -> None:
    """The same checkpoint, method, parameters and photos give the same numbers."""
    status, out, _ = run(capsys, str(tiny_dir), *PHOTOS, "--method", "cam", "--json",
                         "--device", "cpu")
    assert status == 0
    client = make_app(directory=tiny_dir).test_client()
    created = client.post("/api/v1/sanity", json={"method": "cam"}).json
    deadline = time.monotonic() + 60
    while (check := client.get(created["api_url"]).json)["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert check["status"] == "done"
    assert {name: check[name] for name in json.loads(out)} == json.loads(out)
