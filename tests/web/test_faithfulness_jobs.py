"""Faithfulness scores through the job API, the job pages and ``convscope visualize``: on by
default, off by setting, job flag and CLI flag, in the cache key and in the job's cost."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from app import faithfulness_scores
from app.cli import build_parser, main
from tests.web.conftest import png_bytes, run_job, submit, upload, wait_job
from visualizations import faithfulness as engine

SCORE_KEYS = {"deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc"}
METHODS = [{"name": "grad_cam"}, {"name": "partial_occlusion", "params": {"positions": 4,
                                                                          "top_k": 2}}]


def _panels(job: dict) -> list[dict]:
    assert job["status"] == "done", job
    return [panel for result in job["results"] for item in result["visualizations"]
            for panel in item["panels"]]


def _assert_scored(panels: list[dict]) -> None:
    for panel in panels:
        if panel["kind"] == "heatmap" and panel["target"] is not None:
            assert set(panel["faithfulness"]) == SCORE_KEYS
            assert all(0.0 <= value <= 1.0 for value in panel["faithfulness"].values())
            assert set(panel["faithfulness_verdict"]) == {"better_than_random", "state",
                                                          "label", "summary"}
        else:
            assert panel["faithfulness"] is None and panel["faithfulness_verdict"] is None


def _assert_unscored(panels: list[dict]) -> None:
    assert panels and all(panel["faithfulness"] is None and panel["faithfulness_verdict"] is None
                          for panel in panels)


@pytest.fixture
def image(client) -> str:
    return upload(client, (png_bytes(seed=11), "photo.png"))[0]["id"]


def test_job_panels_carry_the_scores_by_default(client, image) -> None:
    panels = _panels(run_job(client, [image], METHODS))
    _assert_scored(panels)
    assert sum(panel["faithfulness"] is not None for panel in panels) == 3   # 1 + top_k 2
    assert any(panel["kind"] == "image" for panel in panels)


def test_job_flag_turns_them_off_and_the_store_keeps_both(client, image) -> None:
    off = run_job(client, [image], METHODS, faithfulness=False)
    _assert_unscored(_panels(off))
    # The same job with scores is another result: computed, not served from the store.
    on = run_job(client, [image], METHODS)
    _assert_scored(_panels(on))
    assert [item["cached"] for item in on["results"][0]["visualizations"]] == [0, 0]
    again = run_job(client, [image], METHODS, faithfulness=True)
    assert [item["cached"] for item in again["results"][0]["visualizations"]] == [1, 1]
    assert _panels(again) == _panels(on)
    off_again = run_job(client, [image], METHODS, faithfulness=False)
    assert [item["cached"] for item in off_again["results"][0]["visualizations"]] == [1, 1]
    _assert_unscored(_panels(off_again))


def test_setting_turns_them_off_and_a_job_may_still_ask(make_app) -> None:
    client = make_app(faithfulness=False).test_client()
    image = upload(client, (png_bytes(seed=12), "photo.png"))[0]["id"]
    _assert_unscored(_panels(run_job(client, [image], METHODS)))
    _assert_scored(_panels(run_job(client, [image], METHODS, faithfulness=True)))


def test_a_bad_flag_is_refused(client, image) -> None:
    response = submit(client, [image], faithfulness="no")
    assert response.status_code == 400
    assert response.json["error"]["code"] == "E_BAD_REQUEST"
    assert "faithfulness" in response.json["error"]["fields"]


def test_the_job_cost_counts_the_scoring(make_app) -> None:
    # Grad-CAM: 1 evaluation; its scores 66; the random reference 198: 265 per image-target.
    client = make_app(max_job_cost=265).test_client()
    image = upload(client, (png_bytes(seed=13), "photo.png"))[0]["id"]
    accepted = submit(client, [image])
    assert accepted.status_code == 202, accepted.json
    wait_job(client, accepted.json["id"])
    # A second target doubles it (the reference is per target).
    refused = submit(client, [image], targets=["predicted", "fish"])
    assert refused.status_code == 422
    message = refused.json["error"]["message"]
    assert "530 model evaluations" in message and "faithfulness" in message
    unscored = submit(client, [image], targets=["predicted", "fish"], faithfulness=False)
    assert unscored.status_code == 202
    wait_job(client, unscored.json["id"])


def test_one_random_reference_per_image_and_target_in_a_job(client, image,
                                                            monkeypatch) -> None:
    targets: list[int] = []
    original = engine.random_reference

    def counting(model, images, target, context=None):
        targets.append(target)
        return original(model, images, target, context)

    monkeypatch.setattr(faithfulness_scores.engine, "random_reference", counting)
    methods = [{"name": "grad_cam"}, {"name": "saliency"}, {"name": "cam"},
               {"name": "occlusion", "params": {"window": 8}}]
    job = run_job(client, [image], methods, targets=["predicted", "fish"])
    assert sum(panel["faithfulness"] is not None for panel in _panels(job)) == 8
    assert len(targets) == 2 and len(set(targets)) == 2


def test_the_detail_view_shows_the_badge(client, image) -> None:
    job = run_job(client, [image], METHODS)
    html = client.get(f"/jobs/{job['id']}/views/detail-0-0").get_data(as_text=True)
    badges = re.findall(r'<span class="badge faithful-(good|mixed|poor)" title="([^"]*)">'
                        r'([^<]*)</span>', html)
    assert len(badges) == 1, html
    state, title, label = badges[0]
    verdict = _panels(job)[0]["faithfulness_verdict"]
    assert (state, label) == (verdict["state"], verdict["label"])
    scores = _panels(job)[0]["faithfulness"]
    assert f"{scores['deletion_auc']:.3f}" in title and f"{scores['insertion_auc']:.3f}" in title
    assert '<details class="faithfulness-help"><summary>what is this?</summary>' in html
    assert " style=" not in html

    plain = run_job(client, [image], METHODS, faithfulness=False)
    html = client.get(f"/jobs/{plain['id']}/views/detail-0-0").get_data(as_text=True)
    assert "faithful-" not in html and "faithfulness-help" not in html


# --- convscope visualize --------------------------------------------------------------------

def _cli(checkpoint_dir: Path, tmp_path: Path, *flags: str) -> tuple[dict, str]:
    image = tmp_path / "photo.png"
    image.write_bytes(png_bytes(seed=14))
    out = tmp_path / f"report{len(flags)}"
    assert main(["visualize", str(checkpoint_dir), str(image), "--method", "grad_cam",
                 "--method", "partial_occlusion", "--param", "partial_occlusion.positions=4",
                 "--out", str(out), *flags]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    panels = [panel for item in results["images"][0]["visualizations"]
              for panel in item["panels"]]
    return {"panels": panels}, (out / "report.html").read_text(encoding="utf-8")


def test_cli_scores_by_default_and_not_with_the_flag(checkpoint_dir, tmp_path) -> None:
    scored, html = _cli(checkpoint_dir, tmp_path)
    for panel in scored["panels"]:
        expected = panel["kind"] == "heatmap" and panel["target"] is not None
        assert (set(panel["faithfulness"]) == SCORE_KEYS) if expected else \
            panel["faithfulness"] is None
    assert re.search(r'class="badge faithful-(good|mixed|poor)" title="Deletion AUC', html)
    assert "faithfulness_verdict" not in json.dumps(scored), "results.json: records only"

    plain, html = _cli(checkpoint_dir, tmp_path, "--no-faithfulness")
    assert all(panel["faithfulness"] is None for panel in plain["panels"])
    assert 'class="badge faithful-' not in html     # (the inline stylesheet names the class)


def test_cli_default_follows_the_setting(monkeypatch) -> None:
    arguments = ["visualize", "x.png", "--method", "cam", "--out", "o"]
    assert build_parser().parse_args(arguments).faithfulness is True
    monkeypatch.setenv("CONVSCOPE_FAITHFULNESS", "0")
    assert build_parser().parse_args(arguments).faithfulness is False
    monkeypatch.setenv("CONVSCOPE_FAITHFULNESS", "true")
    assert build_parser().parse_args(arguments).faithfulness is True
