"""The server's configuration: one frozen ``Settings`` built from ``CONVSCOPE_*`` environment
variables and ``create_app(test_config)``, validated once at startup.

Bad configuration fails when the app is built (``ConfigInvalid`` naming the variable), never on
the first request. ``test_config`` keys are the field names below (lower case); they win over
the environment. Everything else in the app reads settings from here, not from ``os.environ``.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from app.errors import ConfigInvalid

ENV_PREFIX = "CONVSCOPE_"


def default_data_dir() -> Path:
    """Per-user cache directory: results are a cache (content-addressed, safe to delete), so they
    go where caches go rather than into whatever directory the server was started from."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "convscope"


@dataclass(frozen=True)
class Settings:
    """Server settings. Each field's metadata names its environment variable and help text
    (the README's configuration table is this list)."""

    checkpoint_dir: Path | None = field(default=None, metadata={
        "help": "checkpoint directory to serve (default: the bundled demo)"})
    dataset_dir: Path | None = field(default=None, metadata={
        "help": "folder whose subfolders are the labelled datasets offered for evaluation "
                "(default: the bundled sample set when serving the demo, else none)"})
    max_dataset_images: int = field(default=100_000, metadata={
        "help": "most images one dataset evaluation reads (E_DATASET_TOO_LARGE above)",
        "min": 1})
    data_dir: Path = field(default_factory=default_data_dir, metadata={
        "help": "where uploaded images, results and job records are stored"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    trust_code: bool = field(default=False, metadata={
        "help": "allow checkpoints that execute code when loaded"})
    queue_size: int = field(default=16, metadata={
        "help": "jobs that may wait for the executor; more are refused with 503 E_BUSY", "min": 1})
    retry_after_s: int = field(default=5, metadata={
        "help": "Retry-After seconds sent with 503 E_BUSY", "min": 1})
    max_cost: int = field(default=5000, metadata={
        "help": "most model evaluations one visualization may need per image and target "
                "(E_TOO_EXPENSIVE above)", "min": 1})
    max_job_cost: int = field(default=10000, metadata={
        "help": "most model evaluations one job may need in all: methods x images x targets, "
                "counting the true and predicted class of a possible failure case "
                "(E_TOO_EXPENSIVE above); keeps one job from holding the device for hours",
        "min": 1})
    max_images_per_job: int = field(default=16, metadata={"help": "images in one job", "min": 1})
    max_targets_per_job: int = field(default=5, metadata={
        "help": "target classes in one job", "min": 1})
    max_files_per_request: int = field(default=16, metadata={
        "help": "image files in one upload request", "min": 1})
    max_request_mb: float = field(default=64.0, metadata={
        "help": "largest request body in MiB (413 above)", "min": 0.001})
    max_request_megapixels: float = field(default=100.0, metadata={
        "help": "pixels, as their headers claim, of all the images in one upload request, in "
                "megapixels (413 E_IMAGE_TOO_LARGE above, before anything is decoded)",
        "min": 0.001})
    decode_budget_mb: float = field(default=512.0, metadata={
        "help": "memory in MiB that the image decodes of one server process may hold at once "
                "(estimated from each image's header); further uploads wait for it, then get "
                "503 E_BUSY with Retry-After", "min": 1})
    top_k: int = field(default=5, metadata={"help": "predictions listed per image", "min": 1})
    uncertainty: bool = field(default=True, metadata={
        "help": "compute how far to believe each prediction (test-time augmentation, MC "
                "dropout, entropy, an out-of-distribution hint): about 16 extra forward passes "
                "per image, in two small batches"})
    faithfulness: bool = field(default=True, metadata={
        "help": "score every map's faithfulness (deletion and insertion against random "
                "rankings, shown as a badge on each panel): 66 extra batched forward passes per "
                "panel, 198 more per image and target; a job's \"faithfulness\" field "
                "overrides it"})
    batch_size: int | None = field(default=None, metadata={
        "help": "perturbation/step batch size for the methods (default: each method decides)",
        "min": 1})
    store_max_mb: float = field(default=2048.0, metadata={
        "help": "size quota in MiB for stored results and uploaded images; the least recently "
                "used are evicted first (0: no quota)", "min": 0})
    result_ttl_hours: float = field(default=168.0, metadata={
        "help": "results, uploaded images and job records unused for this many hours are "
                "removed; their URLs then answer 410 E_RESULT_EXPIRED (0: keep forever)",
        "min": 0})
    env: str = field(default="development", metadata={
        "help": "production: refuse to start without CONVSCOPE_SECRET_KEY or with "
                "CONVSCOPE_DEBUG. Never guessed: set it for every team deployment (gunicorn, "
                "Docker); gunicorn workers without it log a warning",
        "choices": ("development", "production")})
    secret_key: str = field(default="", repr=False, metadata={
        "help": "signs session cookies and CSRF tokens; required in production, and by "
                "several gunicorn workers sharing sessions (default: random per process)"})
    auth_token: str = field(default="", repr=False, metadata={
        "help": "when set, the API needs 'Authorization: Bearer <token>' and browsers log in "
                "with it (at least 16 characters; default: no authentication)"})
    auth_token_file: Path | None = field(default=None, metadata={
        "help": "a file holding the token (e.g. a Docker secret), instead of "
                "CONVSCOPE_AUTH_TOKEN"})
    session_hours: float = field(default=12.0, metadata={
        "help": "a browser login lasts this many hours after the last request", "min": 0.001})
    session_max_hours: float = field(default=24.0, metadata={
        "help": "a browser login ends this many hours after it began, however active "
                "(absolute lifetime); signing out ends it at once on every worker",
        "min": 0.001})
    secure_cookies: bool = field(default=False, metadata={
        "help": "send the session cookie only over HTTPS (set it behind a TLS proxy)"})
    allowed_hosts: str = field(default="localhost", metadata={
        "help": "comma-separated host names the server answers to ('.example.com' matches "
                "subdomains, '*' any); IP addresses always work; other Host headers get "
                "400 E_BAD_HOST (DNS rebinding)"})
    broker_url: str = field(default="", metadata={
        "help": "Redis URL (redis://host:6379/0, rediss://, unix://): jobs run on "
                "`convscope worker` processes over Celery instead of in the web process, which "
                "then never loads a model; every web process and worker must share "
                "CONVSCOPE_DATA_DIR (default: none, the embedded executor)"})
    broker_visibility_timeout_s: int = field(default=7200, metadata={
        "help": "seconds Redis keeps a task a worker took but did not acknowledge before "
                "handing it out again; above the longest job (a dead worker's job is re-sent "
                "within seconds anyway, through its expired claim)", "min": 60})
    debug: bool = field(default=False, metadata={
        "help": "Flask debug mode for convscope serve; refused on a non-loopback address "
                "and in production"})
    testing: bool = field(default=False, metadata={"help": "Flask testing mode"})

    @property
    def production(self) -> bool:
        return self.env == "production"

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_token)

    def allowed_host_names(self) -> tuple[str, ...]:
        """The ``allowed_hosts`` entries, lower case, without ports or blanks."""
        return tuple(name.strip().lower() for name in self.allowed_hosts.split(",")
                     if name.strip())

    def as_table(self) -> list[tuple[str, str, str]]:
        """(environment variable, default, help) rows for documentation."""
        rows = []
        for f in dataclasses.fields(self):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING \
                else f.default
            rows.append((env_name(f.name), "" if default in (None, "") else str(default),
                         f.metadata.get("help", "")))
        return rows


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _field_type(f: dataclasses.Field) -> str:
    text = str(f.type)
    for name in ("bool", "int", "float", "Path", "str"):
        if text.startswith(name):
            return name
    raise AssertionError(f"unsupported settings type {text}")


def _convert(f: dataclasses.Field, raw: Any, source: str) -> Any:
    """Convert an environment string or a test_config value to the field's type."""
    kind = _field_type(f)
    nullable = "None" in str(f.type)

    def bad(expected: str) -> ConfigInvalid:
        return ConfigInvalid(f"{source} must be {expected}, got {str(raw)[:80]!r}.",
                             fields={env_name(f.name): expected})

    if raw is None or (isinstance(raw, str) and raw.strip() == "" and nullable):
        if nullable:
            return None
        raise bad("set")
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise bad("true or false")
    if kind in ("int", "float"):
        if isinstance(raw, bool):
            raise bad("a number")
        try:
            value = int(str(raw).strip()) if kind == "int" else float(str(raw).strip())
        except ValueError:
            raise bad("an integer" if kind == "int" else "a number") from None
        low = f.metadata.get("min")
        if low is not None and value < low:
            raise bad(f"at least {low}")
        return value
    if kind == "Path":
        return Path(str(raw)).expanduser()
    choices = f.metadata.get("choices")
    if choices is not None:
        text = str(raw).strip().lower()
        if text not in choices:
            raise bad(" or ".join(choices))
        return text
    return str(raw)


def load_settings(test_config: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from ``environ`` (default ``os.environ``) overridden by ``test_config``.

    Unknown ``test_config`` keys are refused so a typo cannot silently fall back to a default.
    """
    environ = os.environ if environ is None else environ
    overrides = dict(test_config or {})
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigInvalid(f"Unknown setting {unknown[0]!r}; known: {', '.join(fields)}.",
                            fields={name: "unknown setting" for name in unknown})
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name in overrides:
            values[name] = _convert(f, overrides[name], f"setting {name!r}")
        elif env_name(name) in environ:
            values[name] = _convert(f, environ[env_name(name)], env_name(name))
    settings = Settings(**values)
    return _validated(settings)


def _validated(settings: Settings) -> Settings:
    """Check what can be checked before serving: directories exist / can be created."""
    if settings.checkpoint_dir is not None and not settings.checkpoint_dir.is_dir():
        raise ConfigInvalid("The checkpoint directory does not exist or is not a directory.",
                            fields={env_name("checkpoint_dir"): "an existing directory"})
    if settings.dataset_dir is not None and not settings.dataset_dir.is_dir():
        raise ConfigInvalid("The dataset directory does not exist or is not a directory.",
                            fields={env_name("dataset_dir"): "an existing directory"})
    try:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        probe = settings.data_dir / f".write-test-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:
        raise ConfigInvalid("The data directory cannot be created or is not writable.",
                            fields={env_name("data_dir"): "a writable directory"}) from None
    settings = _with_auth_token(settings)
    _check_broker_url(settings)
    _check_production(settings)
    if not settings.secret_key:
        # Random per process: CSRF tokens and sessions do not survive a restart or span workers.
        settings = dataclasses.replace(settings, secret_key=secrets.token_hex(32))
    return settings


MIN_SECRET_LENGTH = 16
BROKER_SCHEMES = ("redis://", "rediss://", "unix://")


def _check_broker_url(settings: Settings) -> None:
    url = settings.broker_url.strip()
    if url and not url.startswith(BROKER_SCHEMES):
        raise ConfigInvalid("CONVSCOPE_BROKER_URL must be a Redis URL (redis://host:6379/0, "
                            "rediss://... or unix:///path/redis.sock).",
                            fields={env_name("broker_url"): "a redis:// URL"})


def _with_auth_token(settings: Settings) -> Settings:
    """Read ``auth_token_file`` into ``auth_token``; refuse ambiguous or guessable tokens."""
    token_var, file_var = env_name("auth_token"), env_name("auth_token_file")
    token = settings.auth_token
    if settings.auth_token_file is not None:
        if token:
            raise ConfigInvalid(f"Set {token_var} or {file_var}, not both.",
                                fields={token_var: "unset", file_var: "unset"})
        try:
            token = settings.auth_token_file.read_text("utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise ConfigInvalid(f"The file named by {file_var} cannot be read.",
                                fields={file_var: "a readable file"}) from None
        if not token:
            raise ConfigInvalid(f"The file named by {file_var} is empty.",
                                fields={file_var: "a file holding the token"})
    token = token.strip()
    if token and len(token) < MIN_SECRET_LENGTH:
        variable = file_var if settings.auth_token_file is not None else token_var
        raise ConfigInvalid(f"The authentication token ({variable}) must be at least "
                            f"{MIN_SECRET_LENGTH} characters long; use a random one such as "
                            "`openssl rand -hex 32`.",
                            fields={variable: f"at least {MIN_SECRET_LENGTH} characters"})
    return dataclasses.replace(settings, auth_token=token)


def _check_production(settings: Settings) -> None:
    """Production mode refuses what is only safe on a developer's laptop."""
    if not settings.production:
        return
    key_var = env_name("secret_key")
    if not settings.secret_key:
        raise ConfigInvalid(f"CONVSCOPE_ENV=production needs {key_var}: a long random string "
                            "(e.g. `openssl rand -hex 32`) that signs sessions and CSRF tokens.",
                            fields={key_var: "set"})
    if len(settings.secret_key) < MIN_SECRET_LENGTH:
        raise ConfigInvalid(f"{key_var} must be at least {MIN_SECRET_LENGTH} characters long "
                            "in production.", fields={key_var: f"at least {MIN_SECRET_LENGTH} "
                                                               "characters"})
    if settings.debug:
        raise ConfigInvalid(f"{env_name('debug')} is refused with CONVSCOPE_ENV=production: the "
                            "debugger must never face other users.",
                            fields={env_name("debug"): "false"})
