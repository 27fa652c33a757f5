"""State_dicts of models built by a factory named in ``convscope.toml`` (``[model] factory``).

``factory = "package.module:Attribute.path"`` is imported by name from the installed packages
(installed code, not code from the checkpoint directory). Because the config itself is data from
the checkpoint directory, what it may *call* without ``--trust-code`` is limited to model
constructors: an ``nn.Module`` subclass, a method reached through one (``EfficientNet.from_name``)
or a function annotated to return one (torchvision's builders). Anything else (``os:system``,
``torch:load``) would let a config file run arbitrary code, so it needs the opt-in. A factory
that is a ``.py`` file in the checkpoint directory always needs the opt-in.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import typing
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from app.errors import CheckpointMismatch, CheckpointNeedsTrust, ConfigInvalid
from model_adapters.base import LoadedModel, ModelAdapter
from model_adapters.checkpoint_file import (check_finite, find_state_dict, fit_prefix,
                                            load_strict, read_checkpoint)
from model_adapters.config import CheckpointConfig
from model_adapters.loading import finish_checkpoint_model, wrap_trusted_module
from model_adapters.torchvision_builds import GENERIC_PREPROCESS

log = logging.getLogger(__name__)


class FactoryAdapter(ModelAdapter):
    """Checkpoints of a directory whose ``convscope.toml`` names ``[model] factory``."""

    name = "factory"

    def claims(self, path: Path, config: Any) -> bool:
        return config is not None and config.model.factory is not None

    def load(self, path: Path, config: Any, device: torch.device, *,
             trust_code: bool = False) -> LoadedModel:
        obj = read_checkpoint(path, trust_code=trust_code)   # refuses code files without trust
        if isinstance(obj, nn.Module):  # a full pickle or TorchScript, allowed by --trust-code
            return wrap_trusted_module(obj, path, config, device)
        factory = resolve_factory(config, trust_code=trust_code)
        return load_factory_state_dict(factory, find_state_dict(obj, path.name), path, config,
                                       device)


def load_factory_state_dict(factory: Callable[..., Any], state_dict: dict[str, torch.Tensor],
                            path: Path, config: CheckpointConfig,
                            device: torch.device) -> LoadedModel:
    module = build_from_factory(factory, config)
    fitted = fit_prefix(state_dict, set(module.state_dict()))
    width = classifier_width(module, fitted)
    if (width is not None and "num_classes" not in config.model.kwargs
            and _accepts_num_classes(factory)):
        # A fine-tuned checkpoint (e.g. 10 classes on a 1000-class factory default): build
        # again at the checkpoint's class count, as the torchvision adapter does.
        module = build_from_factory(factory, config, num_classes=width)
        fitted = fit_prefix(state_dict, set(module.state_dict()))
    check_finite(fitted, path.name)
    load_strict(module, fitted, path.name)
    loaded = finish_checkpoint_model(module, architecture=architecture_name(config, module),
                                     config=config, defaults=GENERIC_PREPROCESS, path=path,
                                     device=device, adapter=FactoryAdapter.name)
    wanted = config.model.num_classes
    if wanted is not None and wanted != loaded.meta.num_classes:
        raise CheckpointMismatch(f"The model built by the factory has {loaded.meta.num_classes} "
                                 f"outputs but convscope.toml says num_classes = {wanted}.")
    return loaded


def architecture_name(config: CheckpointConfig, module: nn.Module) -> str:
    """A readable name: the factory's first string argument (``efficientnet-lite0``) or the
    model's class name."""
    first = config.model.args[0] if config.model.args else None
    return first if isinstance(first, str) and len(first) <= 80 else type(module).__name__


