"""The "confidently wrong" images (wrong, with a top-1 probability at or above a level) agree
with an independent computation (plain torchvision and numpy, ``independent`` of the calibration
test) in ``evaluation.json``, the CLI's report and the evaluation page, where another level is a
query parameter and the images are selectable for Explain like the failures."""
from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from app.evaluation_metrics import CONFIDENTLY_WRONG
from tests.datasets.test_evaluation_correctness import independent
from tests.datasets.test_evaluation_jobs import evaluate
from tests.web.conftest import csrf_from


def expected_files(reference: dict, level: float) -> list[str]:
    """The wrong files with top-1 probability >= ``level``, most confident first."""
    p, targets, files = reference["p"], reference["targets"], reference["files"]
    confidence = p.max(axis=1)
    wrong = [i for i in range(len(files))
             if p[i].argmax() != targets[i] and confidence[i] >= level]
    return [files[i] for i in sorted(wrong, key=lambda i: (-confidence[i], i))]


def same_set_in_confidence_order(found: list[str], expected: list[str],
                                 confidence: dict[str, float]) -> None:
    assert sorted(found) == sorted(expected)
    values = [confidence[name] for name in found]
    assert all(a >= b - 1e-6 for a, b in itertools.pairwise(values))


@pytest.fixture(scope="module")
def reference(_session_files: Path, trained_net) -> dict:
    found = independent(trained_net, _session_files / "datasets" / "colours")
    found["confidence"] = dict(zip(found["files"], found["p"].max(axis=1).tolist()))
    return found


@pytest.fixture(scope="module")
def cli_run(_session_files: Path, tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("confident")
    assert main(["evaluate", str(_session_files / "checkpoints"),
                 str(_session_files / "datasets" / "colours"), "--out", str(out)]) == 0
    document = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))
    return document, (out / "report.html").read_text(encoding="utf-8")


def test_evaluation_json_lists_them_with_the_level(cli_run, reference: dict) -> None:
    document, _ = cli_run
    listed = document["confidently_wrong"]
    assert listed["level"] == CONFIDENTLY_WRONG == 0.8
    expected = expected_files(reference, 0.8)
    same_set_in_confidence_order(listed["images"], expected, reference["confidence"])
    # The generated set plants confident mistakes (mislabelled, purple) and unsure blends:
    # the list is neither empty nor every failure, so the level does its work.
    assert 8 <= len(expected) < len(document["failures"])
    assert listed["images"] == document["failures"][:len(listed["images"])]


def test_the_report_shows_them_with_thumbnails(cli_run, reference: dict) -> None:
    document, html = cli_run
    section = html.split('id="confidently-wrong"', 1)[1].split("</section>", 1)[0]
    shown = re.findall(r'<span class="file">([^<]+)</span>', section)
    assert shown == document["confidently_wrong"]["images"]
    assert section.count("data:image/jpeg;base64,") == len(shown)
    assert "0.80 or more" in section


def page_files(html: str) -> list[str]:
    section = html.split('id="confidently-wrong"', 1)[1].split("</section>", 1)[0]
    return re.findall(r'<span class="file">([^<]+)</span>', section)


def test_the_page_lists_them_selectable_and_takes_a_level(client, reference: dict) -> None:
    view = evaluate(client)
    assert view["status"] == "done"
    api_listed = view["confidently_wrong"]
    same_set_in_confidence_order(api_listed["images"], expected_files(reference, 0.8),
                                 reference["confidence"])
    page = client.get(f"/evaluations/{view['id']}")
    html = page.data.decode()
    assert page_files(html) == api_listed["images"]
    assert re.search(r'id="confidently-wrong-count"><a href="#confidently-wrong">'
                     + str(len(api_listed["images"])) + "<", html)
    scaling = view["temperature_scaling"]        # shown under the reliability diagram
    assert f"T = {scaling['temperature']:.2f}" in html
    assert f"{scaling['ece_before']:.3f} → {scaling['ece_after']:.3f}" in html
    section = html.split('id="confidently-wrong"', 1)[1].split("</section>", 1)[0]
    numbers = re.findall(r'name="image" value="(\d+)"', section)
    by_number = {image["number"]: image["file"] for image in view["images"]}
    assert [by_number[int(n)] for n in numbers] == api_listed["images"]
    assert section.count("/thumbnails/") == len(numbers)

    for level in (0.5, 0.99):
        other = client.get(f"/evaluations/{view['id']}?confident={level}").data.decode()
        same_set_in_confidence_order(page_files(other), expected_files(reference, level),
                                     reference["confidence"])
        assert f"{level:.2f} or more" in other
    assert len(expected_files(reference, 0.5)) > len(api_listed["images"])
    for bogus in ("x", "7", "nan", "-1"):
        fallback = client.get(f"/evaluations/{view['id']}?confident={bogus}")
        assert fallback.status_code == 200
        assert page_files(fallback.data.decode()) == api_listed["images"]

    explained = client.post(f"/evaluations/{view['id']}/explain",
                            data={"csrf_token": csrf_from(page.data), "method": "grad_cam",
                                  "image": numbers[:2]})
    assert explained.status_code == 303
    assert re.search(r"/jobs/[0-9a-f]{32}$", explained.headers["Location"])


def test_the_level_is_inclusive_and_ordered() -> None:
    from app.evaluation_metrics import ImageRecords, confidently_wrong

    records = ImageRecords(tuple("abcdef"), np.array([0, 0, 0, 1, 1, 1]),
                           np.array([[1, 0], [1, 0], [0, 1], [0, 1], [1, 0], [0, 1]]),
                           np.array([[0.8, 0.2], [0.95, 0.05], [0.99, 0.01], [0.9, 0.1],
                                     [0.79, 0.21], [0.6, 0.4]], dtype=np.float32),
                           np.zeros(6, dtype=np.float32))
    # wrong: a (0.8), b (0.95), d (0.9), f (0.6); c and e are right however sure.
    assert [records.paths[n] for n in confidently_wrong(records, 0.8)] == ["b", "d", "a"]
    assert [records.paths[n] for n in confidently_wrong(records, 0.0)] == ["b", "d", "a", "f"]
    assert list(confidently_wrong(records, 1.0)) == []
