"""Temperature scaling of an evaluation (issue 16, optional part): the temperature, NLL and ECE
after agree with an independent fit -- torch's L-BFGS on the model's raw logits, the usual
implementation of Guo et al. (2017) -- on the generated dataset; an evaluation that kept only the
top-k of more classes says why it cannot fit one."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torchvision import transforms

from app.cli import main
from app.evaluation_metrics import ImageRecords, temperature_scaling
from tests.datasets.models import CLASS_NAMES


def independent_fit(model: torch.nn.Module, root: Path) -> dict:
    dataset = torchvision.datasets.ImageFolder(str(root), transform=transforms.Compose([
        transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]))
    with torch.no_grad():
        logits = torch.cat([model(batch) for batch, _ in
                            torch.utils.data.DataLoader(dataset, batch_size=16)]).double()
    targets = torch.tensor([CLASS_NAMES.index(dataset.classes[folder])
                            for _, folder in dataset.samples])
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-12,
                                  tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    with torch.no_grad():
        nll_before = float(torch.nn.functional.cross_entropy(logits, targets))
        nll_after = float(torch.nn.functional.cross_entropy(logits / temperature, targets))
        scaled = torch.softmax(logits / temperature, dim=1).numpy()
    correct = scaled.argmax(axis=1) == targets.numpy()
    confidence = scaled.max(axis=1)
    ece = 0.0
    for b in range(15):
        inside = (confidence >= b / 15) & ((confidence < (b + 1) / 15) | (b == 14))
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return {"temperature": temperature, "nll_before": nll_before, "nll_after": nll_after,
            "ece_after": float(ece)}


def test_the_fit_agrees_with_lbfgs_on_the_raw_logits(_session_files: Path, trained_net,
                                                     tmp_path: Path) -> None:
    colours = _session_files / "datasets" / "colours"
    assert main(["evaluate", str(_session_files / "checkpoints"), str(colours),
                 "--out", str(tmp_path)]) == 0
    document = json.loads((tmp_path / "evaluation.json").read_text(encoding="utf-8"))
    fitted = document["temperature_scaling"]
    expected = independent_fit(trained_net, colours)
    assert fitted["fitted"] is True
    assert "no held-out split" in fitted["fitted_on"]
    assert fitted["temperature"] == pytest.approx(expected["temperature"], rel=2e-3)
    assert fitted["nll_before"] == pytest.approx(expected["nll_before"], abs=1e-5)
    assert fitted["nll_after"] == pytest.approx(expected["nll_after"], abs=1e-5)
    assert fitted["ece_before"] == document["calibration"]["ece"]
    assert fitted["ece_after"] == pytest.approx(expected["ece_after"], abs=1e-4)
    assert len(fitted["bins_after"]) == 15
    assert sum(entry["count"] for entry in fitted["bins_after"]) == len(document["images"])
    # The generated set plants confident mistakes: T far from 1, and the fit earns its keep.
    assert abs(np.log(fitted["temperature"])) > 0.1
    assert fitted["nll_after"] < fitted["nll_before"] - 1e-3
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert f"T = {fitted['temperature']:.2f}" in html
    assert f"{fitted['ece_before']:.3f} → {fitted['ece_after']:.3f}" in html


def test_with_only_the_top_k_of_more_classes_it_says_why_not() -> None:
    records = ImageRecords(("a", "b"), np.array([0, 1]), np.array([[0, 1], [2, 1]]),
                           np.array([[0.7, 0.2], [0.5, 0.4]], dtype=np.float32),
                           np.array([0.7, 0.4], dtype=np.float32))
    result = temperature_scaling(records, num_classes=3)
    assert result["fitted"] is False
    assert "top 2 of 3" in result["reason"] and "--top-k 3" in result["reason"]


def test_an_overconfident_set_gets_a_temperature_above_one() -> None:
    """Logits whose softmax says 0.99 but are right 70 % of the time: the fit must cool them
    (T > 1) and bring the top-1 confidence towards 0.7."""
    rng = np.random.default_rng(0)
    n = 400
    correct = rng.random(n) < 0.7
    targets = np.zeros(n, dtype=np.int64)
    predicted = np.where(correct, 0, 1)
    logits = np.zeros((n, 3))
    logits[np.arange(n), predicted] = np.log(0.99 / 0.005)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    order = np.argsort(-p, axis=1, kind="stable")
    records = ImageRecords(tuple(map(str, range(n))), targets, order,
                           np.take_along_axis(p, order, axis=1).astype(np.float32),
                           p[:, 0].astype(np.float32))
    result = temperature_scaling(records, num_classes=3)
    assert result["temperature"] > 1.5
    assert result["ece_before"] > 0.25 and result["ece_after"] < 0.05
    # Closed form: every row has the same two logits, so the best scaled top-1 probability is
    # the accuracy itself: 0.99 cooled to about the share of right rows.
    confident = [entry for entry in result["bins_after"] if entry["count"]]
    assert len(confident) == 1
    assert confident[0]["confidence"] == pytest.approx(correct.mean(), abs=0.01)


def test_the_note_states_the_reason_or_nothing() -> None:
    import jinja2

    templates = Path(__file__).resolve().parents[2] / "templates"
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates)),
                                     autoescape=True, undefined=jinja2.StrictUndefined)
    note = environment.get_template("partials/evaluation_blocks.html").module.temperature_note
    records = ImageRecords(("a",), np.array([0]), np.array([[0, 1]]),
                           np.array([[0.7, 0.2]], dtype=np.float32),
                           np.array([0.7], dtype=np.float32))
    refused = str(note(temperature_scaling(records, num_classes=3)))
    assert "not fitted" in refused and "top 2 of 3" in refused
    assert str(note(None)).strip() == ""        # an evaluation stored before it existed
