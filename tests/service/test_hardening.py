"""Issue 13's findings, case by case, against real servers: gunicorn with the shipped config in
production mode with a token (items 5, 6 and 8, and item 2's messages and per-request limit),
gunicorn on a full disk, and the ``convscope serve`` dev server."""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from app import __version__
from benchmarks.load import ROOT, free_port, gunicorn_server
from tests.service import images
from tests.service.conftest import bearer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def base_url(auth_servers) -> str:
    return auth_servers.main.base_url


def post_json(base_url: str, body: bytes | str, content_type: str = "application/json"):
    data = body.encode() if isinstance(body, str) else body
    return requests.post(base_url + "/api/v1/jobs", data=data, timeout=30,
                         headers={**bearer(), "Content-Type": content_type})


def upload(base_url: str, *files: tuple[str, bytes]) -> requests.Response:
    return requests.post(base_url + "/api/v1/images", headers=bearer(), timeout=60,
                         files=[("image", (name, data)) for name, data in files])


def error_of(response: requests.Response) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert re.fullmatch(r"E_[A-Z_]+", error["code"]) and error["message"]
    assert len(response.text) < 2000, "the error echoes the request"
    return error


# --- item 5: any JSON body gets a 4xx with a code -------------------------------------------

JSON_BODIES = {
    "1000 nested arrays": ("[" * 1000 + "]" * 1000, 400, "E_BAD_REQUEST"),
    "900 nested arrays": ("[" * 900 + "]" * 900, 400, "E_BAD_REQUEST"),
    "100000 unclosed brackets": ("[" * 100_000, 400, "E_BAD_REQUEST"),
    "nesting inside a field": ('{"model": ' + "{\"a\": " * 800 + "1" + "}" * 800 + "}", 400,
                               "E_BAD_REQUEST"),
    "brackets inside strings are fine": ('{"model": "' + "[" * 5000 + '"}', 404,
                                         "E_UNKNOWN_MODEL"),
    "not UTF-8": (b'{"model": "\xff\xfe"}', 400, "E_BAD_REQUEST"),
    "truncated": ('{"model": "latest", "images": [', 400, "E_BAD_REQUEST"),
    "empty": ("", 400, "E_BAD_REQUEST"),
    "null": ("null", 400, "E_BAD_REQUEST"),
    "NaN": ("NaN", 400, "E_BAD_REQUEST"),
    "a 5000-digit number": ('{"model": ' + "9" * 5000 + "}", 400, "E_BAD_REQUEST"),
    "2 MB of JSON": ('{"model": "' + "x" * (2 * 1024 * 1024) + '"}', 413,
                     "E_PAYLOAD_TOO_LARGE"),
    "not JSON at all": ("model=latest", 415, "E_UNSUPPORTED_MEDIA_TYPE"),
}


@pytest.mark.parametrize("case", JSON_BODIES, ids=list(JSON_BODIES))
def test_any_job_body_gets_a_4xx_with_a_code(base_url, case):
    body, status, code = JSON_BODIES[case]
    content_type = "text/plain" if case == "not JSON at all" else "application/json"
    response = post_json(base_url, body, content_type)
    assert response.status_code == status, response.text[:300]
    assert error_of(response)["code"] == code


# --- item 8: unknown keys, non-ASCII digits, huge numbers -----------------------------------

@pytest.fixture(scope="module")
def image_id(base_url) -> str:
    response = upload(base_url, ("photo.png", images.encode(images.noise((64, 64)), "PNG")))
    assert response.status_code == 201, response.text
    return response.json()["images"][0]["id"]


