"""Load test: real gunicorn (gunicorn.conf.py) with the demo model on CPU, many concurrent users.

    .venv/bin/python benchmarks/load.py                     # 16 clients x 120 s
    .venv/bin/python benchmarks/load.py --quick             # 4 clients x 15 s (the test suite)
    .venv/bin/python benchmarks/load.py --clients 32 --duration 300 --methods grad_cam,occlusion

Each client, in a loop: uploads a new image (a quarter of the rounds reuse an earlier one, which
the result cache answers), submits a job with a cheap method (mostly grad_cam/saliency, now and
then a coarse occlusion; 30% of the rounds submit a burst of three so the queue fills), backs off
for ``Retry-After`` on 503 ``E_BUSY``, polls its jobs to the end and fetches one result file.
Traffic goes only to 127.0.0.1.

Before the clock starts, one job runs every method of the mix once (each method's first run
grows the heap to its working size). Pass criteria (printed, and the exit status): no 5xx other
than 503 E_BUSY carrying Retry-After, no connection errors, every accepted job ends "done", the
server answers health at the end, and the workers' heap at rest does not grow: their anonymous
resident memory (RssAnon from /proc: the heap, where a leak shows) with no job running, after
the warm-up and again after the last job, differs by less than ``--rss-tolerance-mb``. At rest,
because while jobs run the heap moves by the size of their batches (SmoothGrad's reach 1 GB
above the floor) and a window of a short run may never see the floor. File-backed resident
memory (shared libraries paged in as code paths are first used) is printed but not judged: on a
cold page cache it grows for a while without any leak.

``--per-method`` instead runs one job per method, one after another, and checks that the heap at
rest returns to within 15 % of its level after the warm-up after each of them (every method at
its defaults, faithfulness scores included).

``--broker N`` runs the same traffic against broker mode: a redis-server, N ``convscope worker``
processes and two gunicorn web processes (benchmarks/cluster.py); the memory judged is then the
workers'.

``--quick`` (the test suite) is 4 clients x 15 s of the cheap mix: plain gradients instead of
SmoothGrad and no faithfulness scores, so that it tests the service, not the arithmetic.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import io
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import requests

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:       # run as a script: benchmarks.cluster for --broker
    sys.path.insert(0, str(ROOT))
TERMINAL = ("done", "failed", "cancelled")


# --- a real gunicorn server --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class GunicornServer:
    """gunicorn with the project's gunicorn.conf.py on a free loopback port."""

    process: subprocess.Popen
    base_url: str
    log_path: Path

    @property
    def master_pid(self) -> int:
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """Live worker processes (children of the master), from /proc."""
        children = Path(f"/proc/{self.master_pid}/task/{self.master_pid}/children")
        try:
            return [int(pid) for pid in children.read_text().split()]
        except OSError:
            return []

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n"
                                   f"{self.log()[-3000:]}")
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.base_url + "/api/v1/ready", timeout=2).status_code == 200:
                    return
            time.sleep(0.25)
        raise RuntimeError(f"gunicorn not ready after {timeout} s:\n{self.log()[-3000:]}")

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as a container stop does; SIGKILL if it overstays ``timeout``."""
        return terminate(self.process, timeout)


def terminate(process: subprocess.Popen, timeout: float) -> int:
    """SIGTERM, then SIGKILL if the process overstays ``timeout``; its exit status."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def gunicorn_server(env: dict[str, str] | None = None, *, data_dir: Path | None = None,
                    ready_timeout: float = 90.0,
                    extra_args: list[str] | None = None) -> Iterator[GunicornServer]:
    """Start gunicorn (demo model unless env names a checkpoint dir) and stop it afterwards.

    ``extra_args`` go after ``--config gunicorn.conf.py`` (command-line settings win), e.g. to
    compare another worker class with the shipped one."""
    with contextlib.ExitStack() as stack:
        port = free_port()
        if data_dir is None:
            # One temporary root for the data and the log, so both go when the server does.
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="convscope-")))
            data_dir, log_path = root / "data", root / f"gunicorn-{port}.log"
            data_dir.mkdir()
        else:
            # A caller's data dir is the app's alone: the log goes beside it.
            log_path = data_dir.parent / f"gunicorn-{port}.log"
        # glibc's settings as the image sets them (Dockerfile): read at process start.
        environ = {**MALLOC_SETTINGS, **os.environ, "CONVSCOPE_BIND": f"127.0.0.1:{port}",
                   "CONVSCOPE_DATA_DIR": str(data_dir), "CONVSCOPE_DEVICE": "cpu",
                   "CONVSCOPE_ACCESS_LOG": "0", "CONVSCOPE_TORCH_THREADS":
                   os.environ.get("CONVSCOPE_TORCH_THREADS", "1"), **(env or {})}
        log_file = stack.enter_context(open(log_path, "wb"))
        process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py"),
             *(extra_args or [])],
            cwd=ROOT, env=environ, stdout=log_file, stderr=subprocess.STDOUT)
        server = GunicornServer(process, f"http://127.0.0.1:{port}", log_path)
        try:
            server.wait_ready(ready_timeout)
            yield server
        finally:
            server.stop()


