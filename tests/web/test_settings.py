"""Settings: environment + test_config, validated when the app is built."""
from __future__ import annotations

import argparse

import pytest

from app.errors import ConfigInvalid, ConvscopeError
from app.settings import Settings, load_settings


def test_environment_and_overrides(tmp_path):
    environ = {"CONVSCOPE_DATA_DIR": str(tmp_path / "d"), "CONVSCOPE_QUEUE_SIZE": "3",
               "CONVSCOPE_TRUST_CODE": "yes", "CONVSCOPE_MAX_REQUEST_MB": "1.5",
               "CONVSCOPE_BATCH_SIZE": ""}
    settings = load_settings({"queue_size": 5}, environ)
    assert settings.queue_size == 5 and settings.trust_code is True
    assert settings.max_request_mb == 1.5 and settings.batch_size is None
    assert settings.data_dir == tmp_path / "d" and settings.data_dir.is_dir()
    assert settings.secret_key and len(settings.secret_key) >= 32
    assert "secret" not in repr(settings)


@pytest.mark.parametrize("environ, variable", [
    ({"CONVSCOPE_QUEUE_SIZE": "many"}, "CONVSCOPE_QUEUE_SIZE"),
    ({"CONVSCOPE_QUEUE_SIZE": "0"}, "CONVSCOPE_QUEUE_SIZE"),
    ({"CONVSCOPE_TRUST_CODE": "maybe"}, "CONVSCOPE_TRUST_CODE"),
    ({"CONVSCOPE_MAX_COST": "1e3"}, "CONVSCOPE_MAX_COST"),
])
def test_bad_environment_fails_at_startup_naming_the_variable(tmp_path, environ, variable):
    environ = {"CONVSCOPE_DATA_DIR": str(tmp_path), **environ}
    with pytest.raises(ConfigInvalid) as caught:
        load_settings(None, environ)
    assert variable in caught.value.message and variable in caught.value.fields


def test_bad_directories_and_unknown_keys_fail_at_startup(tmp_path):
    with pytest.raises(ConfigInvalid, match="checkpoint directory"):
        load_settings({"checkpoint_dir": tmp_path / "missing", "data_dir": tmp_path}, {})
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigInvalid, match="data directory"):
        load_settings({"data_dir": blocker / "sub"}, {})
    with pytest.raises(ConfigInvalid, match="queue_sise"):
        load_settings({"queue_sise": 3, "data_dir": tmp_path}, {})


def test_create_app_refuses_bad_config_and_devices(tmp_path, monkeypatch):
    from app import create_app

    monkeypatch.setenv("CONVSCOPE_QUEUE_SIZE", "-1")
    with pytest.raises(ConfigInvalid):
        create_app({"data_dir": tmp_path})
    monkeypatch.delenv("CONVSCOPE_QUEUE_SIZE")
    with pytest.raises(ConvscopeError) as caught:
        create_app({"data_dir": tmp_path, "device": "tpu"})
    assert caught.value.code == "E_DEVICE_UNAVAILABLE"


def test_settings_table_documents_every_field():
    rows = Settings().as_table()
    names = [row[0] for row in rows]
    assert "CONVSCOPE_DATA_DIR" in names and "CONVSCOPE_QUEUE_SIZE" in names
    assert all(help_text for _, _, help_text in rows)


def test_serve_arguments_become_settings():
    from app.serve import settings_from_args

    args = argparse.Namespace(directory="/runs", device="cpu", trust_code=False,
                              data_dir="/tmp/x", host="127.0.0.1", port=8000)
    assert settings_from_args(args) == {"device": "cpu", "trust_code": False,
                                        "checkpoint_dir": "/runs", "data_dir": "/tmp/x"}
    args = argparse.Namespace(directory=None, device="auto", trust_code=True, data_dir=None)
    assert settings_from_args(args) == {"device": "auto", "trust_code": True}
