"""How far to believe each prediction, shown beside its top-5 (issue 16): the job page's image
view and the static report of ``convscope visualize`` show the figures of the results JSON --
entropy, test-time augmentation (mean ± spread of the top class, whether the top-1 changes), MC
dropout (or that it was skipped), the out-of-distribution flag -- each with its method named and
a help text of what it means and does not mean; with uncertainty off nothing is missing or
broken. No browser: the HTML is read as text."""
from __future__ import annotations

import html as html_lib
import json
import re
from pathlib import Path

import jinja2
import numpy as np
import torch
from torch import nn

from app.cli import main
from app.uncertainty import uncertainty
from tests.visualizations.models import wrap
from tests.visualizations.test_report import write_checkpoint_dir as write_tiny_cnn_dir
from tests.visualizations.test_report import write_image
from tests.web.conftest import png_bytes, run_job, upload

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def block(html: str) -> str:
    """The uncertainty table of a page (the first one)."""
    assert '<table class="uncertainty"' in html, "no uncertainty table"
    return html.split('<table class="uncertainty"', 1)[1].split("</table>", 1)[0]


def text_of(html: str) -> str:
    """Visible text with the markup and whitespace runs removed, entities decoded."""
    return re.sub(r"\s+", " ", html_lib.unescape(re.sub(r"<[^>]+>", " ", html)))


def titles(html: str) -> list[str]:
    return [html_lib.unescape(title) for title in re.findall(r'title="([^"]*)"', html)]


def assert_shows(html: str, figures: dict) -> None:
    """Every figure of ``figures`` (a results-JSON ``uncertainty`` block) is on the page as the
    template formats it, with its method named in the help texts."""
    table = block(html)
    text = text_of(table)
    entropy, tta, mc, ood = (figures[key] for key in ("entropy", "tta", "mc_dropout", "ood"))
    assert f"{entropy['value']:.2f} nats" in text
    assert f"({entropy['normalized'] * 100:.0f} % of the maximum)" in text
    top = tta["classes"][0]
    assert f"{top['label']} {top['mean']:.2f} ± {top['std']:.2f}" in text
    kept = round(tta["top1_agreement"] * tta["samples"])
    verdict = "top-1 changes" if tta["top1_changed"] else "top-1 never changes"
    assert f"{verdict}: kept in {kept} of {tta['samples']} views" in text
    if mc["available"]:
        mc_top = mc["classes"][0]
        assert f"{mc_top['label']} {mc_top['mean']:.2f} ± {mc_top['std']:.2f}" in text
        assert f"of {mc['samples']} passes" in text
    else:
        assert "skipped: no dropout layers" in text
    assert f'ood-flag ood-{ood["flag"]}">{ood["flag"]}<' in table
    assert ood["meaning"] in text
    helps = titles(table)
    for method in (entropy["method"], tta["method"], mc["method"], ood["method"]):
        assert any(title.startswith(method) for title in helps), method
    assert len(helps) == 4 and all("Does not mean:" in title for title in helps)
    help_text = text_of(html.split('<details class="uncertainty-help">', 1)[1]
                        .split("</details>", 1)[0])
    assert "What these figures mean, and what they do not" in help_text
    assert "not a calibrated probability" in help_text and "A hint, not a detector" in help_text
    assert "style=" not in html and "<script" not in table


def test_the_job_page_shows_the_figures_of_the_api(client) -> None:
    images = upload(client, (png_bytes(seed=7), "one.png"), (png_bytes(seed=8), "two.png"))
    job = run_job(client, [image["id"] for image in images])
    assert job["status"] == "done"
    for row, result in enumerate(job["results"]):
        figures = result["uncertainty"]
        assert figures is not None and figures["mc_dropout"]["available"] is False
        view = client.get(f"/jobs/{job['id']}/views/compare-image-{row}?fragment=1")
        assert view.status_code == 200
        page = view.get_data(as_text=True)
        assert_shows(page, figures)
        # Beside the top-5: the same block holds both tables.
        assert page.index('<table class="topk">') < page.index('<table class="uncertainty"')


def test_with_uncertainty_off_the_page_has_the_top5_and_nothing_broken(make_app) -> None:
    client = make_app(uncertainty=False).test_client()
    image = upload(client, (png_bytes(seed=7), "one.png"))[0]
    job = run_job(client, [image["id"]])
    assert job["status"] == "done" and job["results"][0]["uncertainty"] is None
    for view in ("compare-image-0", "detail-0-0"):
        page = client.get(f"/jobs/{job['id']}/views/{view}")
        assert page.status_code == 200
    html = client.get(f"/jobs/{job['id']}/views/compare-image-0").get_data(as_text=True)
    assert '<table class="topk">' in html
    assert 'class="uncertainty"' not in html and "uncertainty-help" not in html


def test_the_static_report_shows_the_figures_of_results_json(tmp_path: Path) -> None:
    checkpoints = write_tiny_cnn_dir(tmp_path / "runs", {"tiny.pt": 0})
    photo = write_image(tmp_path / "photo.png", 1)
    out = tmp_path / "report"
    assert main(["visualize", str(checkpoints), str(photo), "--method", "saliency",
                 "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    figures = results["images"][0]["uncertainty"]
    html = (out / "report.html").read_text(encoding="utf-8")
    compare = html.split('id="compare-image-0"', 1)[1].split("</section>", 1)[0]
    assert_shows(compare, figures)
    assert "<script" not in html.lower()


def render_predictions(result: dict) -> str:
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.get_template("partials/predictions.html").render(result=result)


def test_a_model_with_dropout_shows_its_mc_figures_and_none_shows_nothing() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 32), nn.ReLU(),
                           nn.Dropout(0.5), nn.Linear(32, 4))
    model = wrap(module, side=16, class_names=("a", "b", "c", "d"))
    batch = (torch.rand((1, 3, 16, 16), generator=torch.Generator().manual_seed(1)) - .5) / .5
    probabilities = model.predict(batch)[0].numpy()
    figures = uncertainty(model, batch, probabilities)
    assert figures["mc_dropout"]["available"] is True
    order = np.argsort(-probabilities)[:4]
    predictions = [{"index": int(i), "label": "abcd"[i], "probability": float(probabilities[i])}
                   for i in order]
    html = render_predictions({"predictions": predictions, "true_label": None,
                               "uncertainty": figures})
    assert_shows(html, figures)
    # A prediction without figures (uncertainty off, or a record without the key): the top-k
    # alone, under the report's strict undefined.
    for result in ({"predictions": predictions, "true_label": None, "uncertainty": None},
                   {"predictions": predictions, "true_label": None}):
        plain = render_predictions(result)
        assert '<table class="topk">' in plain and "uncertainty" not in plain
