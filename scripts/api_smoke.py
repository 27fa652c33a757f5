#!/usr/bin/env python3
"""End-to-end check of a running convscope server through its JSON API (standard library only).

    python3 scripts/api_smoke.py http://127.0.0.1:8000 [--method grad_cam] [--timeout 300]

Waits for /api/v1/health and /api/v1/ready, uploads a generated photo-like PNG, runs one job
(the methods given, default grad_cam) on the latest model, waits for it, and checks that every
panel's overlay, heatmap and array URL serves the right kind of file. Prints one line per step
and exits non-zero on the first failure. Used by scripts/container-smoke.
"""
from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from typing import Any

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NPY_MAGIC = b"\x93NUMPY"


class SmokeFailure(Exception):
    pass


def log(message: str) -> None:
    print(f"  api: {message}", flush=True)


def synthetic_png(width: int = 160, height: int = 120) -> bytes:
    """A smooth colour image with a bright disc: enough structure for a heatmap to vary."""
    rows = []
    for y in range(height):
        row = bytearray([0])  # filter: none
        for x in range(width):
            disc = math.hypot(x - width * 0.6, y - height * 0.4) < height * 0.25
            row += bytes((255 if disc else x * 255 // width, y * 255 // height,
                          80 if disc else 160))
        rows.append(bytes(row))

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (struct.pack(">I", len(payload)) + kind + payload
                + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (PNG_MAGIC + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


class Client:
    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout

    def request(self, method: str, path: str, *, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int, dict[str, str], bytes]:
        url = path if path.startswith("http") else self.base_url + path
        request = urllib.request.Request(url, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()

    def json(self, method: str, path: str, payload: Any = None,
             expect: tuple[int, ...] = (200,)) -> Any:
        body = json.dumps(payload).encode() if payload is not None else None
        status, _, data = self.request(method, path, body=body,
                                       content_type="application/json" if body else None)
        if status not in expect:
            raise SmokeFailure(f"{method} {path} answered {status}: {data[:300]!r}")
        return json.loads(data)

    def upload(self, filename: str, data: bytes, content_type: str = "image/png") -> Any:
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
                f"filename=\"{filename}\"\r\nContent-Type: {content_type}\r\n\r\n").encode()
        body += data + f"\r\n--{boundary}--\r\n".encode()
        status, _, answer = self.request("POST", "/api/v1/images", body=body,
                                         content_type=f"multipart/form-data; boundary={boundary}")
        if status != 201:
            raise SmokeFailure(f"upload answered {status}: {answer[:300]!r}")
        return json.loads(answer)


def wait_until(client: Client, path: str, deadline: float) -> None:
    while True:
        try:
            status, _, _ = client.request("GET", path)
            if status == 200:
                return
        except OSError:
            status = None
        if time.monotonic() > deadline:
            raise SmokeFailure(f"{path} did not answer 200 in time (last: {status})")
        time.sleep(0.5)


def run(base_url: str, methods: list[str], timeout: float) -> dict[str, Any]:
    client = Client(base_url)
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    wait_until(client, "/api/v1/health", deadline)
    health = client.json("GET", "/api/v1/health")
    log(f"health {health}")
    wait_until(client, "/api/v1/ready", deadline)
    log(f"ready after {time.monotonic() - started:.1f} s")

    models = client.json("GET", "/api/v1/models")["models"]
    usable = [model for model in models if model.get("ok")]
    if not usable:
        raise SmokeFailure(f"no loadable model: {models}")
    log(f"models: {[(m['file'], m['architecture'], m['num_classes']) for m in models]}")
    known = {v["name"] for v in client.json("GET", "/api/v1/visualizations")["visualizations"]}
    missing = set(methods) - known
    if missing:
        raise SmokeFailure(f"visualizations {sorted(missing)} not offered; known {sorted(known)}")

    uploaded = client.upload("smoke <test>.png", synthetic_png())["images"][0]
    log(f"uploaded image {uploaded['id'][:12]}... {uploaded['width']}x{uploaded['height']}")
    status, headers, stored = client.request("GET", f"/api/v1/images/{uploaded['id']}")
    if status != 200 or not stored.startswith(PNG_MAGIC):
        raise SmokeFailure(f"stored image answered {status}")

    job = client.json("POST", "/api/v1/jobs", {
        "model": "latest", "images": [uploaded["id"]],
        "visualizations": [{"name": name, "params": {}} for name in methods],
        "targets": ["predicted"]}, expect=(202,))
    log(f"job {job['id']} accepted")
    job_started = time.monotonic()
    while True:
        record = client.json("GET", f"/api/v1/jobs/{job['id']}")
        if record["status"] in ("done", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            raise SmokeFailure(f"job still {record['status']} at the deadline")
        time.sleep(0.5)
    if record["status"] != "done":
        raise SmokeFailure(f"job ended {record['status']}: {record.get('error')}")
    log(f"job done in {time.monotonic() - job_started:.1f} s")

    panels = 0
    for result in record["results"]:
        top = (result.get("predictions") or [{}])[0]
        log(f"prediction: {top}")
        for visualization in result["visualizations"]:
            for panel in visualization["panels"]:
                panels += 1
                for key, magic in (("overlay_url", PNG_MAGIC), ("heatmap_url", PNG_MAGIC),
                                   ("array_url", NPY_MAGIC)):
                    status, _, data = client.request("GET", panel[key])
                    if status != 200 or not data.startswith(magic):
                        raise SmokeFailure(f"{visualization['name']} {key} answered {status} "
                                           f"({len(data)} bytes)")
                log(f"{visualization['name']}: panel {panel['title']!r} target {panel['target']} "
                    f"range {panel['value_range']} in {visualization['elapsed_ms']} ms")
    if panels == 0:
        raise SmokeFailure("the job produced no panels")
    return {"panels": panels, "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("--method", action="append", dest="methods", default=None)
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    try:
        summary = run(args.base_url, args.methods or ["grad_cam"], args.timeout)
    except SmokeFailure as failure:
        print(f"  api: FAILED: {failure}", flush=True)
        return 1
    log(f"OK {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
