"""``convscope check``: the readable table, the single JSON object, and the exit status."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.cli import main
from tests.adapters.conftest import set_mtime, tiny_net

CONFIG = ('[model]\nfactory = "tests.adapters.conftest:TinyNet"\n'
          "[preprocess]\ninput_size = [16, 16]\n")
ROW_KEYS = {"file", "ok", "latest", "architecture", "num_classes", "input_size", "cam_layer",
            "parameters", "sha256", "error"}
REPO = Path(__file__).resolve().parents[2]


def _directory(tmp_path: Path, *, broken: bool) -> Path:
    (tmp_path / "convscope.toml").write_text(CONFIG)
    torch.save(tiny_net(seed=1).state_dict(), tmp_path / "epoch_1.pt")
    torch.save({"model": tiny_net(seed=2).state_dict(), "epoch": 2}, tmp_path / "epoch_2.pt")
    set_mtime(tmp_path / "epoch_1.pt", 20)
    set_mtime(tmp_path / "epoch_2.pt", 10)
    if broken:
        (tmp_path / "epoch_3.pt").write_bytes(b"")
        set_mtime(tmp_path / "epoch_3.pt", 5)
    return tmp_path


def test_json_output_and_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = _directory(tmp_path, broken=False)
    assert main(["check", str(directory), "--json", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)  # exactly one JSON object
    assert set(report) == {"directory", "checkpoints"}
    assert report["directory"] == str(directory)
    rows = {row["file"]: row for row in report["checkpoints"]}
    assert set(rows) == {"epoch_1.pt", "epoch_2.pt"}
    for row in rows.values():
        assert set(row) == ROW_KEYS
        assert row["ok"] and row["error"] is None
        assert row["architecture"] == "TinyNet" and row["num_classes"] == 3
        assert row["input_size"] == [3, 16, 16] and row["cam_layer"] == "features"
        assert row["parameters"] == sum(p.numel() for p in tiny_net().parameters())
        assert len(row["sha256"]) == 64
    assert rows["epoch_2.pt"]["latest"] and not rows["epoch_1.pt"]["latest"]


def test_json_output_with_a_broken_file_exits_1(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    directory = _directory(tmp_path, broken=True)
    assert main(["check", str(directory), "--json", "--device", "cpu"]) == 1
    rows = {row["file"]: row for row in json.loads(capsys.readouterr().out)["checkpoints"]}
    broken = rows["epoch_3.pt"]
    assert broken["ok"] is False and broken["latest"] is False
    assert broken["error"]["code"] == "E_CHECKPOINT_UNREADABLE"
    assert broken["architecture"] is None and broken["input_size"] is None
    assert rows["epoch_2.pt"]["ok"] and rows["epoch_2.pt"]["latest"]


def test_human_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = _directory(tmp_path, broken=True)
    assert main(["check", str(directory), "--device", "cpu"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].split() == ["FILE", "STATUS", "ARCHITECTURE", "CLASSES", "INPUT", "CAM",
                                "LAYER", "PARAMS"]
    row = next(line for line in lines if line.startswith("epoch_2.pt"))
    assert row.split()[:6] == ["epoch_2.pt", "ok,", "latest", "TinyNet", "3", "3x16x16"]
    assert any(line.startswith("epoch_3.pt") and "E_CHECKPOINT_UNREADABLE" in line
               for line in lines)
    assert "epoch_3.pt: E_CHECKPOINT_UNREADABLE: The file 'epoch_3.pt' is empty." in out
    assert lines[-1] == "2 of 3 checkpoints loaded."


def test_unusable_directory_and_device_exit_2(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "missing"), "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "E_NOT_FOUND"
    assert main(["check", str(tmp_path), "--device", "tpu"]) == 2
    assert "E_DEVICE_UNAVAILABLE" in capsys.readouterr().err


def test_empty_directory_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out) == {"directory": str(tmp_path), "checkpoints": []}


def test_trust_code_flag_and_environment(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "convscope.toml").write_text("[preprocess]\ninput_size = [16, 16]\n")
    torch.save(tiny_net(), tmp_path / "whole.pt")
    set_mtime(tmp_path / "whole.pt", 10)
    assert main(["check", str(tmp_path), "--json"]) == 1
    row = json.loads(capsys.readouterr().out)["checkpoints"][0]
    assert row["error"]["code"] == "E_CHECKPOINT_NEEDS_TRUST"
    assert main(["check", str(tmp_path), "--json", "--trust-code"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoints"][0]["architecture"] == "TinyNet"
    monkeypatch.setenv("CONVSCOPE_TRUST_CODE", "1")
    assert main(["check", str(tmp_path), "--json"]) == 0
    capsys.readouterr()


@pytest.mark.slow
def test_console_script_checks_the_demo_by_default() -> None:
    script = Path(sys.executable).parent / "convscope"
    assert script.exists(), "the project is not installed into this venv"
    env = {**os.environ, "CONVSCOPE_DEVICE": "cpu", "CONVSCOPE_TORCH_THREADS": "1"}
    result = subprocess.run([str(script), "check", "--json"], capture_output=True, text=True,
                            env=env, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["directory"].endswith("demo")
    [row] = report["checkpoints"]
    assert row["ok"] and row["latest"] and row["architecture"] == "efficientnet-lite0"
    assert row["num_classes"] == 1000 and row["input_size"] == [3, 224, 224]
    assert row["cam_layer"] == "@pooled" and row["parameters"] == 4652008

    human = subprocess.run([str(script), "check"], capture_output=True, text=True, env=env,
                           timeout=300, cwd=REPO)
    assert human.returncode == 0 and "1 of 1 checkpoints loaded." in human.stdout