@dataclass
class BrokerDeployment:
    """Broker mode (benchmarks/cluster.py) seen as one server: requests go to the web
    processes, memory is read from the ``convscope worker`` processes, which run the jobs."""

    cluster: Any
    base_url: str

    def worker_pids(self) -> list[int]:
        return [worker.pid for worker in self.cluster.workers if worker.alive]

    def log(self) -> str:
        from benchmarks.cluster import iter_logs

        return "\n".join(iter_logs(self.cluster))


@contextlib.contextmanager
def broker_deployment(workers: int, env: dict[str, str]) -> Iterator[BrokerDeployment]:
    from benchmarks.cluster import Cluster

    with tempfile.TemporaryDirectory(prefix="convscope-broker-") as root, \
            Cluster(Path(root), env=env) as cluster:
        cluster.start_redis()
        cluster.start_workers(workers)
        web = cluster.start_web(env={"CONVSCOPE_WORKERS": "2"})
        yield BrokerDeployment(cluster, web.base_url)


MEMORY_FIELDS = ("RssAnon", "RssFile")


def memory_kib(pid: int) -> dict[str, int] | None:
    """Resident anonymous (heap: where a leak shows) and file-backed KiB of one process.

    File-backed pages are shared libraries and files mapped in as code paths are first touched;
    on a cold page cache they keep arriving for a while, which is not a leak.
    """
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return None
    sizes = {name: int(line.split()[1]) for line in lines
             for name in MEMORY_FIELDS if line.startswith(name + ":")}
    return sizes if len(sizes) == len(MEMORY_FIELDS) else None


# --- traffic -------------------------------------------------------------------------------

