"""Production guards: secret key required, no debug mode in production or on a public address,
guessable tokens refused, and the settings table documents all of it."""
from __future__ import annotations

import argparse
import logging

import pytest

from app.errors import ConfigInvalid
from app.settings import Settings, load_settings
from tests.security.conftest import TOKEN


def _environ(tmp_path, **variables: str) -> dict[str, str]:
    return {"CONVSCOPE_DATA_DIR": str(tmp_path / "data"), **variables}


@pytest.mark.parametrize("variables, named", [
    ({"CONVSCOPE_ENV": "production"}, "CONVSCOPE_SECRET_KEY"),
    ({"CONVSCOPE_ENV": "production", "CONVSCOPE_SECRET_KEY": "short"}, "CONVSCOPE_SECRET_KEY"),
    ({"CONVSCOPE_ENV": "production", "CONVSCOPE_SECRET_KEY": "k" * 32, "CONVSCOPE_DEBUG": "1"},
     "CONVSCOPE_DEBUG"),
    ({"CONVSCOPE_ENV": "staging"}, "CONVSCOPE_ENV"),
    ({"CONVSCOPE_AUTH_TOKEN": "password"}, "CONVSCOPE_AUTH_TOKEN"),
    ({"CONVSCOPE_AUTH_TOKEN": TOKEN, "CONVSCOPE_AUTH_TOKEN_FILE": "/dev/null"},
     "CONVSCOPE_AUTH_TOKEN_FILE"),
    ({"CONVSCOPE_AUTH_TOKEN_FILE": "/nonexistent/token"}, "CONVSCOPE_AUTH_TOKEN_FILE"),
    ({"CONVSCOPE_AUTH_TOKEN_FILE": "/dev/null"}, "CONVSCOPE_AUTH_TOKEN_FILE"),
    ({"CONVSCOPE_STORE_MAX_MB": "-1"}, "CONVSCOPE_STORE_MAX_MB"),
    ({"CONVSCOPE_RESULT_TTL_HOURS": "soon"}, "CONVSCOPE_RESULT_TTL_HOURS"),
    ({"CONVSCOPE_SECURE_COOKIES": "maybe"}, "CONVSCOPE_SECURE_COOKIES"),
    ({"CONVSCOPE_SESSION_HOURS": "0"}, "CONVSCOPE_SESSION_HOURS"),
])
def test_unsafe_configuration_is_refused_at_startup_naming_the_variable(tmp_path, variables,
                                                                        named):
    with pytest.raises(ConfigInvalid) as caught:
        load_settings(None, _environ(tmp_path, **variables))
    assert named in caught.value.message and named in caught.value.fields
    assert "/nonexistent" not in caught.value.message        # no paths in messages


def test_production_with_a_secret_key_starts(tmp_path):
    settings = load_settings(None, _environ(tmp_path, CONVSCOPE_ENV="Production",
                                            CONVSCOPE_SECRET_KEY="k" * 32))
    assert settings.production and settings.secret_key == "k" * 32 and not settings.debug


def test_create_app_refuses_production_without_a_secret_key(tmp_path, monkeypatch):
    from app import create_app

    monkeypatch.setenv("CONVSCOPE_ENV", "production")
    monkeypatch.delenv("CONVSCOPE_SECRET_KEY", raising=False)
    with pytest.raises(ConfigInvalid, match="CONVSCOPE_SECRET_KEY"):
        create_app({"data_dir": tmp_path})


def test_development_mode_makes_a_random_secret_key(tmp_path):
    first = load_settings(None, _environ(tmp_path))
    second = load_settings(None, _environ(tmp_path))
    assert not first.production and len(first.secret_key) >= 32
    assert first.secret_key != second.secret_key


