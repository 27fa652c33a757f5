"""gunicorn.conf.py, the Dockerfile and the healthcheck: the settings the deployment relies on."""
from __future__ import annotations

import __future__
import importlib.util
import re
import runpy
from pathlib import Path
from types import SimpleNamespace

import pytest
from gunicorn.config import Config

from benchmarks.load import free_port

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "gunicorn.conf.py"
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def load_conf(monkeypatch, **env: str) -> dict:
    for name in ("CONVSCOPE_BIND", "CONVSCOPE_WORKERS", "CONVSCOPE_THREADS",
                 "CONVSCOPE_GRACEFUL_TIMEOUT", "CONVSCOPE_WORKER_TIMEOUT", "CONVSCOPE_KEEPALIVE",
                 "CONVSCOPE_READ_TIMEOUT", "CONVSCOPE_MAX_CONNECTIONS", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CONVSCOPE_DEVICE", "cpu")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return runpy.run_path(str(CONF))


def settings_of(namespace: dict) -> dict:
    """The module-level names gunicorn reads as settings (not modules, helpers or __future__)."""
    return {name: value for name, value in namespace.items()
            if not name.startswith("_") and not callable(value) and name.islower()
            and not isinstance(value, (type(importlib), __future__._Feature))}


def test_defaults_are_the_production_choices(monkeypatch):
    conf = load_conf(monkeypatch)
    assert conf["wsgi_app"] == "app.asgi:create_asgi_app()"
    # The asyncio worker: slow clients wait on the event loop, never in an HTTP thread.
    assert conf["worker_class"] == "app.gunicorn_worker.ConvscopeWorker"
    assert conf["workers"] == 1 and conf["threads"] == 1
    assert conf["worker_connections"] == 1000 and conf["keepalive"] == 5
    assert conf["preload_app"] is False            # no torch/CUDA in the master
    assert conf["control_socket_disable"] is True  # == --no-control-socket
    assert conf["bind"] == ["127.0.0.1:8000"]      # loopback unless asked
    assert conf["timeout"] >= 60 and conf["graceful_timeout"] == 30
    assert conf["accesslog"] == "-" and conf["errorlog"] == "-"
    handlers = conf["logconfig_dict"]["handlers"]
    assert {h["stream"] for h in handlers.values()} == {"ext://sys.stdout"}


def test_every_setting_is_a_real_gunicorn_setting_with_a_valid_value(monkeypatch):
    conf = load_conf(monkeypatch)
    config = Config()
    for name, value in settings_of(conf).items():
        assert name in config.settings, f"{name} is not a gunicorn setting (typo?)"
        config.set(name, value)  # runs gunicorn's validator
    hooks = {"pre_fork", "post_fork", "worker_exit"}
    assert hooks <= set(conf) and all(name in config.settings for name in hooks)


def test_environment_overrides(monkeypatch):
    conf = load_conf(monkeypatch, CONVSCOPE_BIND="0.0.0.0:9000", CONVSCOPE_WORKERS="3",
                     CONVSCOPE_GRACEFUL_TIMEOUT="45", CONVSCOPE_KEEPALIVE="2",
                     CONVSCOPE_MAX_CONNECTIONS="50")
    assert conf["bind"] == ["0.0.0.0:9000"]
    assert (conf["workers"], conf["graceful_timeout"]) == (3, 45)
    assert conf["keepalive"] == 2 and conf["worker_connections"] == 50


@pytest.mark.parametrize("name", ["CONVSCOPE_WORKERS", "CONVSCOPE_THREADS",
                                  "CONVSCOPE_DRAIN_MAX_MB", "CONVSCOPE_MAX_CONNECTIONS"])
@pytest.mark.parametrize("value", ["many", "0", "-2", "1.5"])
def test_bad_numbers_stop_startup_with_a_message(monkeypatch, name, value):
    with pytest.raises(SystemExit, match=name):
        load_conf(monkeypatch, **{name: value})


@pytest.mark.parametrize("value", ["soon", "0", "-1", "7200"])
def test_bad_read_timeouts_stop_startup(monkeypatch, value):
    with pytest.raises(SystemExit, match="CONVSCOPE_READ_TIMEOUT"):
        load_conf(monkeypatch, CONVSCOPE_READ_TIMEOUT=value)


def test_the_bridge_is_sized_by_the_same_variables(monkeypatch):
    import app
    from app.asgi import create_asgi_app
    from flask import Flask

    flask_app = Flask("sized")
    flask_app.config["MAX_CONTENT_LENGTH"] = 512 * 1024
    monkeypatch.setattr(app, "create_app", lambda test_config=None: flask_app)
    monkeypatch.setenv("CONVSCOPE_THREADS", "3")
    monkeypatch.setenv("CONVSCOPE_READ_TIMEOUT", "7.5")
    monkeypatch.setenv("CONVSCOPE_DRAIN_MAX_MB", "2")
    bridge = create_asgi_app()
    assert bridge.flask_app is flask_app
    assert bridge.pool._max_workers == 3 and bridge.read_timeout == 7.5
    assert bridge.drain_max_bytes == 2 * 1024 * 1024
    assert bridge.max_body == 512 * 1024             # the app's MAX_CONTENT_LENGTH


# --- one worker per device, counted without touching CUDA ----------------------------------

@pytest.fixture
def conf(monkeypatch):
    return load_conf(monkeypatch)


@pytest.mark.parametrize("environ, expected", [
    ({"CONVSCOPE_DEVICE": "cpu", "CUDA_VISIBLE_DEVICES": "0,1"}, 0),
    ({"CONVSCOPE_DEVICE": "cuda:1", "CUDA_VISIBLE_DEVICES": "0,1"}, 0),
    ({"CONVSCOPE_DEVICE": "auto", "CUDA_VISIBLE_DEVICES": "0,1,2"}, 3),
    ({"CONVSCOPE_DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": "GPU-abc,GPU-def"}, 2),
    ({"CUDA_VISIBLE_DEVICES": ""}, 0),
    ({"CUDA_VISIBLE_DEVICES": "-1"}, 0),
    ({"CUDA_VISIBLE_DEVICES": "0,-1,2"}, 1),
])
def test_visible_gpu_count_from_the_environment(conf, environ, expected):
    assert conf["visible_gpu_count"](environ, torch_has_cuda=True) == expected


def test_visible_gpu_count_from_the_driver_and_for_cpu_torch(conf, tmp_path):
    for index in range(4):
        (tmp_path / f"0000:0{index}:00.0").mkdir()
    count = conf["visible_gpu_count"]
    assert count({}, proc_gpus=str(tmp_path), torch_has_cuda=True) == 4
    assert count({}, proc_gpus=str(tmp_path), torch_has_cuda=False) == 0   # a +cpu torch build
    assert count({}, proc_gpus=str(tmp_path / "absent"), torch_has_cuda=True) == 0


def test_default_workers_is_one_per_gpu_and_at_least_one(conf):
    workers = conf["default_workers"]
    assert workers({"CUDA_VISIBLE_DEVICES": "0,1"}, torch_has_cuda=True) == 2
    assert workers({"CUDA_VISIBLE_DEVICES": ""}, torch_has_cuda=True) == 1
    assert workers({"CUDA_VISIBLE_DEVICES": "0,1", "CONVSCOPE_WORKERS": "1"},
                   torch_has_cuda=True) == 1


def test_each_worker_gets_its_own_gpu_and_a_replacement_takes_the_free_one(conf):
    server = SimpleNamespace(WORKERS={})
    for pid in (101, 102, 103):
        worker = SimpleNamespace()
        conf["pre_fork"](server, worker)
        server.WORKERS[pid] = worker
    assert [w.convscope_slot for w in server.WORKERS.values()] == [0, 1, 2]
    del server.WORKERS[102]                      # killed
    replacement = SimpleNamespace()
    conf["pre_fork"](server, replacement)
    assert replacement.convscope_slot == 1
    device = conf["worker_device"]
    assert device(1, 3, {"CONVSCOPE_DEVICE": "auto"}) == "cuda:1"
    assert device(4, 3, {"CONVSCOPE_DEVICE": "cuda"}) == "cuda:1"
    assert device(0, 1, {"CONVSCOPE_DEVICE": "auto"}) is None   # one GPU: leave "auto"
    assert device(1, 3, {"CONVSCOPE_DEVICE": "cpu"}) is None
    assert device(1, 3, {"CONVSCOPE_DEVICE": "cuda:2"}) is None


# --- graceful shutdown hook ----------------------------------------------------------------

def test_worker_exit_cancels_jobs_within_the_grace_period(conf):
    calls = []
    services = SimpleNamespace(shutdown=lambda timeout: calls.append(timeout))
    flask_app = SimpleNamespace(extensions={"convscope": services})
    worker = SimpleNamespace(asgi=SimpleNamespace(flask_app=flask_app))   # behind the bridge
    conf["worker_exit"](SimpleNamespace(), worker)
    assert len(calls) == 1 and 0 < calls[0] < conf["graceful_timeout"]
    conf["worker_exit"](SimpleNamespace(), SimpleNamespace(wsgi=flask_app))  # a WSGI worker
    assert len(calls) == 2


@pytest.mark.parametrize("worker", [SimpleNamespace(), SimpleNamespace(wsgi=None),
                                    SimpleNamespace(wsgi=SimpleNamespace(extensions={}))])
def test_worker_exit_without_an_app_does_nothing(conf, worker):
    conf["worker_exit"](SimpleNamespace(), worker)  # the master calls it for vanished workers


# --- Dockerfile and healthcheck ------------------------------------------------------------

def dockerfile_env() -> dict[str, str]:
    env = {}
    for block in re.findall(r"^ENV (.*?)(?<!\\)$", DOCKERFILE, flags=re.M | re.S):
        for name, value in re.findall(r"(\w+)=(\S+)", block.replace("\\\n", " ")):
            env[name] = value
    return env


def test_dockerfile_runs_gunicorn_as_a_non_root_user_with_matching_grace(monkeypatch):
    env = dockerfile_env()
    assert re.search(r"^USER convscope$", DOCKERFILE, flags=re.M)
    assert re.search(r"^STOPSIGNAL SIGTERM$", DOCKERFILE, flags=re.M)
    assert 'CMD ["gunicorn", "--config", "/opt/convscope/gunicorn.conf.py", ' \
           '"--no-control-socket"]' in DOCKERFILE
    conf = load_conf(monkeypatch, CONVSCOPE_GRACEFUL_TIMEOUT=env["CONVSCOPE_GRACEFUL_TIMEOUT"])
    assert conf["graceful_timeout"] == 30
    # The documented stop grace must exceed gunicorn's, or Docker SIGKILLs mid-shutdown.
    stop_timeouts = {int(t) for t in re.findall(r"--stop-timeout (\d+)", DOCKERFILE)}
    docs = (ROOT / "docs" / "deploying.md").read_text()
    stop_timeouts |= {int(t) for t in re.findall(r"--stop-timeout (\d+)", docs)}
    assert stop_timeouts and min(stop_timeouts) > conf["graceful_timeout"]


def test_dockerfile_volumes_and_settings():
    env = dockerfile_env()
    assert env["CONVSCOPE_CHECKPOINT_DIR"] == "/checkpoints"
    assert env["CONVSCOPE_DATA_DIR"] == "/data"
    assert env["CONVSCOPE_BIND"] == "0.0.0.0:8000"   # inside the container; publish on loopback
    assert env["MALLOC_ARENA_MAX"] == "2"            # a flat heap under load (README)
    # Fixed, not glibc's self-raising threshold; 4 MiB made jobs 1.6x slower (README).
    assert env["MALLOC_MMAP_THRESHOLD_"] == "33554432"
    assert env["MALLOC_TRIM_THRESHOLD_"] == "4194304"
    assert 'VOLUME ["/data"]' in DOCKERFILE
    assert re.search(r"^HEALTHCHECK .*\n\s+CMD \[\"convscope-healthcheck\"\]", DOCKERFILE,
                     flags=re.M)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", DOCKERFILE, flags=re.M)


def test_dockerignore_keeps_the_build_context_small():
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "tests", "**/__pycache__"} <= ignored
    assert "scripts" not in ignored  # the healthcheck lives there


