"""Memory of a timeline: one run over N resnet50 checkpoints against a run over one.

Writes N random-weight resnet50 checkpoints (each ``{"epoch": n, "state_dict": ...}``, about
100 MB) into a temporary directory, then runs ``convscope timeline`` (Grad-CAM on one image) in
a fresh process twice -- over the first checkpoint alone and over all N -- and prints each
process's peak RSS, their difference in units of one model's weights, and the time per
checkpoint. A timeline loads checkpoints one at a time, so the difference should stay under two
models' weights however large N is.

    python benchmarks/timeline_memory.py             # 30 resnet50 checkpoints (~3 GB on disk)
    python benchmarks/timeline_memory.py --quick     # 6 resnet18 checkpoints
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
from app.cli import main
started = time.perf_counter()
status = main(sys.argv[1:])
elapsed = time.perf_counter() - started
print(json.dumps({{"status": status, "seconds": elapsed,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def write_checkpoints(directory: Path, architecture: str, count: int) -> int:
    """``count`` checkpoints of random weights; returns one model's weight bytes."""
    import torch
    import torchvision

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "convscope.toml").write_text(f'[model]\narchitecture = "{architecture}"\n')
    weight_bytes = 0
    for epoch in range(count):
        torch.manual_seed(epoch)
        module = torchvision.models.get_model(architecture, weights=None)
        state = module.state_dict()
        weight_bytes = sum(t.numel() * t.element_size() for t in state.values())
        torch.save({"epoch": epoch, "state_dict": state}, directory / f"ckpt-{epoch:03d}.pt")
        del module, state
    return weight_bytes


def run_timeline(directory: Path, image: Path, out: Path, threads: int) -> dict:
    env = {**os.environ, "CONVSCOPE_TORCH_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, "-c", _CHILD.format(root=str(ROOT)), "timeline", str(directory),
               str(image), "--method", "grad_cam", "--device", "cpu", "--out", str(out)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        raise SystemExit(f"timeline failed:\n{result.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=None, help="checkpoints (default 30)")
    parser.add_argument("--model", default=None, help="torchvision architecture")
    parser.add_argument("--quick", action="store_true", help="6 resnet18 checkpoints")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    architecture = args.model or ("resnet18" if args.quick else "resnet50")
    count = args.count or (6 if args.quick else 30)

    with tempfile.TemporaryDirectory(prefix="convscope-timeline-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        weight_bytes = write_checkpoints(root / "all", architecture, count)
        print(f"wrote {count} {architecture} checkpoints ({weight_bytes / 2**20:.0f} MB of "
              f"weights each) in {time.perf_counter() - started:.0f} s")
        (root / "one").mkdir()
        shutil.copy(root / "all" / "convscope.toml", root / "one")
        os.link(root / "all" / "ckpt-000.pt", root / "one" / "ckpt-000.pt")
        image = ROOT / "demo" / "images" / "chelsea.jpg"
        single = run_timeline(root / "one", image, root / "out-one", args.threads)
        many = run_timeline(root / "all", image, root / "out-all", args.threads)
    model_mb = weight_bytes / 2**20
    grown = many["peak_rss_mb"] - single["peak_rss_mb"]
    print(f"peak RSS, 1 checkpoint:  {single['peak_rss_mb']:8.0f} MB ({single['seconds']:.1f} s)")
    print(f"peak RSS, {count} checkpoints: {many['peak_rss_mb']:7.0f} MB "
          f"({many['seconds']:.1f} s, {many['seconds'] / count:.2f} s per checkpoint)")
    print(f"difference: {grown:.0f} MB = {grown / model_mb:.2f} x one model's weights "
          f"({model_mb:.0f} MB); must stay under 2.00")
    if grown >= 2 * model_mb:
        raise SystemExit("FAIL: the timeline held more than one extra model")


if __name__ == "__main__":
    main()
