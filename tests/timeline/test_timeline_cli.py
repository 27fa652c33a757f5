"""``convscope timeline`` on a tiny classifier trained for five epochs and saved in mixed shapes
with scrambled mtimes and a broken file in the middle: the checkpoints come out in training
order, each loaded once and one at a time; predictions, accuracies and flips agree with an
independent computation (a fresh model per state_dict, torchvision transforms, the dataset read
with PIL); the broken file is reported and skipped; the report is self-contained."""
from __future__ import annotations

import json
import re
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import model_adapters
from app.cli import main
from tests.datasets.models import CLASS_NAMES, COLOURS, ColourNet, colour_image
from tests.timeline.training import SIDE

BROKEN = "epoch=2-step=20.pt"


def _reference_probabilities(state_dict: dict, image: Image.Image) -> np.ndarray:
    """The model's class probabilities, computed without convscope."""
    model = ColourNet()
    model.load_state_dict(state_dict)
    model.eval()
    transform = v2.Compose([v2.Resize((SIDE, SIDE), interpolation=v2.InterpolationMode.BILINEAR),
                            v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                            v2.Normalize([0.5] * 3, [0.5] * 3)])
    with torch.no_grad():
        logits = model(transform(image.convert("RGB")).unsqueeze(0))
    return torch.softmax(logits, dim=1)[0].numpy()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("timeline-images")
    rng = np.random.default_rng(11)
    paths = []
    for name, colour, mix in (("orange", "red", "yellow"), ("teal", "green", "blue")):
        path = folder / f"{name}.png"
        Image.fromarray(colour_image(rng, COLOURS[colour], mix=COLOURS[mix],
                                     amount=0.35)).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def outcome(tmp_path_factory, _session_run, images):
    """One timeline run (with a dataset), counting loads and the models alive at each."""
    import shutil

    root = tmp_path_factory.mktemp("timeline-cli")
    run = shutil.copytree(_session_run[0] / "run", root / "run")
    out = root / "out"
    loads: list[str] = []
    alive_at_load: list[int] = []
    live: list[weakref.ref] = []
    real_load = model_adapters.load_checkpoint

    def counting_load(path, *args, **kwargs):
        import gc

        gc.collect()
        alive_at_load.append(sum(1 for ref in live if ref() is not None))
        loads.append(Path(path).name)
        loaded = real_load(path, *args, **kwargs)
        live.append(weakref.ref(loaded.module))
        return loaded

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_adapters, "load_checkpoint", counting_load)
        status = main(["timeline", str(run), *map(str, images), "--method", "grad_cam",
                       "--dataset", str(_session_run[0] / "datasets" / "colours"),
                       "--out", str(out), "--device", "cpu"])
    assert status == 0
    document = json.loads((out / "timeline.json").read_text())
    return {"document": document, "out": out, "loads": loads, "alive": alive_at_load,
            "dataset": _session_run[0] / "datasets" / "colours"}


def test_checkpoints_in_training_order_with_the_broken_one_reported(outcome, saved) -> None:
    checkpoints = outcome["document"]["checkpoints"]
    expected = [c.file for c in saved[:3]] + [BROKEN] + [c.file for c in saved[3:]]
    assert [c["file"] for c in checkpoints] == expected
    by_file = {c["file"]: c for c in checkpoints}
    assert by_file[BROKEN]["ok"] is False
    assert by_file[BROKEN]["error"]["code"] == "E_CHECKPOINT_UNREADABLE"
    assert by_file[BROKEN]["accuracy"] is None
    for checkpoint in saved:
        record = by_file[checkpoint.file]
        assert record["ok"] and record["error"] is None
        assert (record["epoch"], record["step"]) == (checkpoint.epoch, checkpoint.step)
        assert re.fullmatch(r"[0-9a-f]{64}", record["sha256"])
    assert {c["order_by"] for c in checkpoints} == {"epoch", "name"}
    # The broken one is skipped: no image has a step on it.
    for image in outcome["document"]["images"]:
        assert [step["checkpoint"] for step in image["steps"]] == [c.file for c in saved]


def test_each_checkpoint_is_loaded_once_and_alone(outcome, saved) -> None:
    assert sorted(outcome["loads"]) == sorted([c.file for c in saved] + [BROKEN])
    assert max(outcome["alive"]) == 0, "a model was still alive when the next one loaded"


def test_predictions_agree_with_an_independent_computation(outcome, saved, images) -> None:
    document = outcome["document"]
    final = {}
    for path, image_record in zip(images, document["images"], strict=True):
        image = Image.open(path)
        for checkpoint, step in zip(saved, image_record["steps"], strict=True):
            reference = _reference_probabilities(checkpoint.state_dict, image)
            top = step["predictions"]
            assert top[0]["index"] == int(np.argmax(reference))
            assert top[0]["label"] == CLASS_NAMES[top[0]["index"]]
            for entry in top:
                assert entry["probability"] == pytest.approx(reference[entry["index"]],
                                                             abs=1e-5)
        final[path.name] = int(np.argmax(_reference_probabilities(saved[-1].state_dict, image)))
        # "predicted" means the last checkpoint's prediction, for every frame of the strip.
        assert image_record["targets"] == [final[path.name]]
        for step in image_record["steps"]:
            panels = step["visualizations"][0]["panels"]
            assert [panel["target"]["index"] for panel in panels] == [final[path.name]]
            assert all((outcome["out"] / panel["array"]).is_file() for panel in panels)
    # The predictions change over training (else this test would show little).
    tops = {step["predictions"][0]["index"] for image in document["images"]
            for step in image["steps"]}
    assert len(tops) > 1