def test_token_file_is_read_and_stripped(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    settings = load_settings({"auth_token_file": path}, _environ(tmp_path))
    assert settings.auth_enabled and settings.auth_token == TOKEN
    assert TOKEN not in repr(settings)


def test_settings_table_documents_the_new_settings():
    rows = {name: (default, help_text) for name, default, help_text in Settings().as_table()}
    for name in ("CONVSCOPE_ENV", "CONVSCOPE_SECRET_KEY", "CONVSCOPE_AUTH_TOKEN",
                 "CONVSCOPE_AUTH_TOKEN_FILE", "CONVSCOPE_SESSION_HOURS",
                 "CONVSCOPE_SECURE_COOKIES", "CONVSCOPE_ALLOWED_HOSTS", "CONVSCOPE_DEBUG",
                 "CONVSCOPE_STORE_MAX_MB", "CONVSCOPE_RESULT_TTL_HOURS"):
        assert name in rows and rows[name][1], name
    assert rows["CONVSCOPE_ENV"][0] == "development" and "production" in rows["CONVSCOPE_ENV"][1]
    assert "gunicorn" in rows["CONVSCOPE_ENV"][1]
    assert rows["CONVSCOPE_AUTH_TOKEN"][0] == "" and rows["CONVSCOPE_ALLOWED_HOSTS"][0]


def test_gunicorn_without_production_mode_is_warned_about(make_app, monkeypatch, caplog):
    monkeypatch.setenv("SERVER_SOFTWARE", "gunicorn/25.1.0")
    with caplog.at_level(logging.WARNING, logger="app.factory"):
        make_app(wait=False)
    assert "CONVSCOPE_ENV=production" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.factory"):
        make_app(wait=False, env="production", secret_key="k" * 32, auth_token=TOKEN)
    assert "CONVSCOPE_ENV=production" not in caplog.text


# --- convscope serve: debug mode only on loopback ---------------------------------------------

@pytest.mark.parametrize("host, refused", [
    ("127.0.0.1", False), ("localhost", False), ("::1", False), ("127.0.0.2", False),
    ("0.0.0.0", True), ("::", True), ("192.168.1.10", True), ("example.com", True),
])
def test_debug_is_refused_on_non_loopback_addresses(host, refused):
    from app.serve import debug_refusal

    assert (debug_refusal(True, host) is not None) is refused
    assert debug_refusal(False, host) is None
    if refused:
        assert "CONVSCOPE_DEBUG" in debug_refusal(True, host)


def test_serve_exits_before_listening_when_debug_faces_the_network(tmp_path, monkeypatch,
                                                                   caplog):
    from app import serve

    monkeypatch.setenv("CONVSCOPE_DEBUG", "1")
    monkeypatch.setenv("CONVSCOPE_DATA_DIR", str(tmp_path / "data"))

    def must_not_build(*args, **kwargs):
        raise AssertionError("the app must not be built")

    monkeypatch.setattr("app.create_app", must_not_build)
    args = argparse.Namespace(directory=None, device="cpu", trust_code=False, data_dir=None,
                              host="0.0.0.0", port=0)
    with caplog.at_level(logging.ERROR, logger="app.serve"):
        assert serve.serve_command(args) == 2
    assert "CONVSCOPE_DEBUG" in caplog.text and "0.0.0.0" in caplog.text


def test_serve_exits_with_a_clear_error_in_production_without_a_key(tmp_path, monkeypatch,
                                                                    caplog):
    from app import serve

    monkeypatch.setenv("CONVSCOPE_ENV", "production")
    monkeypatch.delenv("CONVSCOPE_SECRET_KEY", raising=False)
    monkeypatch.setenv("CONVSCOPE_DATA_DIR", str(tmp_path / "data"))
    args = argparse.Namespace(directory=None, device="cpu", trust_code=False, data_dir=None,
                              host="127.0.0.1", port=0)
    with caplog.at_level(logging.ERROR, logger="app.serve"):
        assert serve.serve_command(args) == 2
    assert "E_CONFIG_INVALID" in caplog.text and "CONVSCOPE_SECRET_KEY" in caplog.text
