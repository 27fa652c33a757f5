"""Ids and paths: every id in a URL is looked up in a table, never joined into a path.

``..``, percent-encoded and double-encoded variants, absolute paths, NUL bytes and the like in
every id-taking URL give the same 404 as an unknown id, and symlinks that lead out of the
checkpoint directory or into the stores are never followed."""
from __future__ import annotations

import shutil

import pytest
import torch

from tests.security.conftest import assert_html_error, assert_json_error, assert_no_leak
from tests.web import tiny_models
from tests.web.conftest import png_bytes, run_job, upload

# Each is put into a URL as-is (the test client percent-decodes like a server would).
HOSTILE_IDS = [
    "..", "../..", "%2e%2e", "%2E%2E%2F%2E%2E", ".%2e/.%2e/etc/passwd",
    "..%2f..%2f..%2fetc%2fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "%252e%252e%252f%252e%252e%252fetc%252fpasswd", "..%252f..%252fsecret",
    "..%5c..%5cetc%5cpasswd", "..\\..\\secret", "%2fetc%2fpasswd", "/etc/passwd",
    "....//....//etc/passwd", "..;/secret", "%00", "secret%00.png", "%c0%ae%c0%ae%c0%af",
    "~root", "C:%5cWindows%5cwin.ini", "file:%2f%2f%2fetc%2fpasswd", "0" * 64 + "%2f..",
    "0" * 63 + "g", "A" * 64, "a" * 64 + ".png", " " + "0" * 64,
]


@pytest.fixture
def planted(make_app, tmp_path):
    """An app with one real image and one real job/result, and tempting files next to the
    stores that a joined path could reach."""
    app = make_app()
    client = app.test_client()
    image = upload(client, (png_bytes(seed=11), "real.png"))[0]["id"]
    job = run_job(client, [image])
    data = tmp_path / "data"
    (data / "secret.png").write_bytes(png_bytes(seed=12))
    (data / "secret").write_text("root:x:0:0:SECRET\n")
    (data / "images" / "secret").write_text("root:x:0:0:SECRET\n")
    key = job["results"][0]["visualizations"][0]["panels"][0]["json_url"].split("/")[-2]
    return client, image, job, key


def _routes(image: str, job_id: str, key: str) -> dict[str, list[tuple[str, str]]]:
    """(method, URL template) per id-taking route family; {} is where the hostile id goes."""
    return {
        "images": [("GET", "/api/v1/images/{}")],
        "jobs": [("GET", "/api/v1/jobs/{}"), ("DELETE", "/api/v1/jobs/{}"),
                 ("GET", "/jobs/{}")],
        "results": [("GET", "/api/v1/results/{}/result.json"),
                    ("GET", "/api/v1/results/" + key + "/{}"),
                    ("GET", "/api/v1/results/{}/{}")],
        "models": [("GET", "/api/v1/models/{}"), ("GET", "/?model={}"),
                   ("GET", "/api/v1/visualizations?model={}")],
    }


EXPECTED_CODES = {"images": {"E_NOT_FOUND"}, "jobs": {"E_NOT_FOUND"},
                  "results": {"E_NOT_FOUND"}, "models": {"E_NOT_FOUND", "E_UNKNOWN_MODEL"}}


@pytest.mark.parametrize("family", sorted(EXPECTED_CODES))
def test_hostile_ids_give_the_same_404_as_unknown_ones(planted, family):
    client, image, job, key = planted
    for method, template in _routes(image, job["id"], key)[family]:
        for hostile in HOSTILE_IDS:
            url = template.replace("{}", hostile)
            response = client.open(url, method=method)
            assert response.status_code == 404, (url, response.status_code)
            if response.mimetype == "application/json":
                code = assert_json_error(response, 404)["code"]
            else:
                assert_html_error(response, 404)
                code = "E_UNKNOWN_MODEL" if b"E_UNKNOWN_MODEL" in response.data else "E_NOT_FOUND"
            assert code in EXPECTED_CODES[family], (url, code)
            assert b"SECRET" not in response.data and b"root:" not in response.data
            assert not response.data.startswith(b"\x89PNG"), url
            response.close()


def test_the_real_ids_work(planted):
    """The same routes do answer for real ids, so the 404s above are not vacuous."""
    client, image, job, key = planted
    assert client.get(f"/api/v1/images/{image}").status_code == 200
    assert client.get(f"/api/v1/jobs/{job['id']}").status_code == 200
    assert client.get(f"/jobs/{job['id']}").status_code == 200
    assert client.get(f"/api/v1/results/{key}/result.json").status_code == 200
    model = client.get("/api/v1/models").json["models"][0]["id"]
    assert client.get(f"/api/v1/models/{model}").status_code == 200


@pytest.mark.parametrize("hostile", ["../../secret", "/etc/passwd", "..", "0" * 64 + "/..",
                                     "%2e%2e%2fsecret"])
def test_hostile_ids_in_a_job_body_are_unknown(planted, hostile):
    client, image, _, _ = planted
    response = client.post("/api/v1/jobs", json={"images": [hostile],
                                                 "visualizations": [{"name": "grad_cam"}]})
    assert_json_error(response, 404, "E_NOT_FOUND")
    response = client.post("/api/v1/jobs", json={"model": hostile, "images": [image],
                                                 "visualizations": [{"name": "grad_cam"}]})
    assert_json_error(response, 404, "E_UNKNOWN_MODEL")


def test_symlinked_checkpoints_leading_outside_are_not_listed(make_app, checkpoint_dir,
                                                              tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    torch.save(tiny_models.TinyNet().state_dict(), outside / "private.pt")
    (checkpoint_dir / "link-out.pt").symlink_to(outside / "private.pt")
    (checkpoint_dir / "link-dir.pt").symlink_to(outside)
    (checkpoint_dir / "link-abs.pt").symlink_to("/etc/passwd")
    shutil.copy(checkpoint_dir / "tiny.pt", checkpoint_dir / "inside-target.pt")
    (checkpoint_dir / "link-in.pt").symlink_to(checkpoint_dir / "inside-target.pt")
    client = make_app().test_client()
    files = {model["file"] for model in client.get("/api/v1/models").json["models"]}
    assert "link-out.pt" not in files and "link-dir.pt" not in files
    assert "link-abs.pt" not in files
    assert {"tiny.pt", "inside-target.pt", "link-in.pt"} <= files
    page = client.get("/models").get_data(as_text=True)
    assert "link-out.pt" not in page and "private" not in page


def test_symlinks_planted_in_the_stores_are_never_served(planted, tmp_path):
    client, image, job, key = planted
    data = tmp_path / "data"
    fake_image = "e" * 64
    (data / "images" / f"{fake_image}.png").symlink_to(data / "secret.png")
    fake_result = "f" * 64
    (data / "results" / fake_result).symlink_to(data / "results" / key)
    fake_job = "d" * 32
    (data / "jobs" / f"{fake_job}.json").symlink_to(data / "jobs" / f"{job['id']}.json")
    for url in (f"/api/v1/images/{fake_image}", f"/api/v1/results/{fake_result}/result.json",
                f"/api/v1/jobs/{fake_job}"):
        response = client.get(url)
        assert_json_error(response, 404, "E_NOT_FOUND")
    assert_no_leak(client.get(f"/jobs/{fake_job}").data)


def test_result_files_not_named_in_the_record_are_not_served(planted, tmp_path):
    client, _, _, key = planted
    (tmp_path / "data" / "results" / key / "extra.png").write_bytes(png_bytes(seed=1))
    assert_json_error(client.get(f"/api/v1/results/{key}/extra.png"), 404, "E_NOT_FOUND")
