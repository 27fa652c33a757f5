"""Broken files and code-carrying files each get their own code; good files beside them load;
code never runs without the opt-in."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from app.catalog import ModelCatalog
from app.errors import CheckpointNeedsTrust
from model_adapters import load_checkpoint
from model_adapters.checkpoint_file import FileKind, inspect_file
from model_adapters.config import read_config
from tests.adapters.conftest import (CPU, TinyNet, logits, probe_batch, small_torchvision_model,
                                     tiny_net, write_canary_pickle, write_canary_zip)
from tests.service.images import encode, solid


def _write_broken_files(directory: Path) -> dict[str, str]:
    """Broken files next to good ones; returns file name -> expected error code."""
    good = small_torchvision_model(seed=1)
    torch.save(good.state_dict(), directory / "good.pt")
    torch.save({"model": good.state_dict(), "epoch": 1}, directory / "good_wrapped.ckpt")

    (directory / "empty.pt").write_bytes(b"")
    data = (directory / "good.pt").read_bytes()
    (directory / "truncated.pt").write_bytes(data[: len(data) // 2])
    (directory / "notes.pt").write_text("these are not weights\n")
    (directory / "photo.pth").write_bytes(encode(solid((8, 8)), "PNG"))
    (directory / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    torch.save({"conv.weight": torch.zeros(3, 3)}, directory / "unknown_architecture.pt")
    nan_state = good.state_dict()
    nan_state["features.0.weight"] = nan_state["features.0.weight"].clone()
    nan_state["features.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(nan_state, directory / "nan.pt")
    inf_state = good.state_dict()
    inf_state["classifier.1.bias"] = torch.full_like(inf_state["classifier.1.bias"], float("inf"))
    torch.save({"state_dict": inf_state}, directory / "inf.pt")
    return {
        "empty.pt": "E_CHECKPOINT_UNREADABLE", "truncated.pt": "E_CHECKPOINT_UNREADABLE",
        "notes.pt": "E_CHECKPOINT_UNREADABLE", "photo.pth": "E_CHECKPOINT_UNREADABLE",
        "broken.safetensors": "E_CHECKPOINT_UNREADABLE",
        "unknown_architecture.pt": "E_CHECKPOINT_UNRECOGNIZED",
        "nan.pt": "E_CHECKPOINT_NONFINITE", "inf.pt": "E_CHECKPOINT_NONFINITE",
    }


def _write_code_files(directory: Path, marker: Path) -> dict[str, str]:
    model = tiny_net(seed=4)
    torch.save(model, directory / "full_pickle.pt")
    torch.jit.save(torch.jit.script(model), directory / "scripted.pt")
    exported = torch.export.export(model, (torch.zeros(1, 3, 16, 16),))
    torch.export.save(exported, directory / "exported.pt2")
    write_canary_pickle(directory / "canary_legacy.pt", marker)
    write_canary_zip(directory / "canary_zip.pth", marker)
    return {name: "E_CHECKPOINT_NEEDS_TRUST" for name in
            ("full_pickle.pt", "scripted.pt", "exported.pt2", "canary_legacy.pt",
             "canary_zip.pth")}


def test_each_broken_file_gets_its_code_and_good_ones_still_load(tmp_path: Path) -> None:
    expected = _write_broken_files(tmp_path)
    catalog = ModelCatalog(tmp_path, CPU, settle_seconds=0)
    by_file = {entry.file: entry for entry in catalog.entries()}

    assert set(by_file) == set(expected) | {"good.pt", "good_wrapped.ckpt"}
    for name, code in expected.items():
        entry = by_file[name]
        assert not entry.ok and entry.error is not None, name
        assert entry.error.code == code, (name, entry.error.message)
        assert str(tmp_path) not in entry.error.message
        assert entry.to_dict()["error"] == {"code": code, "message": entry.error.message}
    for name in ("good.pt", "good_wrapped.ckpt"):
        assert by_file[name].ok
        model = catalog.load(by_file[name].id)
        torch.testing.assert_close(logits(model.module, probe_batch()),
                                   logits(small_torchvision_model(seed=1), probe_batch()))


def test_code_carrying_files_are_refused_and_the_canary_never_runs(tmp_path: Path) -> None:
    marker = tmp_path.parent / f"{tmp_path.name}-canary-ran"
    expected = _write_code_files(tmp_path, marker)
    torch.save(tiny_net(seed=4).state_dict(), tmp_path / "weights_only.pt")
    (tmp_path / "convscope.toml").write_text(
        '[model]\nfactory = "tests.adapters.conftest:TinyNet"\n[preprocess]\ninput_size = [16, 16]\n')

    catalog = ModelCatalog(tmp_path, CPU, settle_seconds=0)
    by_file = {entry.file: entry for entry in catalog.entries()}

    assert not marker.exists(), "a pickle payload ran without --trust-code"
    for name, code in expected.items():
        assert by_file[name].error is not None and by_file[name].error.code == code, name
        assert "--trust-code" in by_file[name].error.message
        assert "CONVSCOPE_TRUST_CODE=1" in by_file[name].error.message
    assert by_file["weights_only.pt"].ok
    assert by_file["weights_only.pt"].latest
    with pytest.raises(CheckpointNeedsTrust):
        catalog.load(by_file["scripted.pt"].id)
    assert not marker.exists()


def test_code_carrying_files_load_with_trust(tmp_path: Path) -> None:
    model = tiny_net(seed=4)
    expected = logits(model, probe_batch(16))
    torch.save(model, tmp_path / "full_pickle.pt")
    torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.export.save(torch.export.export(model, (torch.zeros(2, 3, 16, 16),),
                                          dynamic_shapes=({0: batch},)),
                      tmp_path / "exported.pt2")
    torch.save(model, tmp_path / "legacy_full.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "convscope.toml").write_text("[preprocess]\ninput_size = [16, 16]\n")
    config = read_config(tmp_path)

    for name in ("full_pickle.pt", "scripted.pt", "exported.pt2", "legacy_full.pt"):
        with pytest.raises(CheckpointNeedsTrust):
            load_checkpoint(tmp_path / name, config, CPU)
        loaded = load_checkpoint(tmp_path / name, config, CPU, trust_code=True)
        assert loaded.meta.num_classes == 3, name
        assert loaded.meta.input_size == (16, 16)
        torch.testing.assert_close(logits(loaded.module, probe_batch(16)), expected)
    full = load_checkpoint(tmp_path / "full_pickle.pt", config, CPU, trust_code=True)
    assert full.meta.architecture == "TinyNet"
    assert full.meta.default_cam_layer == "features"
    scripted = load_checkpoint(tmp_path / "scripted.pt", config, CPU, trust_code=True)
    assert scripted.meta.cam_layers == () and scripted.meta.cam_unsupported_reason


def test_file_kinds_are_decided_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    write_canary_zip(tmp_path / "canary.pt", marker)
    torch.save(TinyNet().state_dict(), tmp_path / "weights.pt")
    torch.save(TinyNet(), tmp_path / "module.pt")
    assert inspect_file(tmp_path / "canary.pt") is FileKind.CODE_ZIP
    assert inspect_file(tmp_path / "weights.pt") is FileKind.WEIGHTS_ZIP
    assert inspect_file(tmp_path / "module.pt") is FileKind.CODE_ZIP
    assert not marker.exists()


def test_local_py_factory_needs_trust(tmp_path: Path) -> None:
    marker = tmp_path.parent / f"{tmp_path.name}-factory-ran"
    (tmp_path / "mymodel.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from tests.adapters.conftest import TinyNet\n"
        "def build():\n    return TinyNet()\n")
    torch.save(tiny_net(seed=9).state_dict(), tmp_path / "run.pt")
    (tmp_path / "convscope.toml").write_text(
        '[model]\nfactory = "mymodel:build"\n[preprocess]\ninput_size = [16, 16]\n')

    entry = ModelCatalog(tmp_path, CPU, settle_seconds=0).entries()[0]
    assert entry.error is not None and entry.error.code == "E_CHECKPOINT_NEEDS_TRUST"
    assert ".py" in entry.error.message and "--trust-code" in entry.error.message
    assert not marker.exists()

    trusted = ModelCatalog(tmp_path, CPU, trust_code=True, settle_seconds=0)
    assert trusted.entries()[0].ok
    assert marker.exists()  # with the opt-in the directory's code does run
    torch.testing.assert_close(logits(trusted.load("latest").module, probe_batch(16)),
                               logits(tiny_net(seed=9), probe_batch(16)))


@pytest.mark.parametrize("factory", ["os:system", "torch:load", "builtins:exec",
                                     "tests.adapters.conftest:probe_batch"])
def test_factories_that_are_not_model_constructors_need_trust(tmp_path: Path,
                                                              factory: str) -> None:
    torch.save(tiny_net().state_dict(), tmp_path / "run.pt")
    (tmp_path / "convscope.toml").write_text(
        f'[model]\nfactory = "{factory}"\nargs = ["echo should-not-run"]\n')
    entry = ModelCatalog(tmp_path, CPU, settle_seconds=0).entries()[0]
    assert entry.error is not None and entry.error.code == "E_CHECKPOINT_NEEDS_TRUST"


def test_dunder_factory_paths_are_refused(tmp_path: Path) -> None:
    torch.save(tiny_net().state_dict(), tmp_path / "run.pt")
    (tmp_path / "convscope.toml").write_text(
        '[model]\nfactory = "tests.adapters.conftest:TinyNet.__class__"\nargs = ["x"]\n')
    entry = ModelCatalog(tmp_path, CPU, settle_seconds=0).entries()[0]
    assert entry.error is not None and entry.error.code == "E_CONFIG_INVALID"


def test_annotated_builder_functions_are_allowed_without_trust(tmp_path: Path) -> None:
    model = small_torchvision_model(seed=2)
    torch.save(model.state_dict(), tmp_path / "run.pt")
    (tmp_path / "convscope.toml").write_text(
        '[model]\nfactory = "torchvision.models:squeezenet1_1"\nkwargs = { num_classes = 10 }\n')
    catalog = ModelCatalog(tmp_path, CPU, settle_seconds=0)
    assert catalog.entries()[0].ok
    torch.testing.assert_close(logits(catalog.load("latest").module, probe_batch()),
                               logits(model, probe_batch()))


def test_package_in_the_checkpoint_directory_on_sys_path_needs_trust(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The directory is importable (e.g. the working directory with `python -m`): a package in
    # it is still the directory's code and must not be imported without the opt-in.
    marker = tmp_path.parent / f"{tmp_path.name}-package-ran"
    package = tmp_path / "dirmodels_pkg"
    package.mkdir()
    (package / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from tests.adapters.conftest import TinyNet as Net\n")
    torch.save(tiny_net().state_dict(), tmp_path / "run.pt")
    (tmp_path / "convscope.toml").write_text(
        '[model]\nfactory = "dirmodels_pkg:Net"\n[preprocess]\ninput_size = [16, 16]\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "dirmodels_pkg", raising=False)

    entry = ModelCatalog(tmp_path, CPU, settle_seconds=0).entries()[0]

    assert entry.error is not None and entry.error.code == "E_CHECKPOINT_NEEDS_TRUST"
    assert not marker.exists()
    assert ModelCatalog(tmp_path, CPU, trust_code=True, settle_seconds=0).entries()[0].ok
