"""Scale-out on this machine: jobs per second with one and with two ``convscope worker``
processes (one torch thread each), and the latency the broker path adds to a Grad-CAM job
compared with the embedded executor -- all side by side in one run, rounds interleaved.

    python benchmarks/scale.py            # 3 rounds of 8 jobs per cluster, 15 latency pairs
    python benchmarks/scale.py --quick    # 1 round, 5 pairs

Three deployments run at once (each idle while another is measured): a cluster with one worker,
a cluster with two (each with its own redis-server and a gunicorn web process in broker mode),
and a gunicorn server with the embedded executor. Every job gets a new image, so nothing comes
from the result cache. Goals (issue 12): two workers >= 1.7x the throughput of one; the broker
path adds <= 50 ms to a Grad-CAM job's median latency.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.cluster import Cluster  # noqa: E402
from benchmarks.load import gunicorn_server, upload  # noqa: E402

THROUGHPUT_JOB = [{"name": "saliency", "params": {"smoothgrad_samples": 16}}]
LATENCY_JOB = [{"name": "grad_cam"}]
COMMON_ENV = {"CONVSCOPE_UNCERTAINTY": "0"}
_seeds = itertools.count(1000)


def submit(base_url: str, image_id: str, visualizations: list[dict]) -> str:
    response = requests.post(base_url + "/api/v1/jobs", timeout=30, json={
        "model": "latest", "images": [image_id], "visualizations": visualizations,
        "targets": ["predicted"], "faithfulness": False})
    response.raise_for_status()
    return response.json()["id"]


def wait_done(base_url: str, job_ids: list[str], interval: float, timeout: float = 600) -> None:
    pending = set(job_ids)
    deadline = time.monotonic() + timeout
    while pending:
        for job_id in list(pending):
            job = requests.get(f"{base_url}/api/v1/jobs/{job_id}", timeout=30).json()
            if job["status"] in ("failed", "cancelled"):
                raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
            if job["status"] == "done":
                pending.discard(job_id)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(pending)} jobs unfinished after {timeout} s")
        time.sleep(interval)


def throughput(base_url: str, jobs: int) -> float:
    """Jobs per second for a burst of ``jobs`` (images uploaded before the clock starts)."""
    session = requests.Session()
    images = [upload(session, base_url, next(_seeds)) for _ in range(jobs)]
    started = time.monotonic()
    ids = [submit(base_url, image, THROUGHPUT_JOB) for image in images]
    wait_done(base_url, ids, interval=0.1)
    return jobs / (time.monotonic() - started)


def latency_ms(base_url: str) -> float:
    """Submit-to-done of one Grad-CAM job, polled every 5 ms."""
    image = upload(requests.Session(), base_url, next(_seeds))
    started = time.monotonic()
    wait_done(base_url, [submit(base_url, image, LATENCY_JOB)], interval=0.005)
    return (time.monotonic() - started) * 1000


def start_cluster(stack: contextlib.ExitStack, root: Path, workers: int) -> str:
    cluster = stack.enter_context(Cluster(root, env=COMMON_ENV))
    cluster.start_redis()
    cluster.start_workers(workers)
    return cluster.start_web().base_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 round, 5 latency pairs")
    parser.add_argument("--jobs", type=int, default=8, help="jobs per burst (default 8)")
    parser.add_argument("--rounds", type=int, default=None, help="throughput rounds (3)")
    parser.add_argument("--pairs", type=int, default=None, help="latency pairs (15)")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    pairs = args.pairs or (5 if args.quick else 15)

    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="convscope-scale-")))
        one = start_cluster(stack, root / "one", 1)
        two = start_cluster(stack, root / "two", 2)
        data = root / "embedded"
        data.mkdir()
        embedded = stack.enter_context(gunicorn_server(COMMON_ENV, data_dir=data)).base_url
        for base in (one, two, embedded):          # warm-up: model loaded, code paths touched
            throughput(base, 2)

        rates: dict[str, list[float]] = {"1 worker": [], "2 workers": []}
        for number in range(rounds):
            order = [("1 worker", one), ("2 workers", two)]
            for name, base in (order if number % 2 == 0 else order[::-1]):
                rates[name].append(throughput(base, args.jobs))
            print(f"round {number + 1}: " + ", ".join(
                f"{name} {values[-1]:.3f} jobs/s" for name, values in rates.items()))

        latencies: dict[str, list[float]] = {"broker": [], "in-process": []}
        for number in range(pairs):
            order = [("broker", two), ("in-process", embedded)]
            for name, base in (order if number % 2 == 0 else order[::-1]):
                latencies[name].append(latency_ms(base))

    one_rate, two_rate = (statistics.median(rates[k]) for k in ("1 worker", "2 workers"))
    broker, local = (statistics.median(latencies[k]) for k in ("broker", "in-process"))
    print(f"\nthroughput ({args.jobs}-job bursts of {THROUGHPUT_JOB[0]['name']} SmoothGrad 16, "
          f"median of {rounds}): 1 worker {one_rate:.3f} jobs/s, 2 workers {two_rate:.3f} "
          f"jobs/s -> {two_rate / one_rate:.2f}x (goal >= 1.7x)")
    print(f"Grad-CAM job latency (median of {pairs}): broker {broker:.0f} ms, in-process "
          f"{local:.0f} ms -> added {broker - local:+.0f} ms (goal <= 50 ms)")
    ok = two_rate / one_rate >= 1.7 and broker - local <= 50
    print("goals met" if ok else "GOALS MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