@pytest.fixture(scope="module")
def healthcheck():
    spec = importlib.util.spec_from_loader(
        "container_healthcheck", loader=None, origin=str(ROOT / "scripts/container-healthcheck"))
    module = importlib.util.module_from_spec(spec)
    exec(compile((ROOT / "scripts/container-healthcheck").read_text(), "healthcheck", "exec"),
         module.__dict__)
    return module


@pytest.mark.parametrize("bind, url", [
    ("0.0.0.0:8000", "http://127.0.0.1:8000/api/v1/health"),
    ("127.0.0.1:5123", "http://127.0.0.1:5123/api/v1/health"),
    ("[::]:8000", "http://127.0.0.1:8000/api/v1/health"),
    ("10.1.2.3:80", "http://10.1.2.3:80/api/v1/health"),
])
def test_healthcheck_url(healthcheck, bind, url):
    assert healthcheck.health_url(bind) == url


def test_healthcheck_fails_when_nothing_listens(healthcheck, monkeypatch):
    monkeypatch.setenv("CONVSCOPE_BIND", f"127.0.0.1:{free_port()}")
    assert healthcheck.main() == 1




def test_every_variable_the_deployment_reads_is_documented():
    read = set(re.findall(r"CONVSCOPE_[A-Z_]+", CONF.read_text()))
    read |= set(re.findall(r"CONVSCOPE_[A-Z_]+", (ROOT / "app" / "asgi.py").read_text()))
    read |= set(re.findall(r"CONVSCOPE_[A-Z_]+", (ROOT / "app" / "gunicorn_worker.py").read_text()))
    for document in (ROOT / "docs" / "deploying.md", ROOT / "README.md"):
        text = document.read_text()
        missing = sorted(name for name in read if f"`{name}`" not in text)
        assert not missing, f"{document.name} lacks {missing}"


