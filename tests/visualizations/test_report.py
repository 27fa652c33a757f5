"""``convscope visualize``: the files it writes, the exact shape of results.json, and errors."""
from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.cli import main
from app.report import read_image
from tests.visualizations.models import TinyCnn

REPO = Path(__file__).resolve().parents[2]
CLASS_NAMES = ("red", "green", "blue")

MODEL_KEYS = {"file", "architecture", "num_classes", "sha256"}
IMAGE_KEYS = {"file", "predictions", "uncertainty", "visualizations"}
PREDICTION_KEYS = {"index", "label", "probability"}
VISUALIZATION_KEYS = {"method", "params", "elapsed_ms", "panels"}
# The one panel record of app.pipeline, the same as the server's (issue 3's fields plus kind,
# value_range, metrics and notes; issue 9's faithfulness).
PANEL_KEYS = {"title", "kind", "signed", "target", "value_range", "display", "metrics", "notes",
              "faithfulness", "overlay", "heatmap", "array"}
FAITHFULNESS_KEYS = {"deletion_auc", "insertion_auc", "random_deletion_auc",
                     "random_insertion_auc"}


def write_checkpoint_dir(directory: Path, files: dict[str, int]) -> Path:
    """convscope.toml naming TinyCnn as the factory, labels.txt, and one state_dict per file
    (``{name: seed}``)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "convscope.toml").write_text(
        '[model]\nfactory = "tests.visualizations.models:TinyCnn"\nkwargs = { classes = 3 }\n'
        '[preprocess]\ninput_size = [32, 32]\nresize = 0\nmean = [0.5]\nstd = [0.5]\n',
        encoding="utf-8")
    (directory / "labels.txt").write_text("\n".join(CLASS_NAMES) + "\n", encoding="utf-8")
    for name, seed in files.items():
        torch.manual_seed(seed)
        torch.save(TinyCnn(classes=3).state_dict(), directory / name)
    return directory


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    array = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3),
                                                 dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    return write_checkpoint_dir(tmp_path / "runs", {"tiny.pt": 0})


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    return [write_image(tmp_path / "first photo.png", 1),
            write_image(tmp_path / "second.jpg", 2, size=(40, 64))]


def run_cli(arguments: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(["visualize", *arguments])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_writes_report_files_and_exact_results_json(tmp_path: Path, checkpoint_dir: Path,
                                                    images: list[Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "report"
    status, stdout, _ = run_cli(
        [str(checkpoint_dir), *map(str, images), "--method", "grad_cam", "--method",
         "partial_occlusion", "--method", "occlusion", "--param", "partial_occlusion.positions=4",
         "--param", "occlusion.window=8", "--target", "predicted", "--target", "blue",
         "--out", str(out_dir), "--json"], capsys)
    assert status == 0
    results = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    assert json.loads(stdout) == results, "--json prints the same object"

    assert set(results) == {"model", "images"}
    assert set(results["model"]) == MODEL_KEYS
    checkpoint_bytes = (checkpoint_dir / "tiny.pt").read_bytes()
    assert results["model"] == {"file": "tiny.pt", "architecture": results["model"]["architecture"],
                                "num_classes": 3,
                                "sha256": hashlib.sha256(checkpoint_bytes).hexdigest()}
    assert [image["file"] for image in results["images"]] == [str(path) for path in images]
    for image in results["images"]:
        assert set(image) == IMAGE_KEYS
        assert len(image["predictions"]) == 3  # top 5 of 3 classes
        for prediction in image["predictions"]:
            assert set(prediction) == PREDICTION_KEYS
            assert prediction["label"] == CLASS_NAMES[prediction["index"]]
        probabilities = [p["probability"] for p in image["predictions"]]
        assert probabilities == sorted(probabilities, reverse=True)
        assert [v["method"] for v in image["visualizations"]] == ["grad_cam", "partial_occlusion",
                                                                  "occlusion"]
        for visualization in image["visualizations"]:
            assert set(visualization) == VISUALIZATION_KEYS
            assert visualization["elapsed_ms"] > 0
            # A method's own extra fields (Panel.extra): the occlusion methods name the path
            # that ran (incremental or dense).
            extra = ({"engine"} if visualization["method"] in ("occlusion", "partial_occlusion")
                     else set())
            for panel in visualization["panels"]:
                assert PANEL_KEYS <= set(panel) <= PANEL_KEYS | extra
                assert isinstance(panel["signed"], bool)
                if panel["target"] is not None:
                    assert set(panel["target"]) == PREDICTION_KEYS
                # Scored: every heatmap with a target (faithfulness is on by default).
                if panel["kind"] == "heatmap" and panel["target"] is not None:
                    assert set(panel["faithfulness"]) == FAITHFULNESS_KEYS
                    assert all(0.0 <= value <= 1.0 for value in panel["faithfulness"].values())
                else:
                    assert panel["faithfulness"] is None
                for key in ("overlay", "heatmap", "array"):
                    assert not Path(panel[key]).is_absolute() and ".." not in panel[key]
                    assert (out_dir / panel[key]).is_file()
                assert Image.open(out_dir / panel["overlay"]).format == "PNG"
                array = np.load(out_dir / panel["array"], allow_pickle=False)
                assert array.shape[:2] == (32, 32)
        by_method = {v["method"]: v for v in image["visualizations"]}
        grad_cam_targets = [p["target"]["label"] for p in by_method["grad_cam"]["panels"]]
        predicted = image["predictions"][0]["label"]
        assert grad_cam_targets == list(dict.fromkeys([predicted, "blue"]))
        assert by_method["occlusion"]["params"] == {"window": 8, "stride": 4, "fill": "mean",
                                                    "engine": None}   # None: automatic
        assert by_method["partial_occlusion"]["params"]["positions"] == 4
        assert any(p["target"] is None for p in by_method["partial_occlusion"]["panels"])

    html = (out_dir / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") > 10
    assert "first photo.png" in html and "second.jpg" in html
    assert "Grad-CAM" in html and "Partial occlusion" in html and "Occlusion" in html
    assert "positions=4" in html and "linear-gradient" in html
    # Self-contained: every image inline (a data URI held once, shown by reference wherever
    # the page shows it), no stylesheet or script loaded from elsewhere.
    inline = re.findall(r'<image id="(pic-\d+)" href="([^"]*)"', html)
    assert inline and all(uri.startswith("data:image/png;base64,") for _, uri in inline)
    assert set(re.findall(r'<use href="#([^"]*)"', html)) == {name for name, _ in inline}
    assert re.findall(r'\bsrc="([^"]*)"', html) == []
    assert "<script" not in html and "<link" not in html and "@import" not in html


def test_report_escapes_file_names_and_labels(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    directory = write_checkpoint_dir(tmp_path / "runs", {"tiny.pt": 0})
    hostile_label = '<img src=x onerror="alert(1)">'
    (directory / "labels.txt").write_text(
        "\n".join(f"{hostile_label}{i}" for i in range(3)) + "\n", encoding="utf-8")
    image = write_image(tmp_path / "<b onmouseover=alert(2)>.png", 1)
    out_dir = tmp_path / "out"
    status, _, stderr = run_cli([str(directory), str(image), "--method", "grad_cam",
                                 "--out", str(out_dir)], capsys)
    assert status == 0, stderr
    html = (out_dir / "report.html").read_text(encoding="utf-8")
    assert "<b onmouseover" not in html and "<img src=x" not in html
    assert "&lt;b onmouseover=alert(2)&gt;.png" in html
    assert "&lt;img src=x onerror=" in html


def test_checkpoint_option_picks_a_file(tmp_path: Path, images: list[Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    directory = write_checkpoint_dir(tmp_path / "two", {"a.pt": 1, "b.pt": 2})
    os.utime(directory / "a.pt", (1_000_000, 1_000_000))  # b.pt is the latest
    for choice, expected in ((None, "b.pt"), ("a.pt", "a.pt")):
        out_dir = tmp_path / f"out-{expected}"
        arguments = [str(directory), str(images[0]), "--method", "saliency",
                     "--out", str(out_dir)]
        if choice:
            arguments += ["--checkpoint", choice]
        status, stdout, _ = run_cli(arguments, capsys)
        assert status == 0 and "report.html" in stdout
        results = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
        assert results["model"]["file"] == expected
    status, _, stderr = run_cli([str(directory), str(images[0]), "--method", "saliency",
                                 "--checkpoint", "missing.pt", "--out", str(tmp_path / "x")],
                                capsys)
    assert status != 0 and "E_NOT_FOUND" in stderr


@pytest.mark.parametrize(("arguments", "code", "must_mention"), [
    (["--method", "integrated_gradients", "--param", "integrated_gradients.steps=9999"],
     "E_BAD_PARAMETER", ["steps", "[4, 1024]"]),
    (["--method", "occlusion", "--param", "occlusion.fill=purple"],
     "E_BAD_PARAMETER", ["fill", "mean, black, gray, blur"]),
    (["--method", "occlusion", "--param", "occlusion.window=99"],
     "E_BAD_PARAMETER", ["window", "[1, 32]"]),
    (["--method", "grad_cam", "--param", "grad_cam.layer=nope"], "E_BAD_PARAMETER", ["layer"]),
    (["--method", "saliency", "--param", "saliency"], "E_BAD_PARAMETER", ["NAME.KEY=VALUE"]),
    (["--method", "saliency", "--param", "occlusion.window=4"], "E_BAD_PARAMETER",
     ["occlusion"]),
    (["--method", "saliency", "--param", "saliency.bogus=1"], "E_BAD_PARAMETER", ["bogus"]),
    (["--method", "sparkles"], "E_UNKNOWN_VISUALIZATION", ["sparkles", "grad_cam"]),
    (["--method", "saliency", "--target", "purple"], "E_UNKNOWN_CLASS", ["purple"]),
    (["--method", "saliency", "--target", "7"], "E_UNKNOWN_CLASS", ["0..2"]),
])
def test_bad_input_exits_nonzero_with_a_code(tmp_path: Path, checkpoint_dir: Path,
                                             images: list[Path], arguments: list[str], code: str,
                                             must_mention: list[str],
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "out"
    status, _, stderr = run_cli([str(checkpoint_dir), str(images[0]), *arguments,
                                 "--out", str(out_dir)], capsys)
    assert status == 2
    assert code in stderr
    for text in must_mention:
        assert text in stderr, stderr
    assert "Traceback" not in stderr and str(tmp_path) not in stderr
    assert not (out_dir / "report.html").exists()


def test_unusable_out_folder_is_a_usage_error(tmp_path: Path, checkpoint_dir: Path,
                                              images: list[Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    occupied = tmp_path / "a-file"
    occupied.write_text("not a folder", encoding="utf-8")
    for out_dir in (occupied, occupied / "below"):
        status, stdout, stderr = run_cli([str(checkpoint_dir), str(images[0]), "--method",
                                          "saliency", "--out", str(out_dir), "--json"], capsys)
        assert status == 2 and "E_BAD_PARAMETER" in stderr and "--out" in stderr, stderr
        assert json.loads(stdout)["error"]["fields"] == {"out": "a writable folder"}
        assert "Traceback" not in stderr and str(tmp_path) not in stderr


def test_a_failed_write_is_a_clean_error(tmp_path: Path, checkpoint_dir: Path,
                                         images: list[Path], monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    status, _, stderr = run_cli([str(checkpoint_dir), str(images[0]), "--method", "saliency",
                                 "--out", str(tmp_path / "out")], capsys)
    assert status == 1 and "E_STORAGE_FULL" in stderr and "Traceback" not in stderr


def test_bad_images_and_json_errors(tmp_path: Path, checkpoint_dir: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("hello", encoding="utf-8")
    status, stdout, stderr = run_cli([str(checkpoint_dir), str(not_an_image), "--method",
                                      "saliency", "--out", str(tmp_path / "o"), "--json"], capsys)
    assert status == 2 and "E_IMAGE_UNSUPPORTED" in stderr and "notes.png" in stderr
    assert json.loads(stdout)["error"]["code"] == "E_IMAGE_UNSUPPORTED"
    status, _, stderr = run_cli([str(checkpoint_dir), str(tmp_path / "missing.jpg"),
                                 "--method", "saliency", "--out", str(tmp_path / "o")], capsys)
    assert status == 2 and "E_NOT_FOUND" in stderr


def test_images_are_read_upright_in_rgb(tmp_path: Path) -> None:
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.new("L", (40, 20), 128).save(path, exif=exif.tobytes())
    image = read_image(path)
    assert image.mode == "RGB" and image.size == (20, 40)


@pytest.mark.slow
def test_console_script_with_the_demo(tmp_path: Path) -> None:
    """No DIR: the bundled demo model, run as a real subprocess of the console script."""
    out_dir = tmp_path / "demo-report"
    environment = {**os.environ, "CONVSCOPE_TORCH_THREADS": "1", "CONVSCOPE_DEVICE": "cpu",
                   "PYTHONPATH": str(REPO)}
    script = Path(sys.executable).with_name("convscope")
    completed = subprocess.run(
        [str(script), "visualize", str(REPO / "demo" / "images" / "chelsea.jpg"), "--method",
         "cam", "--out", str(out_dir), "--json"], capture_output=True, text=True,
        env=environment, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout)
    assert results["model"]["architecture"] and results["model"]["num_classes"] == 1000
    top = results["images"][0]["predictions"][0]
    assert 281 <= top["index"] <= 285, top  # a domestic cat
    panel = results["images"][0]["visualizations"][0]["panels"][0]
    overlay = Image.open(io.BytesIO((out_dir / panel["overlay"]).read_bytes()))
    assert overlay.size == (224, 224)
    assert (out_dir / "report.html").stat().st_size > 10_000
