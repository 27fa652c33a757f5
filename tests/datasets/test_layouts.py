"""Dataset layouts, bad layouts with their codes, unreadable files skipped with theirs, and the
dataset folder as a boundary that no link or labels.csv path crosses."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from app.datasets import CSV, FOLDERS, match_labels, read_dataset_file, scan_dataset
from app.errors import ConvscopeError
from tests.datasets.models import CLASS_NAMES

MAX = 1000


def meta(names: tuple[str, ...] = CLASS_NAMES) -> SimpleNamespace:
    """What label matching reads of a model's ModelMeta."""
    return SimpleNamespace(class_names=names, num_classes=len(names))


def png(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def code_of(call) -> str:
    with pytest.raises(ConvscopeError) as caught:
        call()
    return caught.value.code


def cli(*args: str) -> tuple[int, dict]:
    out = io.StringIO()
    from app.evaluate_cli import evaluate_command
    from app.cli import build_parser

    status = evaluate_command(build_parser().parse_args(["evaluate", *args, "--json"]), out)
    return status, json.loads(out.getvalue() or "{}")


# --- layouts ------------------------------------------------------------------------------------

def test_class_folders_with_nested_folders_names_and_indices(tmp_path: Path) -> None:
    png(tmp_path / "red" / "a.png")
    png(tmp_path / "red" / "deeper" / "still" / "b.png")
    png(tmp_path / "1" / "c.png")                       # an index: green
    png(tmp_path / "Yellow" / "d.png")                  # a label, ignoring case
    png(tmp_path / ".git" / "e.png")                    # hidden: ignored
    png(tmp_path / "red" / ".thumbs" / "f.png")
    (tmp_path / "README.md").write_text("loose files beside class folders are ignored")
    scan = scan_dataset(tmp_path, max_images=MAX)
    assert scan.layout == FOLDERS
    assert [file.path for file in scan.files] == ["1/c.png", "Yellow/d.png", "red/a.png",
                                                  "red/deeper/still/b.png"]
    labelled = match_labels(scan, meta())
    assert labelled.targets.tolist() == [1, 3, 0, 0]
    assert labelled.classes == (0, 1, 3)


def test_folder_names_match_loosely_only_when_unambiguous(tmp_path: Path) -> None:
    names = ("tabby", "tiger cat", "Great Dane", "great dane")
    png(tmp_path / "ok" / "tiger_cat" / "a.png")
    png(tmp_path / "ok" / "Great Dane" / "b.png")        # exact beats loose
    labelled = match_labels(scan_dataset(tmp_path / "ok", max_images=MAX), meta(names))
    assert dict(zip([f.path for f in labelled.files], labelled.targets.tolist())) == {
        "tiger_cat/a.png": 1, "Great Dane/b.png": 2}
    png(tmp_path / "ambiguous" / "GREAT_DANE" / "c.png")
    with pytest.raises(ConvscopeError) as caught:
        match_labels(scan_dataset(tmp_path / "ambiguous", max_images=MAX), meta(names))
    assert caught.value.code == "E_DATASET_LABELS" and "'GREAT_DANE'" in caught.value.message


def test_labels_csv_with_names_indices_and_subfolders(tmp_path: Path) -> None:
    png(tmp_path / "images" / "x.png")
    png(tmp_path / "images" / "y.png")
    png(tmp_path / "z.png")
    (tmp_path / "labels.csv").write_text("\ufefffile,label\nimages/x.png,blue\n"
                                         "images\\y.png,4\n\nz.png, red \nz.png,red\n")
    scan = scan_dataset(tmp_path, max_images=MAX)
    assert scan.layout == CSV
    labelled = match_labels(scan, meta())
    assert [(f.path, int(t)) for f, t in zip(labelled.files, labelled.targets)] == [
        ("images/x.png", 2), ("images/y.png", 4), ("z.png", 0)]


@pytest.mark.parametrize("content, expected", [
    ("name,class\na.png,red\n", "E_DATASET_LABELS"),               # the header is required
    ("file,label\na.png,crimson\n", "E_DATASET_LABELS"),           # no such class
    ("file,label\na.png,red\na.png,blue\n", "E_DATASET_LABELS"),   # two labels for one file
    ("file,label\na.png,\n", "E_DATASET_LABELS"),
    ("file,label\n", "E_DATASET_EMPTY"),
])
def test_bad_labels_csv_is_coded(tmp_path: Path, content: str, expected: str) -> None:
    png(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text(content)
    assert code_of(lambda: match_labels(scan_dataset(tmp_path, max_images=MAX), meta())) \
        == expected


def test_bad_layouts_are_coded_before_any_model_pass(tmp_path: Path, checkpoint_dir: Path,
                                                     monkeypatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    loose = tmp_path / "loose"
    png(loose / "a.png")
    unknown = tmp_path / "unknown"
    png(unknown / "red" / "a.png")
    png(unknown / "crimson" / "b.png")
    png(unknown / "teal" / "c.png")
    assert code_of(lambda: scan_dataset(tmp_path / "missing", max_images=MAX)) \
        == "E_DATASET_NOT_FOUND"
    assert code_of(lambda: scan_dataset(empty, max_images=MAX)) == "E_DATASET_EMPTY"
    assert code_of(lambda: scan_dataset(loose, max_images=MAX)) == "E_DATASET_LABELS"
    with pytest.raises(ConvscopeError) as caught:
        match_labels(scan_dataset(unknown, max_images=MAX), meta())
    assert caught.value.code == "E_DATASET_LABELS"
    assert "'crimson'" in caught.value.message and "'teal'" in caught.value.message

    # The CLI: exit 2 with the code, and no forward pass ever ran.
    from model_adapters.base import LoadedModel

    def no_pass(*args, **kwargs):
        raise AssertionError("a model pass ran before the labels were checked")

    monkeypatch.setattr(LoadedModel, "predict", no_pass)
    for folder, code in ((tmp_path / "missing", "E_DATASET_NOT_FOUND"),
                         (empty, "E_DATASET_EMPTY"), (loose, "E_DATASET_LABELS"),
                         (unknown, "E_DATASET_LABELS")):
        status, body = cli(str(checkpoint_dir), str(folder), "--out", str(tmp_path / "out"))
        assert (status, body["error"]["code"]) == (2, code)


def test_too_many_images_is_a_clear_error(tmp_path: Path, checkpoint_dir: Path,
                                          monkeypatch) -> None:
    for number in range(5):
        png(tmp_path / "data" / "red" / f"{number}.png")
    assert code_of(lambda: scan_dataset(tmp_path / "data", max_images=4)) \
        == "E_DATASET_TOO_LARGE"
    monkeypatch.setenv("CONVSCOPE_MAX_DATASET_IMAGES", "4")
    status, body = cli(str(checkpoint_dir), str(tmp_path / "data"), "--out",
                       str(tmp_path / "out"))
    assert (status, body["error"]["code"]) == (2, "E_DATASET_TOO_LARGE")
    assert "CONVSCOPE_MAX_DATASET_IMAGES" in body["error"]["message"]


# --- unreadable files ---------------------------------------------------------------------------

def test_unreadable_files_are_skipped_with_their_codes(tmp_path: Path,
                                                       checkpoint_dir: Path) -> None:
    data = tmp_path / "data"
    png(data / "red" / "good.png")
    png(data / "blue" / "good.png", (30, 30, 200))
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (0, 200, 0)).save(buffer, format="JPEG")
    (data / "red" / "truncated.jpg").write_bytes(buffer.getvalue()[:200])
    (data / "red" / "notes.txt").write_text("not an image")
    (data / "red" / "empty.png").write_bytes(b"")
    png(data / "blue" / "tiny.png", size=2)
    Image.new("RGB", (450, 8)).save(data / "blue" / "sliver.png")
    os.mkfifo(data / "blue" / "pipe.png")               # never opened for reading (would block)
    status, body = cli(str(checkpoint_dir), str(data), "--out", str(tmp_path / "out"))
    assert status == 0
    assert {entry["file"]: entry["code"] for entry in body["skipped"]} == {
        "red/truncated.jpg": "E_IMAGE_CORRUPT", "red/notes.txt": "E_IMAGE_UNSUPPORTED",
        "red/empty.png": "E_IMAGE_EMPTY", "blue/tiny.png": "E_IMAGE_TOO_SMALL",
        "blue/sliver.png": "E_IMAGE_ASPECT_RATIO", "blue/pipe.png": "E_FILE_UNREADABLE"}
    assert [image["file"] for image in body["images"]] == ["blue/good.png", "red/good.png"]
    assert body["dataset"]["images"] == 2


def test_a_dataset_of_only_unreadable_files_is_empty(tmp_path: Path,
                                                     checkpoint_dir: Path) -> None:
    (tmp_path / "data" / "red").mkdir(parents=True)
    (tmp_path / "data" / "red" / "a.png").write_text("nope")
    status, body = cli(str(checkpoint_dir), str(tmp_path / "data"), "--out",
                       str(tmp_path / "out"))
    assert (status, body["error"]["code"]) == (2, "E_DATASET_EMPTY")
    assert "red/a.png: E_IMAGE_UNSUPPORTED" in body["error"]["message"]


# --- the folder is a boundary -------------------------------------------------------------------

def test_links_are_followed_only_inside_the_dataset(tmp_path: Path, checkpoint_dir: Path) -> None:
    outside = tmp_path / "outside"
    secret = png(outside / "secret.png", (0, 200, 0))
    png(outside / "folder" / "also-secret.png")
    data = tmp_path / "data"
    png(data / "red" / "own.png")
    png(data / "blue" / "real.png", (30, 30, 200))
    (data / "red" / "to-outside.png").symlink_to(secret)
    (data / "red" / "to-outside-folder").symlink_to(outside / "folder")
    (data / "green").symlink_to(outside / "folder")                  # a class folder outside
    (data / "red" / "to-inside.png").symlink_to(data / "blue" / "real.png")
    (data / "blue" / "loop").symlink_to(data / "blue")              # a cycle, inside
    status, body = cli(str(checkpoint_dir), str(data), "--out", str(tmp_path / "out"))
    assert status == 0
    assert [image["file"] for image in body["images"]] == ["blue/real.png", "red/own.png",
                                                           "red/to-inside.png"]
    assert {entry["file"]: entry["code"] for entry in body["skipped"]} == {
        "green": "E_DATASET_OUTSIDE", "red/to-outside.png": "E_DATASET_OUTSIDE",
        "red/to-outside-folder": "E_DATASET_OUTSIDE"}
    assert "secret" not in json.dumps(body["images"])


def test_labels_csv_paths_never_leave_the_dataset(tmp_path: Path) -> None:
    png(tmp_path / "outside.png")
    data = tmp_path / "data"
    png(data / "inside.png")
    (data / "link.png").symlink_to(tmp_path / "outside.png")
    (data / "labels.csv").write_text(
        "file,label\ninside.png,red\n../outside.png,red\n/etc/passwd,red\nlink.png,red\n"
        "sub/../../outside.png,red\nmissing.png,red\n")
    scan = scan_dataset(data, max_images=MAX)
    assert [file.path for file in scan.files] == ["inside.png"]
    assert {entry.file: entry.code for entry in scan.skipped} == {
        "../outside.png": "E_DATASET_OUTSIDE", "/etc/passwd": "E_DATASET_OUTSIDE",
        "link.png": "E_DATASET_OUTSIDE", "sub/../../outside.png": "E_DATASET_OUTSIDE",
        "missing.png": "E_NOT_FOUND"}


def test_a_file_swapped_for_a_link_after_the_scan_is_not_read(tmp_path: Path) -> None:
    outside = png(tmp_path / "outside.png")
    data = tmp_path / "data"
    inside = png(data / "red" / "a.png")
    root = Path(os.path.realpath(data))
    assert read_dataset_file(root, "red/a.png", 10_000).startswith(b"\x89PNG")
    inside.unlink()
    inside.symlink_to(outside)
    assert code_of(lambda: read_dataset_file(root, "red/a.png", 10_000)) == "E_DATASET_OUTSIDE"
    assert code_of(lambda: read_dataset_file(root, "../outside.png", 10_000)) \
        == "E_DATASET_OUTSIDE"


def test_reads_are_bounded(tmp_path: Path) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(np.zeros(5000, dtype=np.uint8).tobytes())
    assert len(read_dataset_file(Path(os.path.realpath(tmp_path)), "big.bin", 100)) == 101