JOB_CASES = {
    "unknown top-level key": ({"visualisations": []}, "E_BAD_REQUEST", "visualisations"),
    "unknown key in a visualization": (
        {"visualizations": [{"name": "occlusion", "param": {"window": 8}}]},
        "E_BAD_REQUEST", "param"),
    "extra key beside params": (
        {"visualizations": [{"name": "grad_cam", "params": {}, "layer": "x"}]},
        "E_BAD_REQUEST", "layer"),
    "unknown parameter": ({"visualizations": [{"name": "occlusion", "params": {"size": 8}}]},
                          "E_BAD_PARAMETER", "size"),
    "Arabic-Indic digits": (
        {"visualizations": [{"name": "occlusion", "params": {"window": "\u0661\u0666"}}]},
        "E_BAD_PARAMETER", "window"),
    "fullwidth digits": (
        {"visualizations": [{"name": "occlusion", "params": {"window": "\uff11\uff16"}}]},
        "E_BAD_PARAMETER", "window"),
    "Devanagari digits in a float": (
        {"visualizations": [{"name": "saliency", "params": {"smoothgrad_noise": "\u0966.\u0968"}}]},
        "E_BAD_PARAMETER", "smoothgrad_noise"),
    "a 4000-digit integer": (
        {"visualizations": [{"name": "occlusion", "params": {"window": int("9" * 4000)}}]},
        "E_BAD_PARAMETER", "window"),
}


@pytest.mark.parametrize("case", JOB_CASES, ids=list(JOB_CASES))
def test_job_requests_are_refused_naming_the_field(base_url, image_id, case):
    fields, code, named = JOB_CASES[case]
    body = {"model": "latest", "images": [image_id],
            "visualizations": [{"name": "grad_cam"}], **fields}
    response = post_json(base_url, json.dumps(body))
    error = error_of(response)
    assert error["code"] == code, error
    assert named in error["message"] or any(named in key for key in error.get("fields", {}))
    assert "9999999999" not in response.text


def test_ascii_digits_still_work(base_url, image_id):
    response = post_json(base_url, json.dumps({
        "model": "latest", "images": [image_id],
        "visualizations": [{"name": "occlusion", "params": {"window": " 56 ", "stride": "56"}}]}))
    assert response.status_code == 202, response.text


# --- item 8: no versions for outsiders ---------------------------------------------------------

def test_outsiders_see_no_version_and_no_queue_length(base_url):
    login = requests.get(base_url + "/login", timeout=10)
    assert login.status_code == 200 and __version__ not in login.text
    health = requests.get(base_url + "/api/v1/health", timeout=10)
    assert health.json() == {"status": "ok"}
    ready = requests.get(base_url + "/api/v1/ready", timeout=10)
    assert ready.json() == {"status": "ready"}
    for response in (login, health, ready):
        assert not re.search(r"\d+\.\d+", response.headers.get("Server", "")), response.headers


def test_signed_in_users_still_see_the_version(base_url):
    from tests.service.conftest import sign_in

    page = sign_in(base_url).get(base_url + "/", timeout=10)
    assert f"convscope {__version__}" in page.text


def test_the_dev_server_sends_no_software_versions(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CONVSCOPE_DATA_DIR": str(tmp_path),
           "CONVSCOPE_DEVICE": "cpu"}
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        response = _wait_for(f"http://127.0.0.1:{port}/api/v1/health")
        page = requests.get(f"http://127.0.0.1:{port}/", timeout=10)
    finally:
        process.terminate()
        process.wait(30)
    for answer in (response, page):
        server = answer.headers.get("Server", "")
        assert "Werkzeug" not in server and "Python" not in server, server
        assert not re.search(r"\d+\.\d+", server), server


def _wait_for(url: str, timeout: float = 90) -> requests.Response:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            response = requests.get(url, timeout=2)
            if response.status_code == 200:
                return response
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} did not answer")


# --- item 6: nothing but pixels survives ingest; the same file always gets the same id -------

RED = Image.new("RGB", (40, 32), (255, 0, 0))
SWAPPED = images.srgb_profile_with_red_and_blue_swapped()
HTML_PROFILE = b"<html><script>alert(document.cookie)</script></html>" * 280   # ~14 KB

