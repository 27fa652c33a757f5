"""Dataset evaluation speed, side by side in one run (prints images/s and ratios).

For N generated JPEGs (ImageNet-like: about 500 x 375 px, quality 90, cut from the demo photos)
in class folders, compares

* the bound: the model's batched forward throughput on pre-decoded, preprocessed tensors
  (channels-last, inference mode, the best of batch sizes 8/16/32, as ``model.predict`` runs
  them) -- decoding costs nothing here;
* convscope's evaluation engine (``app.evaluation.Evaluation``, what ``convscope evaluate`` and
  the server's evaluation jobs run): read, decode, resize and normalize every JPEG on its
  decoding threads while the model runs -- goal: >= 0.8x the bound's images/s;
* the whole ``convscope evaluate`` command (checkpoint load, evaluation, evaluation.json and the
  report with its thumbnails), for the time a user waits.

Rows are interleaved round by round and each keeps its best, so a busy neighbour on the shared
CPU hurts all alike. Also prints the time 10,000 images take at the engine's rate.

    python benchmarks/evaluate_speed.py --quick     # resnet18, 128 images
    python benchmarks/evaluate_speed.py             # resnet50, 128 images
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench_common import build_model, parse_args

ROOT = Path(__file__).resolve().parent.parent
CLASSES = 4
BOUND_BATCH_SIZES = (8, 16, 32)


def write_jpegs(folder: Path, count: int) -> list[Path]:
    """``count`` JPEGs of about 500 x 375 px, random crops of the demo photos, in class folders
    named by class index."""
    rng = np.random.default_rng(0)
    photos = [Image.open(path).convert("RGB")
              for path in sorted((ROOT / "demo" / "images").glob("*.jpg"))]
    written = []
    for number in range(count):
        photo = photos[number % len(photos)]
        scale = rng.uniform(0.6, 1.0)
        width, height = round(photo.width * scale), round(photo.height * scale)
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        crop = photo.crop((left, top, left + width, top + height)).resize((500, 375))
        path = folder / str(number % CLASSES) / f"{number:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        crop.save(path, format="JPEG", quality=90)
        written.append(path)
    return written


def bound_images_per_second(model, tensors: torch.Tensor) -> float:
    """Best batched throughput of ``model.predict`` on ready tensors (channels-last)."""
    from visualizations.common import as_model_input, prepare_model

    prepare_model(model)
    best = 0.0
    for batch_size in BOUND_BATCH_SIZES:
        started = time.perf_counter()
        for start in range(0, len(tensors), batch_size):
            model.predict(as_model_input(tensors[start:start + batch_size]))
        best = max(best, len(tensors) / (time.perf_counter() - started))
    return best


def engine_images_per_second(model, dataset_dir: Path) -> float:
    from app.datasets import match_labels, scan_dataset
    from app.evaluation import Evaluation
    from app.pipeline import ModelIdentity

    labelled = match_labels(scan_dataset(dataset_dir, max_images=10**6), model.meta)
    started = time.perf_counter()
    evaluation = Evaluation(lambda: model, ModelIdentity("0" * 64, "bench"), labelled,
                            num_classes=model.meta.num_classes)
    records = evaluation.run()
    assert len(records) == len(labelled.files)
    return len(records) / (time.perf_counter() - started)


def command_seconds(checkpoints: Path, dataset_dir: Path, out: Path) -> float:
    from app.cli import main as convscope

    started = time.perf_counter()
    status = convscope(["evaluate", str(checkpoints), str(dataset_dir), "--out", str(out)])
    assert status == 0
    return time.perf_counter() - started


def main() -> None:
    parser_args = parse_args(__doc__.splitlines()[0])
    images = 128
    print(f"# evaluate speed: model={parser_args.model} device={parser_args.device} "
          f"threads={parser_args.threads} images={images} torch={torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="convscope-evaluate-bench-"))
    try:
        dataset_dir = work / "dataset"
        paths = write_jpegs(dataset_dir, images)
        checkpoints = work / "checkpoints"
        checkpoints.mkdir()
        model = build_model(parser_args.model, parser_args.device)
        torch.save(model.module.state_dict(), checkpoints / f"{parser_args.model}.pt")
        (checkpoints / "convscope.toml").write_text(
            f'[model]\narchitecture = "{parser_args.model}"\n', encoding="utf-8")

        # The bound's tensors: the same files through the same preprocessing, decoded up front.
        from app.ingest import decode_image

        tensors = torch.cat([model.preprocess([decode_image(path.read_bytes())[0]])
                             for path in paths])
        from app.evaluation import default_workers

        workers = default_workers(parser_args.device.split(":")[0])
        size_kb = sum(path.stat().st_size for path in paths) / len(paths) / 1024
        print(f"# decoding threads={workers}; {len(paths)} JPEGs, {size_kb:.0f} KB each")
        bound = engine = 0.0
        command = float("inf")
        for round_number in range(parser_args.repeats + 1):
            bound = max(bound, bound_images_per_second(model, tensors))
            engine = max(engine, engine_images_per_second(model, dataset_dir))
            if round_number == 0:
                continue        # the first round warms up (allocator, caches, threads)
            command = min(command, command_seconds(checkpoints, dataset_dir, work / "out"))
        print(f"{'model.predict on pre-decoded tensors (bound)':<52s} {bound:8.1f} images/s")
        print(f"{'convscope evaluation engine on the JPEGs':<52s} {engine:8.1f} images/s"
              f"   {engine / bound:5.2f}x   (goal >= 0.8x)")
        print(f"{'convscope evaluate command, whole run':<52s} {images / command:8.1f} images/s"
              f"   {command:6.1f} s for {images} images")
        print(f"# 10,000 images at the engine's rate: {10_000 / engine / 60:.1f} min")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
