"""The evaluation engine's machinery: decoding overlaps the model, the prefetcher stays bounded
and in order, chunk keys change only where files change, and the CLI stays off the job engine."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import app.evaluation as engine
from app.datasets import DatasetFile, DatasetScan, LabelledDataset
from app.evaluation import Evaluation, Prefetcher, plan_chunks
from app.pipeline import ModelIdentity
from tests.datasets.models import CLASS_NAMES, ColourNet
from tests.visualizations.models import wrap
from tests.test_architecture import import_graph, reachable

IDENTITY = ModelIdentity("0" * 64, "f" * 16)


def labelled(paths: list[str], root: Path = Path("/nonexistent")) -> LabelledDataset:
    files = tuple(DatasetFile(path, "red", 100, 1) for path in paths)
    scan = DatasetScan(root, "test", "folders", files, (), ("red",))
    return LabelledDataset(scan, np.zeros(len(files), dtype=np.int64), (0,))


def test_chunk_keys_change_only_around_a_changed_file() -> None:
    paths = [f"red/{number:05d}.png" for number in range(3000)]
    before = plan_chunks(labelled(paths), IDENTITY, 5)
    assert 3000 / engine.CHUNK_EVERY / 3 < len(before) < 3000 / engine.CHUNK_EVERY * 3
    assert all(chunk.stop - chunk.start <= engine.CHUNK_MAX for chunk in before)
    assert [chunk.start for chunk in before[1:]] == [chunk.stop for chunk in before[:-1]]

    added = sorted(paths + ["red/01234-new.png"])
    after = plan_chunks(labelled(added), IDENTITY, 5)
    new_keys = {chunk.key for chunk in after} - {chunk.key for chunk in before}
    assert 1 <= len(new_keys) <= 2          # its chunk (split in two if it is a boundary)

    removed = paths[:100] + paths[101:]
    after = plan_chunks(labelled(removed), IDENTITY, 5)
    assert 1 <= len({chunk.key for chunk in after} - {chunk.key for chunk in before}) <= 2

    other_model = plan_chunks(labelled(paths), ModelIdentity("1" * 64, "f" * 16), 5)
    assert not {chunk.key for chunk in other_model} & {chunk.key for chunk in before}


def test_the_prefetcher_is_ordered_and_bounded() -> None:
    in_flight, most, lock = [0], [0], threading.Lock()
    workers_seen = set()

    def work(item: int) -> int:
        with lock:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        workers_seen.add(threading.current_thread().name)
        time.sleep(0.002 * (item % 3))          # out-of-order completion
        return item * 10

    submitted = []

    def items():
        for number in range(200):
            submitted.append(number)
            yield number

    prefetcher = Prefetcher(items(), work, workers=4, depth=8)
    consumed = []
    for item, result in prefetcher:
        with lock:
            in_flight[0] -= 1
        assert len(submitted) - len(consumed) <= 8 + 1
        consumed.append((item, result))
    prefetcher.close()
    assert consumed == [(number, number * 10) for number in range(200)]
    assert most[0] <= 8 + 1                 # 8 queued ahead, plus the one being consumed
    assert all(name.startswith("convscope-decode") for name in workers_seen)


class SleepyNet(ColourNet):
    """Each forward pass sleeps a fixed time (sleeping needs no CPU, so the timing below holds
    on a busy machine)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.004 * x.shape[0])
        return super().forward(x)


def test_decoding_overlaps_the_model(monkeypatch) -> None:
    """40 images that take 20 ms each to decode and 16 ms each to predict: one after the other
    that is 1.44 s; overlapped, about the larger share (0.8 s on 2+ decoding threads: 0.4 s)."""
    decoded_on = set()

    def slow_decode(model, root, file):
        decoded_on.add(threading.current_thread().name)
        time.sleep(0.02)
        from PIL import Image
        return Image.new("RGB", (32, 32), (200, 30, 30))

    monkeypatch.setattr(engine, "decode_view", slow_decode)
    model = wrap(SleepyNet().eval(), class_names=CLASS_NAMES)
    dataset = labelled([f"red/{number:03d}.png" for number in range(40)])
    evaluation = Evaluation(lambda: model, IDENTITY, dataset, num_classes=5, batch_size=8,
                            workers=2)
    started = time.perf_counter()
    records = evaluation.run()
    elapsed = time.perf_counter() - started
    assert len(records) == 40 and evaluation.computed == 40
    assert decoded_on and all(name.startswith("convscope-decode") for name in decoded_on)
    serial = 40 * 0.02 + 40 * 0.016
    assert elapsed < 0.75 * serial, f"{elapsed:.2f} s: decoding did not overlap the model"


def test_steps_yield_after_every_batch(monkeypatch) -> None:
    from PIL import Image

    monkeypatch.setattr(engine, "decode_view",
                        lambda model, root, file: Image.new("RGB", (32, 32)))
    model = wrap(ColourNet().eval(), class_names=CLASS_NAMES)
    evaluation = Evaluation(lambda: model, IDENTITY, labelled([f"red/{n}.png" for n in range(50)]),
                            num_classes=5, batch_size=8)
    fractions = [evaluation.fraction for _ in evaluation.steps()]
    assert len(fractions) == 7                   # ceil(50 / 8) batches, one turn each
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_the_cli_stays_off_the_job_engine_and_the_web() -> None:
    used = reachable(import_graph(), "app.evaluate_cli")
    assert {"app.evaluation", "app.datasets", "app.pipeline"} <= used
    assert not {module for module in used
                if module.startswith(("app.jobs", "app.views", "app.factory", "app.services"))}
    engine_used = reachable(import_graph(), "app.evaluation")
    assert not {module for module in engine_used if module.startswith(("app.jobs", "app.views"))}


@pytest.mark.gpu
def test_an_evaluation_on_cuda_matches_the_cpu(monkeypatch) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    pictures = {f"red/{n}.png": Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8))
                for n in range(20)}
    monkeypatch.setattr(engine, "decode_view",
                        lambda model, root, file: pictures[file.path])
    net = ColourNet().eval()
    results = []
    for device in ("cpu", "cuda"):
        model = wrap(net, class_names=CLASS_NAMES, device=device)
        dataset = labelled(sorted(pictures))
        results.append(Evaluation(lambda: model, IDENTITY, dataset, num_classes=5).run())
    assert (results[0].top_indices == results[1].top_indices).all()
    np.testing.assert_allclose(results[0].top_probabilities, results[1].top_probabilities,
                               atol=1e-4)