def classifier_width(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> int | None:
    """The checkpoint's class count when it differs from ``module``'s only in the first
    dimension of the classifier's tensors (same keys, every other shape equal), else None."""
    expected = module.state_dict()
    if set(expected) != set(state_dict):
        return None
    built, saved = set(), set()
    for key, tensor in expected.items():
        shape, actual = tuple(tensor.shape), tuple(state_dict[key].shape)
        if shape == actual:
            continue
        if len(shape) != len(actual) or not shape or shape[1:] != actual[1:]:
            return None
        built.add(shape[0])
        saved.add(actual[0])
    return saved.pop() if len(built) == 1 and len(saved) == 1 else None


def _accepts_num_classes(factory: Callable[..., Any]) -> bool:
    try:
        parameters = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(parameter.name == "num_classes" or parameter.kind is parameter.VAR_KEYWORD
               for parameter in parameters)


def build_from_factory(factory: Callable[..., Any], config: CheckpointConfig,
                       **overrides: Any) -> nn.Module:
    try:
        module = factory(*config.model.args, **{**config.model.kwargs, **overrides})
    except Exception as error:  # noqa: BLE001 -- the factory is third-party code
        log.warning("Model factory %s failed: %s", config.model.factory, error)
        raise ConfigInvalid(f"convscope.toml: the model factory {config.model.factory!r} failed "
                            f"with these args/kwargs ({type(error).__name__}).",
                            fields={"model.factory": "a callable accepting args and kwargs"}
                            ) from None
    if not isinstance(module, nn.Module):
        raise ConfigInvalid(f"convscope.toml: the model factory {config.model.factory!r} did not "
                            "return a torch.nn.Module.",
                            fields={"model.factory": "a callable returning an nn.Module"})
    return module


def resolve_factory(config: CheckpointConfig, *, trust_code: bool) -> Callable[..., Any]:
    """Import ``module:attr.path``; refuse code from the directory and non-constructors unless
    trusted."""
    spec = config.model.factory or ""
    module_name, _, attribute_path = spec.partition(":")
    local_file = _local_module_file(config.directory, module_name)
    if local_file is None and not trust_code and _found_inside(config.directory, module_name):
        raise CheckpointNeedsTrust(f"The model factory {spec[:80]!r} is a package in the "
                                   "checkpoint directory; importing it needs --trust-code (or "
                                   "CONVSCOPE_TRUST_CODE=1).")
    if local_file is not None and not trust_code:
        raise CheckpointNeedsTrust(f"The model factory {spec[:80]!r} is a .py file in the "
                                   "checkpoint directory; running it needs --trust-code (or "
                                   "CONVSCOPE_TRUST_CODE=1).")
    owner: Any = (_import_local(local_file) if local_file is not None
                  else _import_installed(module_name, spec))
    chain: list[Any] = [owner]
    for part in attribute_path.split("."):
        if part.startswith("__"):  # dunders reach interpreter internals (type, __globals__)
            raise ConfigInvalid(f"convscope.toml: {spec[:80]!r} may not name dunder attributes.",
                                fields={"model.factory": "package.module:callable"})
        try:
            chain.append(getattr(chain[-1], part))
        except AttributeError:
            raise ConfigInvalid(f"convscope.toml: {spec[:80]!r} names nothing in that module.",
                                fields={"model.factory": "package.module:callable"}) from None
    factory = chain[-1]
    if not callable(factory):
        raise ConfigInvalid(f"convscope.toml: {spec[:80]!r} is not callable.",
                            fields={"model.factory": "package.module:callable"})
    if not trust_code and local_file is None and not _is_model_constructor(factory, chain[1:-1]):
        raise CheckpointNeedsTrust(f"The model factory {spec[:80]!r} is not a model class or "
                                   "builder; calling it needs --trust-code (or "
                                   "CONVSCOPE_TRUST_CODE=1).")
    return factory


def _local_module_file(directory: Path, module_name: str) -> Path | None:
    """The ``.py`` file in the checkpoint directory the factory refers to, if any."""
    if module_name.endswith(".py"):
        candidate = directory / module_name
        if candidate.name != module_name or not candidate.is_file():
            raise ConfigInvalid("convscope.toml: 'model.factory' names a .py file that is not in "
                                "the checkpoint directory.",
                                fields={"model.factory": "file.py:callable in the directory"})
        return candidate
    candidate = directory / f"{module_name.split('.')[0]}.py"
    return candidate if candidate.is_file() else None


def _found_inside(directory: Path, module_name: str) -> bool:
    """True when the import system would find the module's top-level package inside the
    checkpoint directory (it is on ``sys.path``, e.g. as the working directory): importing it
    would run the directory's code. ``find_spec`` of a top-level name imports nothing."""
    try:
        spec = importlib.util.find_spec(module_name.split(".")[0])
    except (ImportError, ValueError):
        return False
    if spec is None:
        return False
    root = directory.resolve()
    places = [spec.origin, *(spec.submodule_search_locations or [])]
    return any(place and Path(place).resolve().is_relative_to(root) for place in places)


def _import_installed(module_name: str, spec: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError:
        raise ConfigInvalid(f"convscope.toml: the module of factory {spec[:80]!r} is not "
                            "installed.", fields={"model.factory": "an installed module"}) from None
    except Exception as error:  # noqa: BLE001 -- a relative name (TypeError), or the module's
        # own import-time code failed
        raise ConfigInvalid(f"convscope.toml: the module of factory {spec[:80]!r} cannot be "
                            f"imported ({type(error).__name__}).",
                            fields={"model.factory": "an installed module"}) from None


def _import_local(path: Path) -> Any:
    """Import a trusted ``.py`` from the checkpoint dir under a unique name (no sys.path edit)."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(f"convscope_local_{digest}", path)
    if spec is None or spec.loader is None:
        raise ConfigInvalid("convscope.toml: the factory's .py file cannot be imported.")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 -- user code, trusted by the opt-in
        log.warning("Importing %s failed: %s", path.name, error)
        raise ConfigInvalid(f"convscope.toml: importing {path.name!r} failed "
                            f"({type(error).__name__}).") from None
    return module


def _is_model_class(value: Any) -> bool:
    return inspect.isclass(value) and issubclass(value, nn.Module)


def _is_model_constructor(factory: Any, owners: list[Any]) -> bool:
    """An nn.Module subclass, a method reached through one, or a function annotated to
    return one."""
    if _is_model_class(factory) or any(_is_model_class(owner) for owner in owners):
        return True
    try:
        returned = typing.get_type_hints(factory).get("return")
    except Exception:  # noqa: BLE001 -- unresolvable annotations: not provably a constructor
        return False
    return _is_model_class(returned)