def test_the_master_loads_no_torch_flask_or_app_code():
    """gunicorn imports the worker class and reads the config in the master: neither may pull
    in torch (CUDA would initialize before the fork) or build the app."""
    import subprocess
    import sys

    script = ("import runpy, sys; runpy.run_path('gunicorn.conf.py'); "
              "import app.gunicorn_worker, app.asgi; "
              "print(sorted(m for m in ('torch', 'flask', 'app.factory', 'PIL') "
              "if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin",
                                                        "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-1000:]
    assert result.stdout.strip() == "[]", result.stdout


def test_the_compose_file_runs_broker_mode_with_a_worker_per_gpu():
    """deploy/compose.yaml (README, "Scaling out"): every convscope service shares the broker,
    the data volume and the token secret; the web service never touches a GPU; each worker owns
    one reserved GPU and runs `convscope worker`; Redis keeps its queue on a volume."""
    compose = (ROOT / "deploy" / "compose.yaml").read_text()
    services = re.split(r"\n  (?=[\w-]+:\n)", compose.split("\nservices:\n", 1)[1]
                        .split("\nvolumes:\n", 1)[0])
    by_name = {block.split(":", 1)[0].strip(): block for block in services}
    assert set(by_name) == {"redis", "web", "worker-gpu0", "worker-gpu1"}
    anchor = compose.split("x-convscope:", 1)[1].split("\nservices:", 1)[0]
    for needed in ("CONVSCOPE_BROKER_URL: redis://redis:6379/0", "CONVSCOPE_DATA_DIR: /data",
                   "convscope-data:/data", "/checkpoints:ro",
                   "CONVSCOPE_AUTH_TOKEN_FILE: /run/secrets/convscope_auth_token"):
        assert needed in anchor, needed
    assert "CONVSCOPE_DEVICE: cpu" in by_name["web"] and "deploy:" not in by_name["web"]
    for gpu in ("0", "1"):
        worker = by_name[f"worker-gpu{gpu}"]
        assert '["convscope", "worker", "--device", "cuda:0"]' in worker
        assert f'device_ids: ["{gpu}"]' in worker and "driver: nvidia" in worker
    assert "appendonly" in by_name["redis"] and "redis-data:/data" in by_name["redis"]
    assert "file: ./auth_token.txt" in compose
