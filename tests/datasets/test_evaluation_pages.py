"""The dataset-mode pages without JavaScript (forms with CSRF tokens, redirects, errors shown on
the page), the matrix with many classes, and the settings that configure dataset mode."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from app.errors import ConfigInvalid
from app.evaluation_display import OTHER, matrix_view, shown_classes
from app.evaluation_metrics import ImageRecords, summarize
from app.settings import load_settings
from tests.datasets.models import write_checkpoint_dir
from tests.datasets.test_evaluation_jobs import dataset_id, wait_evaluation
from tests.web.conftest import csrf_from


def start_from_the_form(client) -> str:
    page = client.get("/datasets")
    assert page.status_code == 200
    response = client.post("/datasets", data={"csrf_token": csrf_from(page.data),
                                              "dataset": dataset_id(client), "model": "latest"})
    assert response.status_code == 303
    match = re.search(r"/evaluations/([0-9a-f]{32})$", response.headers["Location"])
    assert match, response.headers["Location"]
    return match.group(1)


def test_the_forms_run_an_evaluation_and_explain_it(client) -> None:
    evaluation_id = start_from_the_form(client)
    running = client.get(f"/evaluations/{evaluation_id}")
    assert running.status_code == 200
    view = wait_evaluation(client, evaluation_id)
    page = client.get(f"/evaluations/{evaluation_id}")
    html = page.data.decode()
    assert "Confusion matrix" in html and "Failures, most confident first" in html
    assert 'id="accuracy"' in html and f"{view['accuracy'] * 100:.1f}%" in html
    assert html.count('class="eval-image') >= min(48, len(view["failures"]))
    assert "<svg" in html and "style=" not in html          # the CSP allows no inline styles

    failure = next(image for image in view["images"] if not image["correct"])
    cell = f"{failure['true']['index']}:{failure['predicted']['index']}"
    if failure["predicted"]["index"] not in view["confusion"]["labels"]:
        cell = f"{failure['true']['index']}:{OTHER}"
    cell_page = client.get(f"/evaluations/{evaluation_id}?cell={cell}").data.decode()
    assert 'id="cell-images"' in cell_page and failure["file"] in cell_page
    assert client.get(f"/evaluations/{evaluation_id}?cell=../x&sort=bogus").status_code == 200

    token = csrf_from(page.data)
    nothing = client.post(f"/evaluations/{evaluation_id}/explain",
                          data={"csrf_token": token, "method": "grad_cam"})
    assert nothing.status_code == 400 and b"Select at least one image" in nothing.data
    explained = client.post(f"/evaluations/{evaluation_id}/explain",
                            data={"csrf_token": token, "method": "grad_cam",
                                  "image": [str(failure["number"])] * 2})
    assert explained.status_code == 303
    assert re.search(r"/jobs/[0-9a-f]{32}$", explained.headers["Location"])
    forged = client.post(f"/evaluations/{evaluation_id}/explain",
                         data={"csrf_token": "forged", "image": "0"})
    assert forged.status_code == 403


def test_the_pages_carry_the_policy_and_no_inline_code(client) -> None:
    evaluation_id = start_from_the_form(client)
    wait_evaluation(client, evaluation_id)
    for path in ("/datasets", f"/evaluations/{evaluation_id}",
                 f"/evaluations/{evaluation_id}?cell=0:0", "/evaluations/" + "0" * 32):
        response = client.get(path)
        assert "script-src 'self'" in response.headers["Content-Security-Policy"], path
        html = response.data.decode()
        assert "style=" not in html and "<style" not in html, path
        assert all('src="' in tag for tag in re.findall(r"<script[^>]*>", html)), path
        assert " on" + "click=" not in html, path


def test_the_per_class_table_sorts(client) -> None:
    evaluation_id = start_from_the_form(client)
    view = wait_evaluation(client, evaluation_id)

    def order(query: str) -> list[str]:
        html = client.get(f"/evaluations/{evaluation_id}?{query}").data.decode()
        table = html.split('id="class-table"', 1)[1].split("</table>", 1)[0]
        return re.findall(r'<tr data-index="(\d+)"', table)

    recalls = {row["index"]: row["recall"] for row in view["classes"]}
    worst_first = order("")
    assert [recalls[int(index)] for index in worst_first] == sorted(recalls.values())
    assert order("sort=index&order=desc") == sorted(worst_first, key=int, reverse=True)


def test_cancel_from_the_page(make_app, tmp_path: Path, trained_net) -> None:
    slow = write_checkpoint_dir(tmp_path / "slow", trained_net, factory="SlowColourNet")
    client = make_app(checkpoint_dir=slow).test_client()
    evaluation_id = start_from_the_form(client)
    page = client.get(f"/evaluations/{evaluation_id}")
    assert b'id="cancel-button"' in page.data
    response = client.post(f"/evaluations/{evaluation_id}/cancel",
                           data={"csrf_token": csrf_from(page.data)})
    assert response.status_code == 303
    assert wait_evaluation(client, evaluation_id)["status"] == "cancelled"
    assert b"E_CANCELLED" in client.get(f"/evaluations/{evaluation_id}").data


def test_a_form_error_is_shown_on_the_datasets_page(client) -> None:
    page = client.get("/datasets")
    response = client.post("/datasets", data={"csrf_token": csrf_from(page.data),
                                              "dataset": "nope"})
    assert response.status_code == 404 and b"E_DATASET_NOT_FOUND" in response.data


def test_with_a_thousand_classes_the_matrix_shows_the_most_confused() -> None:
    rng = np.random.default_rng(0)
    names = tuple(f"class {number}" for number in range(1000))
    targets = rng.integers(0, 1000, size=5000)
    predicted = np.where(rng.random(5000) < 0.7, targets, rng.integers(0, 1000, size=5000))
    predicted[:300] = 7                                 # one class that swallows many others
    top = np.stack([predicted] + [(predicted + shift) % 1000 for shift in range(1, 5)], axis=1)
    probabilities = np.sort(rng.random((5000, 5)).astype(np.float32), axis=1)[:, ::-1]
    records = ImageRecords(tuple(f"{n}.png" for n in range(5000)), targets, top,
                           probabilities.copy(), probabilities[:, 0].copy())
    classes = sorted(set(targets.tolist()))
    summary = summarize(records, classes, names)
    matrix = matrix_view(summary, names, lambda row, column: f"#{row}-{column}")
    assert matrix["classes"] == len(classes) > 900 and matrix["shown"] == 30
    assert 7 in shown_classes(summary)
    assert len(matrix["rows"]) == 30 and all(len(row["cells"]) == 31 for row in matrix["rows"])
    full = np.asarray(summary["confusion"]["matrix"])
    position = {index: number for number, index in enumerate(summary["confusion"]["labels"])}
    for row in matrix["rows"]:
        # Nothing is lost: the shown cells and "other" add up to the class's images.
        assert sum(cell["count"] for cell in row["cells"]) == full[position[row["index"]]].sum()
    assert summary["top_confusions"][0]["predicted"]["index"] == 7


def test_dataset_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid) as caught:
        load_settings({"data_dir": tmp_path / "data", "dataset_dir": tmp_path / "missing"})
    assert "CONVSCOPE_DATASET_DIR" in caught.value.fields
    with pytest.raises(ConfigInvalid):
        load_settings({"data_dir": tmp_path / "data"},
                      environ={"CONVSCOPE_MAX_DATASET_IMAGES": "0"})
    settings = load_settings({"data_dir": tmp_path / "data"},
                             environ={"CONVSCOPE_DATASET_DIR": str(tmp_path)})
    assert settings.dataset_dir == tmp_path and settings.max_dataset_images == 100_000

    from app.cli import build_parser
    from app.serve import settings_from_args

    args = build_parser().parse_args(["serve", "--datasets", str(tmp_path)])
    assert settings_from_args(args)["dataset_dir"] == str(tmp_path)