def _reference_correct(dataset: Path, state_dict: dict) -> dict[str, bool]:
    correct = {}
    for path in sorted(dataset.rglob("*.png")):
        label = CLASS_NAMES.index(path.parent.name)
        predicted = int(np.argmax(_reference_probabilities(state_dict, Image.open(path))))
        correct[path.relative_to(dataset).as_posix()] = predicted == label
    return correct


def test_accuracies_and_flips_agree_with_an_independent_computation(outcome, saved) -> None:
    document = outcome["document"]
    by_file = {c["file"]: c for c in document["checkpoints"]}
    references = [_reference_correct(outcome["dataset"], c.state_dict) for c in saved]
    accuracies = []
    for checkpoint, correct in zip(saved, references, strict=True):
        accuracy = sum(correct.values()) / len(correct)
        accuracies.append(accuracy)
        assert by_file[checkpoint.file]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
        recall = by_file[checkpoint.file]["recall"]
        for name in ("red", "green", "blue", "yellow"):
            members = [ok for path, ok in correct.items() if path.startswith(name + "/")]
            assert recall[name] == pytest.approx(sum(members) / len(members))
    assert max(accuracies) - min(accuracies) > 0.1       # it did learn
    expected = []
    for (before_cp, before), (after_cp, after) in zip(zip(saved, references),
                                                      list(zip(saved, references))[1:]):
        expected.append({"from": before_cp.file, "to": after_cp.file,
                         "right_to_wrong": sorted(p for p in before if before[p] and not after[p]),
                         "wrong_to_right": sorted(p for p in before if after[p] and not before[p])})
    assert document["flips"] == expected
    assert any(flip["wrong_to_right"] for flip in expected)


def test_one_colour_scale_per_strip(outcome) -> None:
    document, out = outcome["document"], outcome["out"]
    for image in document["images"]:
        arrays = [np.load(out / step["visualizations"][0]["panels"][0]["array"])
                  for step in image["steps"]]
        scale = next(s for s in document["scales"] if s["image"] == image["file"])
        # Grad-CAM shows its full range: the strip's scale spans every frame's values.
        assert scale["range"][0] == pytest.approx(min(float(a.min()) for a in arrays), abs=1e-6)
        assert scale["range"][1] == pytest.approx(max(float(a.max()) for a in arrays), abs=1e-6)
        assert len({round(float(a.max()), 6) for a in arrays}) > 1   # frames differ in strength


def test_the_report_is_self_contained(outcome, images) -> None:
    html = (outcome["out"] / "report.html").read_text()
    assert "<script" not in html and "http://" not in html.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    # Per image: one frame per checkpoint (the broken one shows its error), a chart.
    assert html.count("<figure class=\"filmstrip\">") == len(images)
    assert html.count("E_CHECKPOINT_UNREADABLE") >= 1 + len(images)
    assert html.count("<svg class=\"chart\"") == len(images) + 2     # + accuracy and recall
    assert html.count('src="data:image/png;base64,') == len(images) * (1 + 5)


def test_every_kth_keeps_first_and_last_and_no_dataset_means_no_flips(tmp_path, run_dir,
                                                                      images) -> None:
    status = main(["timeline", str(run_dir), str(images[0]), "--every", "2",
                   "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert status == 0
    document = json.loads((tmp_path / "out" / "timeline.json").read_text())
    files = [c["file"] for c in document["checkpoints"]]
    assert files == ["lightning-last.ckpt", "zz-snapshot.pt", "epoch=3-step=24.pt",
                     "aaa-final.safetensors"]
    assert document["flips"] == [] and all(c["accuracy"] is None for c in
                                           document["checkpoints"])
    assert document["images"][0]["steps"][0]["visualizations"] == []


def test_usage_errors_exit_2_before_any_work(tmp_path, run_dir, images, capsys) -> None:
    assert main(["timeline", str(run_dir), str(images[0]), "--method", "nope",
                 "--out", str(tmp_path / "a")]) == 2
    assert "E_UNKNOWN_VISUALIZATION" in capsys.readouterr().err
    assert main(["timeline", str(run_dir), str(images[0]), "--every", "0",
                 "--out", str(tmp_path / "b")]) == 2
    assert main(["timeline", str(run_dir), str(images[0]), "--target", "mauve",
                 "--out", str(tmp_path / "c"), "--device", "cpu"]) == 2
    assert "E_UNKNOWN_CLASS" in capsys.readouterr().err
    assert main(["timeline", str(run_dir), str(images[0]), "--dataset", str(tmp_path / "none"),
                 "--out", str(tmp_path / "d"), "--device", "cpu", "--json"]) == 2
    assert "E_DATASET_NOT_FOUND" in capsys.readouterr().out
