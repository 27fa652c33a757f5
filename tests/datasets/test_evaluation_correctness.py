"""``convscope evaluate`` on a generated dataset with known mistakes agrees with an independent
computation: plain torchvision (``ImageFolder``, ``ToTensor``, ``Normalize``, a ``DataLoader``)
and numpy, with no convscope code -- accuracy, top-5, per-class numbers, the confusion matrix,
each image's prediction, the failure order, the least certain correct images, and calibration
(ECE and its 15 bins)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms

from app.cli import main
from tests.datasets.models import CLASS_NAMES


def independent(model: torch.nn.Module, root: Path) -> dict:
    """Everything evaluation.json states, computed the plain torchvision way."""
    dataset = torchvision.datasets.ImageFolder(str(root), transform=transforms.Compose([
        transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=7, shuffle=False)
    with torch.no_grad():
        probabilities = torch.cat([torch.softmax(model(batch), dim=1) for batch, _ in loader])
    p = probabilities.numpy().astype(np.float64)
    to_model = {folder: CLASS_NAMES.index(folder) for folder in dataset.classes}
    targets = np.array([to_model[dataset.classes[folder]] for _, folder in dataset.samples])
    files = [os.path.relpath(path, root).replace(os.sep, "/") for path, _ in dataset.samples]
    predicted = p.argmax(axis=1)
    confidence = p.max(axis=1)
    correct = predicted == targets
    classes = sorted(to_model.values())

    per_class = {}
    for c in classes:
        support = int((targets == c).sum())
        hits = int(((targets == c) & (predicted == c)).sum())
        called = int((predicted == c).sum())
        per_class[c] = (support, hits, hits / called if called else None,
                        hits / support if support else None)
    matrix = [[int(((targets == t) & (predicted == q)).sum()) for q in classes]
              + [int(((targets == t) & ~np.isin(predicted, classes)).sum())] for t in classes]
    if not any(row[-1] for row in matrix):
        matrix = [row[:-1] for row in matrix]

    wrong = [i for i in range(len(files)) if not correct[i]]
    failures = [files[i] for i in sorted(wrong, key=lambda i: (-confidence[i], i))]
    second = np.sort(p, axis=1)[:, -2]
    right = [i for i in range(len(files)) if correct[i]]
    least = [files[i] for i in sorted(right, key=lambda i: (confidence[i] - second[i], i))]

    bins, ece = [], 0.0
    for b in range(15):
        lower, upper = b / 15, (b + 1) / 15
        inside = [i for i in range(len(files))
                  if lower <= confidence[i] < upper or (b == 14 and confidence[i] == 1.0)]
        if inside:
            accuracy = float(np.mean([correct[i] for i in inside]))
            mean_confidence = float(np.mean([confidence[i] for i in inside]))
            ece += len(inside) / len(files) * abs(accuracy - mean_confidence)
            bins.append((len(inside), accuracy, mean_confidence))
        else:
            bins.append((0, None, None))
    top5 = np.argsort(-p, axis=1)[:, :5]
    return {"files": files, "targets": targets, "p": p, "predicted": predicted,
            "accuracy": float(correct.mean()),
            "top5": float(np.mean([targets[i] in top5[i] for i in range(len(files))])),
            "classes": classes, "per_class": per_class, "matrix": matrix, "failures": failures,
            "least": least, "bins": bins, "ece": ece}


def assert_same_order(found: list[str], expected: list[str], key: dict[str, float],
                      tolerance: float = 1e-5) -> None:
    """``found`` holds ``expected``'s files in ascending ``key`` order; files whose keys differ
    by less than ``tolerance`` may be in either order (convscope and torchvision batch
    differently, so probabilities agree to ~1e-6, not bit for bit)."""
    assert sorted(found) == sorted(expected)
    for before, after in zip(found, found[1:]):
        assert key[before] <= key[after] + tolerance, (before, after)
    for position, (mine, theirs) in enumerate(zip(found, expected)):
        if mine != theirs:
            assert abs(key[mine] - key[theirs]) < tolerance, (position, mine, theirs)


@pytest.fixture(scope="module")
def colours(_session_files: Path) -> Path:
    return _session_files / "datasets" / "colours"       # read only here


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("report")


@pytest.fixture(scope="module")
def evaluation(_session_files: Path, colours: Path, out_dir: Path) -> dict:
    checkpoints = _session_files / "checkpoints"
    assert main(["evaluate", str(checkpoints), str(colours), "--out", str(out_dir)]) == 0
    return json.loads((out_dir / "evaluation.json").read_text(encoding="utf-8"))


def test_the_numbers_agree_with_plain_torchvision(evaluation: dict, trained_net,
                                                  colours: Path) -> None:
    expected = independent(trained_net, colours)
    assert evaluation["dataset"]["images"] == len(expected["files"]) == 60
    assert evaluation["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-12)
    assert evaluation["top5_accuracy"] == pytest.approx(expected["top5"], abs=1e-12)
    assert evaluation["dataset"]["classes"] == list(CLASS_NAMES[:4])

    rows = {row["index"]: row for row in evaluation["classes"]}
    assert sorted(rows) == expected["classes"]
    for index, (support, hits, precision, recall) in expected["per_class"].items():
        row = rows[index]
        assert (row["label"], row["support"], row["correct"]) == (CLASS_NAMES[index], support,
                                                                  hits)
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)

    assert evaluation["confusion"]["labels"] == expected["classes"]
    assert evaluation["confusion"]["matrix"] == expected["matrix"]
    assert evaluation["confusion"]["other_column"] is True       # the purple images


def test_every_image_and_the_failure_order_agree(evaluation: dict, trained_net,
                                                 colours: Path) -> None:
    expected = independent(trained_net, colours)
    images = evaluation["images"]
    assert [image["file"] for image in images] == expected["files"]
    for number, image in enumerate(images):
        assert image["true"]["index"] == expected["targets"][number]
        assert image["true"]["label"] == CLASS_NAMES[expected["targets"][number]]
        assert image["predicted"]["index"] == expected["predicted"][number]
        assert image["predicted"]["probability"] == pytest.approx(
            expected["p"][number].max(), abs=1e-5)
        assert image["true_probability"] == pytest.approx(
            expected["p"][number][expected["targets"][number]], abs=1e-5)
        assert image["correct"] == (expected["predicted"][number] == expected["targets"][number])
    # The same images in the same order; where two values are equal to float precision (two
    # clean images both at p = 0.99999), either order is right.
    assert_same_order(evaluation["failures"], expected["failures"],
                      key=dict(zip(expected["files"], -expected["p"].max(axis=1))))
    margins = np.sort(expected["p"], axis=1)
    assert_same_order(evaluation["least_certain_correct"], expected["least"][:100],
                      key=dict(zip(expected["files"], margins[:, -1] - margins[:, -2])))
    # The known mistakes: every mislabelled and every purple image is a confident failure.
    planted = {image["file"] for image in images
               if image["file"].endswith(("mislabelled.png", "purple.png"))}
    assert planted <= set(evaluation["failures"])
    assert all(image["predicted"]["probability"] > 0.9 for image in images
               if image["file"] in planted)


def test_calibration_agrees(evaluation: dict, trained_net, colours: Path) -> None:
    expected = independent(trained_net, colours)
    calibration = evaluation["calibration"]
    assert len(calibration["bins"]) == 15
    assert calibration["ece"] == pytest.approx(expected["ece"], abs=1e-6)
    for number, (entry, (count, accuracy, confidence)) in enumerate(
            zip(calibration["bins"], expected["bins"])):
        assert entry["lower"] == pytest.approx(number / 15)
        assert entry["upper"] == pytest.approx((number + 1) / 15)
        assert entry["count"] == count
        if count:
            assert entry["accuracy"] == pytest.approx(accuracy)
            assert entry["confidence"] == pytest.approx(confidence, abs=1e-6)
        else:
            assert entry["accuracy"] is None and entry["confidence"] is None
    # The generated set spans confidences: blends fill the low bins, clean images the top one.
    assert sum(1 for entry in calibration["bins"] if entry["count"]) >= 3


def test_the_report_page_is_self_contained(evaluation: dict, out_dir: Path) -> None:
    html = (out_dir / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html.lower()
    assert 'src="http' not in html and "href=\"http" not in html
    assert html.count("data:image/jpeg;base64,") >= len(evaluation["failures"][:48])
    assert "Confusion matrix" in html and "<svg" in html
    for failure in evaluation["failures"][:5]:
        assert failure in html