def make_image(seed: int) -> bytes:
    """A distinct smallish photo-like JPEG per seed (so results are not all cache hits)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(180, 400)), int(rng.integers(180, 400))
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * rng.uniform(0.2, 1.0)) % 256, (y * rng.uniform(0.2, 1.0)) % 256,
                     ((x + y) * rng.uniform(0.1, 0.5)) % 256], axis=-1)
    noise = rng.normal(0, 12, base.shape)
    pixels = np.clip(base + noise, 0, 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


# The image's allocator settings (Dockerfile, README "Deployment settings").
MALLOC_SETTINGS = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "33554432",
                   "MALLOC_TRIM_THRESHOLD_": "4194304"}


# method name, params, weight: cheap methods dominate; a coarse occlusion now and then.
DEFAULT_MIX = [
    ("grad_cam", {}, 6),
    ("saliency", {}, 3),
    ("occlusion", {"window": 56, "stride": 56}, 1),
]
# The suite's quick run: the same shape of traffic at a fraction of the arithmetic.
QUICK_MIX = [
    ("grad_cam", {}, 6),
    ("saliency", {"smoothgrad_samples": 0}, 3),
    ("occlusion", {"window": 56, "stride": 56}, 1),
]
# Every method at its defaults, for --per-method.
PER_METHOD_DEFAULT = ("saliency", "integrated_gradients", "occlusion", "partial_occlusion",
                      "cam", "grad_cam", "guided_grad_cam", "adversarial")
PER_METHOD_TOLERANCE = 0.15     # of the heap at rest after the warm-up


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: collections.Counter = field(default_factory=collections.Counter)
    bad: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    outcomes: collections.Counter = field(default_factory=collections.Counter)
    job_seconds: list[float] = field(default_factory=list)

    def record(self, what: str, response: requests.Response) -> None:
        with self.lock:
            self.statuses[(what, response.status_code)] += 1
            if response.status_code >= 500:
                code = _error_code(response)
                if response.status_code == 503 and code == "E_BUSY":
                    if not response.headers.get("Retry-After"):
                        self.bad.append(f"{what}: 503 E_BUSY without Retry-After")
                else:
                    self.bad.append(f"{what}: {response.status_code} {code} "
                                    f"{response.text[:200]!r}")

    def problem(self, message: str) -> None:
        with self.lock:
            self.bad.append(message)


def _error_code(response: requests.Response) -> str | None:
    try:
        return response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


class Client(threading.Thread):
    def __init__(self, number: int, base_url: str, deadline: float, tally: Tally,
                 mix: list[tuple[str, dict, int]], seed: int, faithfulness: bool) -> None:
        super().__init__(name=f"client-{number}", daemon=True)
        self.number, self.base_url, self.deadline, self.tally = number, base_url, deadline, tally
        self.mix, self.faithfulness = mix, faithfulness
        self.random = random.Random(seed)
        self.session = requests.Session()
        self.uploaded: list[str] = []

    def call(self, what: str, method: str, path: str, **kwargs: Any) -> requests.Response | None:
        try:
            response = self.session.request(method, self.base_url + path, timeout=60, **kwargs)
        except requests.RequestException as error:
            self.tally.problem(f"{what}: {type(error).__name__}: {str(error)[:200]}")
            return None
        self.tally.record(what, response)
        return response

    def idle(self, seconds: float) -> None:
        """Sleep; for a second or more, drop pooled connections first. gunicorn closes idle
        keep-alive connections after ``keepalive`` seconds (5), and a request sent on one just
        as it closes meets a reset -- browsers then retry, requests does not. A client (or
        proxy) must not reuse a connection idle that long, so neither does this one."""
        if seconds >= 1.0:
            self.session.close()
        time.sleep(seconds)

    def run(self) -> None:
        iteration = 0
        while time.monotonic() < self.deadline:
            iteration += 1
            self.one_round(iteration)

    def one_round(self, iteration: int) -> None:
        if self.uploaded and self.random.random() < 0.25:
            image_id = self.random.choice(self.uploaded)       # a repeat: the cache answers
        else:
            data = make_image(self.number * 100_000 + iteration)
            response = self.call("upload", "POST", "/api/v1/images",
                                 files={"image": (f"client{self.number}-{iteration}.jpg", data,
                                                  "image/jpeg")})
            if response is None or response.status_code != 201:
                self.idle(1)
                return
            image_id = response.json()["images"][0]["id"]
            self.uploaded.append(image_id)
        # Usually one job; sometimes a burst of three (a user submitting several at once), so
        # the queue really fills and the 503 E_BUSY path is exercised.
        burst = 3 if self.random.random() < 0.3 else 1
        submitted, busy_for = [], 0.0
        for _ in range(burst):
            name, params, _ = self.random.choices(self.mix, weights=[m[2] for m in self.mix])[0]
            response = self.call("submit", "POST", "/api/v1/jobs", json={
                "model": "latest", "images": [image_id],
                "visualizations": [{"name": name, "params": params}],
                "targets": ["predicted"], "faithfulness": self.faithfulness})
            if response is None:
                busy_for = 1.0
                break
            if response.status_code == 503:
                busy_for = float(response.headers.get("Retry-After") or 5)
                break
            if response.status_code != 202:
                self.tally.problem(f"submit: unexpected {response.status_code} "
                                   f"{response.text[:200]!r}")
                break
            submitted.append(response.json()["id"])
        with self.tally.lock:
            self.tally.accepted.extend(submitted)
        for job_id in submitted:
            self.follow(job_id)
        if busy_for:
            # Honour Retry-After, with jitter so clients do not return in lock-step.
            self.idle(min(busy_for * self.random.uniform(0.5, 1.0),
                          max(0.0, self.deadline - time.monotonic())))

    def follow(self, job_id: str, patience: float = 180.0) -> None:
        started = time.monotonic()
        while time.monotonic() - started < patience:
            response = self.call("poll", "GET", f"/api/v1/jobs/{job_id}")
            if response is None or response.status_code != 200:
                self.idle(1)
                continue
            record = response.json()
            if record["status"] in TERMINAL:
                with self.tally.lock:
                    self.tally.outcomes[record["status"]] += 1
                    self.tally.job_seconds.append(time.monotonic() - started)
                if record["status"] != "done":
                    self.tally.problem(f"job {job_id} ended {record['status']}: "
                                       f"{record.get('error')}")
                else:
                    self.fetch_one_result(record)
                return
            time.sleep(0.5)
        self.tally.problem(f"job {job_id} did not finish within {patience} s")
        with self.tally.lock:
            self.tally.outcomes["unfinished"] += 1

    def fetch_one_result(self, record: dict) -> None:
        for result in record.get("results", []):
            for visualization in result.get("visualizations", []):
                for panel in visualization.get("panels", []):
                    response = self.call("result file", "GET", panel["overlay_url"])
                    if response is not None and response.status_code != 200:
                        self.tally.problem(f"overlay {response.status_code}")
                    return


class RssSampler(threading.Thread):
    def __init__(self, server: GunicornServer, interval: float = 0.5) -> None:
        super().__init__(name="rss", daemon=True)
        self.server, self.interval = server, interval
        # (t, {field: KiB summed over workers}, pids)
        self.samples: list[tuple[float, dict[str, int], tuple[int, ...]]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        started = time.monotonic()
        while not self.stopped.wait(self.interval):
            pids = tuple(self.server.worker_pids())
            sizes = [size for size in map(memory_kib, pids) if size]
            if not pids or len(sizes) < len(pids):
                continue        # a worker unreadable this instant: a partial sum is no floor
            totals = {name: sum(size[name] for size in sizes) for name in MEMORY_FIELDS}
            self.samples.append((time.monotonic() - started, totals, pids))


def upload(session: requests.Session, base_url: str, seed: int) -> str:
    response = session.post(base_url + "/api/v1/images", timeout=60, files={
        "image": (f"image-{seed}.jpg", make_image(seed), "image/jpeg")})
    response.raise_for_status()
    return response.json()["images"][0]["id"]


def run_job(session: requests.Session, base_url: str, image_id: str,
            visualizations: list[dict[str, Any]], faithfulness: bool,
            timeout: float = 600.0) -> float:
    """Submit one job and wait for it to end "done"; returns its seconds."""
    started = time.monotonic()
    submit = session.post(base_url + "/api/v1/jobs", timeout=60, json={
        "model": "latest", "images": [image_id], "visualizations": visualizations,
        "targets": ["predicted"], "faithfulness": faithfulness})
    submit.raise_for_status()
    job_url = f"{base_url}/api/v1/jobs/{submit.json()['id']}"
    while time.monotonic() - started < timeout:
        record = session.get(job_url, timeout=60).json()
        if record["status"] in TERMINAL:
            if record["status"] != "done":
                raise RuntimeError(f"job {record['id']} ended {record['status']}: "
                                   f"{record.get('error')}")
            return time.monotonic() - started
        time.sleep(0.2)
    raise RuntimeError(f"a job did not finish within {timeout:.0f} s")


def warm_up(base_url: str, mix: list[tuple[str, dict, int]], faithfulness: bool) -> float:
    """Run one job with every method of the mix before the clock starts; returns its seconds.

    Each method's first run grows the heap to its working size (batch buffers, allocator pools);
    without this a method first picked late in a short run looks like a leak.
    """
    session = requests.Session()
    image_id = upload(session, base_url, 2**31 - 1)      # a seed no client uses
    return run_job(session, base_url, image_id,
                   [{"name": name, "params": params} for name, params, _ in mix], faithfulness)


def heap_at_rest_mb(server: GunicornServer, settle: float = 1.5, span: float = 2.0) -> float:
    """The workers' anonymous resident memory (MB) with no job running: the lowest of a few
    samples taken after ``settle`` seconds, so a step's buffers still being freed don't count."""
    time.sleep(settle)
    readings = []
    deadline = time.monotonic() + span
    while time.monotonic() < deadline:
        sizes = [memory_kib(pid) for pid in server.worker_pids()]
        if sizes and all(sizes):
            readings.append(sum(size["RssAnon"] for size in sizes) / 1024)
        time.sleep(0.25)
    if not readings:
        raise RuntimeError("no worker's memory could be read")
    return min(readings)


def run_load(server: GunicornServer, *, clients: int, duration: float,
             mix: list[tuple[str, dict, int]], faithfulness: bool, rss_tolerance_mb: float,
             drain_timeout: float = 180.0) -> dict[str, Any]:
    warm_up_seconds = warm_up(server.base_url, mix, faithfulness)
    rest_before = heap_at_rest_mb(server)
    tally = Tally()
    sampler = RssSampler(server)
    sampler.start()
    started = time.monotonic()
    deadline = started + duration
    threads = [Client(number, server.base_url, deadline, tally, mix, seed=number,
                      faithfulness=faithfulness) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:   # clients stop submitting at the deadline, then follow their jobs
        thread.join(duration + drain_timeout)
    elapsed = time.monotonic() - started
    sampler.stopped.set()
    sampler.join()
    rest_after = heap_at_rest_mb(server)    # every client has followed its jobs to the end
    health = requests.get(server.base_url + "/api/v1/health", timeout=10).status_code

    samples = sampler.samples
    pid_sets = {pids for _, _, pids in samples if pids}
    anon_peak = max((sizes["RssAnon"] for _, sizes, _ in samples), default=0) / 1024
    file_sizes = [sizes["RssFile"] / 1024 for _, sizes, _ in samples]
    growth = rest_after - rest_before
    busy = sum(count for (what, status), count in tally.statuses.items()
               if what == "submit" and status == 503)
    accepted = len(tally.accepted)
    checks = {
        "no 5xx except 503 E_BUSY with Retry-After, no connection errors": not tally.bad,
        "every accepted job done": accepted > 0 and tally.outcomes["done"] == accepted,
        "health answers at the end": health == 200,
        "same workers throughout (none crashed)": len(pid_sets) == 1,
        f"worker heap at rest (RssAnon) flat after warm-up (growth < {rss_tolerance_mb:.0f} MB)":
            growth < rss_tolerance_mb,
    }
    return {
        "clients": clients, "duration_s": duration, "elapsed_s": round(elapsed, 1),
        "warm_up_s": round(warm_up_seconds, 1),
        "requests": sum(tally.statuses.values()),
        "statuses": {f"{what} {status}": count
                     for (what, status), count in sorted(tally.statuses.items())},
        "jobs_accepted": accepted, "jobs_busy_503": busy, "job_outcomes": dict(tally.outcomes),
        "job_seconds_median": round(statistics.median(tally.job_seconds), 2)
        if tally.job_seconds else None,
        "jobs_per_minute": round(tally.outcomes["done"] / elapsed * 60, 1),
        "anon_mb_after_warmup": round(rest_before, 1), "anon_mb_end": round(rest_after, 1),
        "anon_mb_peak": round(anon_peak, 1), "anon_growth_mb": round(growth, 1),
        "file_mb_start": round(file_sizes[0], 1) if file_sizes else None,
        "file_mb_end": round(file_sizes[-1], 1) if file_sizes else None,
        "problems": tally.bad[:20], "problem_count": len(tally.bad),
        "checks": checks, "ok": all(checks.values()),
    }


def print_summary(summary: dict[str, Any]) -> None:
    print(f"load test: {summary['clients']} clients x {summary['duration_s']:.0f} s "
          f"(elapsed {summary['elapsed_s']} s, {summary['requests']} requests; before it, "
          f"one warm-up job with every method took {summary['warm_up_s']} s)")
    for key, count in summary["statuses"].items():
        print(f"  {key:<22} {count}")
    print(f"  jobs: {summary['jobs_accepted']} accepted, {summary['jobs_busy_503']} refused "
          f"busy (503 E_BUSY), outcomes {summary['job_outcomes']}, median "
          f"{summary['job_seconds_median']} s from submit to end, "
          f"{summary['jobs_per_minute']} done/min")
    print(f"  worker heap at rest (RssAnon): {summary['anon_mb_after_warmup']} MB after warm-up "
          f"-> {summary['anon_mb_end']} MB after the last job (growth "
          f"{summary['anon_growth_mb']} MB; peak under load {summary['anon_mb_peak']} MB)")
    print(f"  worker file-backed memory (RssFile: libraries, mapped files): "
          f"{summary['file_mb_start']} MB at the start -> {summary['file_mb_end']} MB")
    for problem in summary["problems"]:
        print(f"  problem: {problem}")
    for name, passed in summary["checks"].items():
        print(f"  [{'PASS' if passed else 'FAIL'}] {name}")
    print("RESULT:", "OK" if summary["ok"] else "FAILED")


def run_per_method(server: GunicornServer, methods: list[str],
                   tolerance: float = PER_METHOD_TOLERANCE) -> bool:
    """One job per method at its defaults, one after another: after each, the heap at rest must
    be back within ``tolerance`` of where it was after the warm-up (what a long-lived worker keeps
    after a job). Prints a line per method; returns whether every one passed."""
    session = requests.Session()
    image_id = upload(session, server.base_url, 2**31 - 2)
    # The warm-up: every method once, so each has grown the heap to its working size.
    seconds = run_job(session, server.base_url, image_id,
                      [{"name": name, "params": {}} for name in methods], faithfulness=True)
    floor = heap_at_rest_mb(server)
    print(f"warm-up job with {len(methods)} methods: {seconds:.1f} s; heap at rest after it: "
          f"{floor:.0f} MB (each method must come back within {tolerance:.0%}: "
          f"{floor * (1 + tolerance):.0f} MB)")
    passed = True
    sampler = RssSampler(server)
    sampler.start()
    for number, name in enumerate(methods):
        first_sample = len(sampler.samples)
        image_id = upload(session, server.base_url, 2**30 + number)     # a new image: no cache
        seconds = run_job(session, server.base_url, image_id, [{"name": name, "params": {}}],
                          faithfulness=True)
        rest = heap_at_rest_mb(server)
        peak = max((sizes["RssAnon"] / 1024 for _, sizes, _ in sampler.samples[first_sample:]),
                   default=rest)
        ok = rest <= floor * (1 + tolerance)
        passed &= ok
        print(f"  [{'PASS' if ok else 'FAIL'}] {name:<22} {seconds:6.1f} s   peak {peak:6.0f} MB"
              f"   at rest after it {rest:6.0f} MB ({(rest - floor) / floor:+.1%})", flush=True)
    sampler.stopped.set()
    sampler.join()
    print("RESULT:", "OK" if passed else "FAILED")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    parser.add_argument("--quick", action="store_true",
                        help="4 clients x 15 s of the cheap mix (the test suite)")
    parser.add_argument("--methods", default=None,
                        help="comma-separated methods (at their defaults) instead of the mix")
    parser.add_argument("--no-faithfulness", action="store_true",
                        help="jobs without faithfulness scores (the default with --quick)")
    parser.add_argument("--per-method", action="store_true",
                        help="one job per method instead of traffic: the heap at rest must come "
                             f"back within {PER_METHOD_TOLERANCE:.0%} after each")
    parser.add_argument("--rss-tolerance-mb", type=float, default=64.0)
    parser.add_argument("--checkpoint-dir", default=None, help="default: the bundled demo")
    parser.add_argument("--server-log", default=None, help="copy gunicorn's log here")
    parser.add_argument("--broker", type=int, default=0, metavar="N",
                        help="broker mode: a redis-server, N `convscope worker` processes and "
                             "two gunicorn web processes sharing the data directory; memory is "
                             "judged on the workers")
    parser.add_argument("--gunicorn-args", default="",
                        help="extra gunicorn arguments after the config file, e.g. to compare "
                             "\"--worker-class gthread --threads 8 app:create_app()\"")
    args = parser.parse_args(argv)
    mix, faithfulness = DEFAULT_MIX, not args.no_faithfulness
    if args.quick:
        args.clients, args.duration, mix, faithfulness = 4, 15.0, QUICK_MIX, False
    if args.methods:
        mix = [(name, {}, 1) for name in args.methods.split(",")]
    env = {"CONVSCOPE_CHECKPOINT_DIR": args.checkpoint_dir} if args.checkpoint_dir else {}
    started = time.monotonic()
    deployment = (broker_deployment(args.broker, env) if args.broker else
                  gunicorn_server(env, extra_args=shlex.split(args.gunicorn_args)))
    with deployment as server:
        print(f"ready at {server.base_url} in {time.monotonic() - started:.1f} s "
              f"(workers {server.worker_pids()})", flush=True)
        if args.per_method:
            methods = args.methods.split(",") if args.methods else list(PER_METHOD_DEFAULT)
            return 0 if run_per_method(server, methods) else 1
        summary = run_load(server, clients=args.clients, duration=args.duration, mix=mix,
                           faithfulness=faithfulness, rss_tolerance_mb=args.rss_tolerance_mb)
        if args.server_log:
            Path(args.server_log).write_text(server.log())
    print_summary(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