ANCILLARY = {
    "PNG with HTML in iCCP": (images.encode(RED, "PNG", icc_profile=HTML_PROFILE), (255, 0, 0)),
    "PNG tagged red-is-blue": (images.encode(RED, "PNG", icc_profile=SWAPPED), (0, 0, 255)),
    "JPEG tagged red-is-blue": (images.encode(RED, "JPEG", quality=95, icc_profile=SWAPPED),
                                (0, 0, 255)),
    "TIFF tagged red-is-blue": (images.encode(RED, "TIFF", icc_profile=SWAPPED), (0, 0, 255)),
    "WebP tagged red-is-blue": (images.encode(RED, "WEBP", lossless=True, icc_profile=SWAPPED),
                                (0, 0, 255)),
    "JPEG with EXIF": (images.jpeg_with_app1(b"Exif\0\0" + b"<script>x</script>" * 50), None),
    "Lab TIFF": (images.lab_tiff(), None),
}


@pytest.mark.parametrize("case", ANCILLARY, ids=list(ANCILLARY))
def test_stored_images_are_pixels_in_srgb_and_nothing_else(base_url, case):
    data, colour = ANCILLARY[case]
    response = upload(base_url, ("file", data))
    assert response.status_code == 201, response.text
    stored = requests.get(base_url + f"/api/v1/images/{response.json()['images'][0]['id']}",
                          headers=bearer(), timeout=10).content
    assert images.png_chunk_types(stored) == [b"IHDR", b"IDAT", b"IEND"]
    assert b"script" not in stored and b"html" not in stored
    if colour is not None:
        pixel = Image.open(io.BytesIO(stored)).convert("RGB").getpixel((20, 16))
        assert all(abs(a - b) <= 3 for a, b in zip(pixel, colour)), pixel


def test_the_same_lab_tiff_gets_the_same_id_on_every_upload_and_server(auth_servers):
    """A Lab TIFF got four ids on four uploads: Pillow's Lab conversion attaches a generated
    profile with a timestamp. Uploads a second apart, on two server processes."""
    data = images.lab_tiff(seed=4)
    ids = set()
    for server in (auth_servers.main, auth_servers.other, auth_servers.main, auth_servers.other):
        response = upload(server.base_url, ("lab.tif", data))
        assert response.status_code == 201, response.text
        ids.add(response.json()["images"][0]["id"])
        time.sleep(1.1)
    assert len(ids) == 1, ids


# --- item 2 / 8: pixel limits and their messages -------------------------------------------

def test_just_over_the_pixel_limit_says_by_how_much(base_url):
    error = error_of(upload(base_url, ("big.png", images.png_claiming(7072, 7072))))
    assert error["code"] == "E_IMAGE_TOO_LARGE"
    assert "7072\u00d77072" in error["message"]
    assert "50.01 megapixels" in error["message"] and "limit is 50 megapixels" in error["message"]


def test_one_request_may_not_carry_more_than_100_megapixels(base_url):
    files = [(f"part{n}.png", images.png_claiming(6000, 6000 - n)) for n in range(3)]
    started = time.monotonic()
    error = error_of(upload(base_url, *files))
    assert time.monotonic() - started < 5              # refused from the headers alone
    assert error["code"] == "E_IMAGE_TOO_LARGE"
    assert "108 megapixels in total" in error["message"], error["message"]
    assert "at most 100 megapixels" in error["message"]


# --- item 8: a full disk on upload ----------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 4 MiB tmpfs for the data directory (mounting needs root, as CI runs)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode()[:200]}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_on_upload_says_the_upload_cannot_be_stored(tiny_disk):
    data_dir = tiny_disk / "data"
    data_dir.mkdir()
    with gunicorn_server({}, data_dir=data_dir) as server:
        filler = tiny_disk / "filler"
        with open(filler, "wb", buffering=0) as handle:    # fill the disk to the last block
            try:
                while True:
                    handle.write(b"\0" * 4096)
            except OSError:
                pass
        response = requests.post(server.base_url + "/api/v1/images", timeout=30, files={
            "image": ("photo.png", images.encode(images.noise((200, 150)), "PNG"))})
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert error["code"] == "E_STORAGE_FULL"
        assert "upload cannot be stored" in error["message"]
        assert "results" not in error["message"]
        filler.unlink()
        again = requests.post(server.base_url + "/api/v1/images", timeout=30, files={
            "image": ("photo.png", images.encode(images.noise((200, 150)), "PNG"))})
        assert again.status_code == 201, again.text
        assert not Path(server.log_path).read_text().count("Traceback")
