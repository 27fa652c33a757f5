"""The Visualization interface: self-describing methods with declared, validated parameters.

A method is one subclass with ``name``, ``title``, ``description``, ``reference``, a frozen
``Params`` dataclass (fields declared with ``param(...)``) and one hook, ``compute``. The base
class owns the pipeline around it, as pytorch-grad-cam's ``BaseCAM`` does: parameter parsing,
target resolution, the model lock, timing, finiteness checks, error mapping and hook cleanup.

Plugins never import Flask and never touch disk or HTTP.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
import types
import typing
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np

from app.errors import (BadParameter, DeviceOOM, MethodUnsupported, ModelOutputInvalid,
                        UnknownClass, UnknownVisualization)
from app.registry import Registry
from visualizations.context import RunContext

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel, ModelMeta


# --- declared parameters -------------------------------------------------------------------

AUTO = None  # a parameter whose default depends on the model (e.g. window = 1/8 input side)


def param(default: Any, *, label: str, help: str, min: float | None = None,
          max: float | None = None, choices: Sequence[Any] | None = None,
          choices_from: str | None = None) -> Any:
    """Declare a parameter field. ``choices_from`` names a ModelMeta attribute that supplies the
    choices at run time (e.g. ``"cam_layers"``); ``default=AUTO`` means "decided per model"."""
    return field(default=default, metadata={
        "label": label, "help": help, "min": min, "max": max,
        "choices": tuple(choices) if choices is not None else None, "choices_from": choices_from})


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as shown to users (HTML form, JSON schema, CLI help)."""

    name: str
    kind: str                 # "int" | "float" | "bool" | "choice" | "str"
    default: Any
    min: float | None
    max: float | None
    choices: tuple[Any, ...] | None
    label: str
    help: str
    nullable: bool            # default AUTO: omitted or null means "decided per model"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "default": self.default, "min": self.min,
                "max": self.max, "choices": list(self.choices) if self.choices else None,
                "label": self.label, "help": self.help}


def _base_type(annotation: Any) -> tuple[type, bool]:
    """(int|float|bool|str, nullable) from a field annotation such as ``int | None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(annotation))
    return annotation, False


def param_specs(params_cls: type, meta: "ModelMeta | None" = None) -> list[ParamSpec]:
    """The declared parameters of a Params class; with ``meta``, model-dependent choices filled."""
    hints = typing.get_type_hints(params_cls)
    specs = []
    for f in dataclasses.fields(params_cls):
        base, nullable = _base_type(hints[f.name])
        md = f.metadata
        choices = md.get("choices")
        if md.get("choices_from") and meta is not None:
            choices = tuple(getattr(meta, md["choices_from"]))
        kind = {int: "int", float: "float", bool: "bool"}.get(base, "str")
        if choices is not None or md.get("choices_from"):
            kind = "choice"
        specs.append(ParamSpec(name=f.name, kind=kind, default=f.default, min=md.get("min"),
                               max=md.get("max"), choices=choices, label=md.get("label", f.name),
                               help=md.get("help", ""), nullable=nullable or f.default is None))
    return specs


# Numbers as forms and command lines write them: ASCII only, and short (a longer one is out of
# any range we declare, and a 4,000-digit string is slow to convert).
_ASCII_INTEGER = re.compile(r"[+-]?[0-9]{1,30}")
_ASCII_NUMBER = re.compile(r"[+-]?(?:[0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})"
                           r"(?:[eE][+-]?[0-9]{1,4})?")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(spec: ParamSpec, base: type, raw: Any) -> Any:
    """Convert a JSON value or a form/CLI string to the declared type, or raise BadParameter."""
    def bad(expected: str) -> BadParameter:
        return BadParameter(f"Parameter {spec.name!r} must be {expected}.",
                            fields={spec.name: expected})

    if raw is None or (isinstance(raw, str) and raw.strip().lower() in ("", "auto")):
        if spec.nullable:
            return None
        raise bad(f"given (default {spec.default!r})")
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise bad("true or false")
    if base is int:
        if isinstance(raw, bool):
            raise bad("an integer")
        if isinstance(raw, float) and raw.is_integer():
            raw = int(raw)
        if isinstance(raw, str):
            # ASCII digits only: int() also reads Arabic-Indic, fullwidth and other Unicode
            # digits, which no form or CLI user means as a number here.
            text = raw.strip()
            if not _ASCII_INTEGER.fullmatch(text):
                raise bad("an integer (digits 0-9)")
            raw = int(text)
        if not isinstance(raw, int):
            raise bad("an integer")
        return raw
    if base is float:
        if isinstance(raw, bool):
            raise bad("a number")
        if isinstance(raw, str):
            if not _ASCII_NUMBER.fullmatch(raw.strip()):
                raise bad("a number (digits 0-9)")
            raw = raw.strip()
        try:
            value = float(raw)
        except (TypeError, ValueError, OverflowError):
            raise bad("a number") from None
        if not math.isfinite(value):
            raise bad("a finite number")
        return value
    if not isinstance(raw, str):
        raise bad("a string")
    return raw.strip()


def _shown(value: Any) -> str:
    """A value for a message, never longer than a line (a JSON body may carry a 4,000-digit
    number, which the message must not echo back)."""
    text = repr(value)
    if len(text) <= 24:
        return text
    if isinstance(value, int):
        return f"a {len(str(abs(value)))}-digit number"
    return text[:20] + "\u2026"


def _range_text(spec: ParamSpec) -> str:
    if spec.choices is not None:
        return "one of " + ", ".join(map(str, spec.choices))
    low = "" if spec.min is None else f"{spec.min:g}"
    high = "" if spec.max is None else f"{spec.max:g}"
    return f"in [{low}, {high}]"


def parse_params(params_cls: type, raw: Mapping[str, Any] | None,
                 meta: "ModelMeta | None" = None) -> Any:
    """Validate user input into a frozen Params instance. Unknown, wrongly typed, out-of-range
    and (with ``meta``) invalid model-dependent choices raise BadParameter naming the field."""
    raw = dict(raw or {})
    specs = {spec.name: spec for spec in param_specs(params_cls, meta)}
    unknown = sorted(set(raw) - set(specs))
    if unknown:
        raise BadParameter(f"Unknown parameter {unknown[0]!r}; known: {', '.join(specs)}.",
                           fields={name: "unknown parameter" for name in unknown})
    hints = typing.get_type_hints(params_cls)
    values = {}
    for name, spec in specs.items():
        if name not in raw:
            continue
        base, _ = _base_type(hints[name])
        value = _coerce(spec, base, raw[name])
        if value is not None:
            if spec.min is not None and value < spec.min or spec.max is not None and value > spec.max:
                raise BadParameter(f"Parameter {name!r} = {_shown(value)} is out of range; it "
                                   f"must be {_range_text(spec)}.",
                                   fields={name: _range_text(spec)})
            if spec.choices is not None and value not in spec.choices:
                raise BadParameter(f"Parameter {name!r} = {str(value)[:80]!r} is not allowed; it "
                                   f"must be {_range_text(spec)}.", fields={name: _range_text(spec)})
        values[name] = value
    return params_cls(**values)


def params_to_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


# --- results -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TargetInfo:
    index: int
    label: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "label": self.label, "probability": self.probability}


@dataclass(frozen=True)
class Panel:
    """One picture of a result. ``kind="heatmap"``: ``values`` is float32 (H, W) at the model's
    input resolution, ``signed`` says whether 0 is the neutral middle. ``kind="image"``:
    ``values`` is a uint8 (H, W, 3) illustration (e.g. the occlusion grid)."""

    title: str
    values: np.ndarray
    signed: bool = False
    target: TargetInfo | None = None
    kind: str = "heatmap"
    scale: tuple[float, float] | None = None  # fixed colour scale (e.g. probabilities 0..1)
    # Figures the method measured about this panel (e.g. integrated gradients' completeness
    # error) and plain-language caveats shown beside it (e.g. "only partly guided").
    metrics: Mapping[str, float] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    # Method-specific facts that belong in the panel record itself, JSON values only (e.g. the
    # adversarial method's "epsilon" and "new_class").
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def value_range(self) -> tuple[float, float]:
        if self.kind != "heatmap":
            return (0.0, 255.0)
        if self.scale is not None:
            return (float(self.scale[0]), float(self.scale[1]))
        low, high = float(self.values.min()), float(self.values.max())
        if self.signed:
            bound = max(abs(low), abs(high))
            return (-bound, bound)
        return (low, high)


@dataclass(frozen=True)
class Attribution:
    """What ``compute`` returns for one target: one or more panels (no I/O)."""

    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class VisualizationResult:
    """What ``run`` returns: all panels for all targets, the params used, and timing."""

    method: str
    params: dict[str, Any]
    elapsed_ms: float
    probabilities: np.ndarray          # (num_classes,) for the input image
    panels: tuple[Panel, ...]


# --- running -------------------------------------------------------------------------------

def is_predicted(spec: int | str) -> bool:
    """Whether a target spec means "the model's top class" rather than an index or label."""
    return isinstance(spec, str) and spec.strip().lower() in ("predicted", "prediction", "top1")


def resolve_targets(meta: "ModelMeta", predicted: int,
                    targets: Sequence[int | str] | None) -> list[int]:
    """Class indices for ``"predicted"`` / index / label specs, in order, without repeats;
    ``predicted`` is the model's top class for this image. The one place "predicted" is
    resolved: ``Visualization.run`` and ``app.pipeline`` both call it."""
    indices: list[int] = []
    for spec in targets or ["predicted"]:
        index = int(predicted) if is_predicted(spec) else meta.class_index(spec)
        if index not in indices:
            indices.append(index)
    if not indices:
        raise UnknownClass("No target class given.")
    return indices


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hook_ids(module: "torch.nn.Module") -> set[tuple[int, str, int]]:
    """Every hook handle id on the module tree, to find hooks a method forgot to remove."""
    return {(id(m), name, key) for m in module.modules() for name in _HOOK_DICTS
            for key in getattr(m, name, {})}


class Visualization(ABC):
    """Base class: subclasses declare metadata and ``Params`` and implement ``compute``."""

    name: ClassVar[str]
    title: ClassVar[str]
    description: ClassVar[str]
    reference: ClassVar[str]            # paper link
    Params: ClassVar[type]
    # Bumped whenever the method's output changes for the same inputs; stored results carry it
    # in their cache key, so a fixed method never serves maps computed by the old code.
    version: ClassVar[int] = 1
    # How its maps are shown by default (colours only; arrays never change): values beyond this
    # percentile of |map| saturate (None: the full range), and whether a smoothed-magnitude view
    # is offered. Gradient maps set both: a few outlier pixels would otherwise set their scale.
    display_clip_percentile: ClassVar[float | None] = None
    display_smoothed_view: ClassVar[bool] = False

    def parse_params(self, raw: Mapping[str, Any] | None, meta: "ModelMeta | None" = None) -> Any:
        return parse_params(self.Params, raw, meta)

    def param_specs(self, meta: "ModelMeta | None" = None) -> list[ParamSpec]:
        return param_specs(self.Params, meta)

    def describe(self, meta: "ModelMeta | None" = None) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "description": self.description,
                "reference": self.reference,
                "params": [spec.to_dict() for spec in self.param_specs(meta)]}

    def resolve(self, params: Any, meta: "ModelMeta") -> Any:
        """Fill model-dependent (AUTO) values and check cross-field rules; return concrete
        Params. Override when a method has AUTO fields or constraints between fields."""
        return params

    def supports(self, meta: "ModelMeta") -> str | None:
        """None when the method can run on this model, else the reason it cannot."""
        return None

    def cost(self, params: Any, meta: "ModelMeta") -> int:
        """Model evaluations (forward or forward+backward passes) one target costs. The server
        refuses requests above its cap up front (E_TOO_EXPENSIVE)."""
        return 1

    @abstractmethod
    def compute(self, model: "LoadedModel", batch: "torch.Tensor", target: TargetInfo,
                params: Any, context: RunContext) -> Attribution:
        """Compute panels for one (1, C, H, W) preprocessed image and one target class.

        ``run`` has switched the model to channels-last memory (``common.prepare_model``)."""

    def run(self, model: "LoadedModel", batch: "torch.Tensor", targets: Sequence[int | str] | None,
            params: Any, context: RunContext | None = None, *,
            probabilities: np.ndarray | None = None) -> VisualizationResult:
        """Validate, hold the model lock, compute each target, check results, clean up hooks.

        ``probabilities`` (the model's class probabilities for ``batch``) saves a forward pass
        when the caller has already predicted, as the job executor and the CLI report have."""
        from visualizations.batching import is_out_of_memory
        from visualizations.common import prepare_model

        context = context or RunContext()
        if isinstance(params, Mapping) or params is None:
            params = self.parse_params(params, model.meta)
        reason = self.supports(model.meta)
        if reason:
            raise MethodUnsupported(reason)
        params = self.resolve(params, model.meta)
        batch = batch.to(model.device)  # methods build their tensors on the batch's device
        with model.lock:
            started = time.perf_counter()  # the method's own time, not the wait for the lock
            hooks_before = hook_ids(model.module)
            try:
                if probabilities is None:
                    probabilities = model.predict(batch)[0].cpu().numpy()
                indices = resolve_targets(model.meta, int(np.argmax(probabilities)), targets)
                prepare_model(model)
                panels: list[Panel] = []
                for number, index in enumerate(indices):
                    context.check_cancelled()
                    target = TargetInfo(index, model.meta.class_names[index],
                                        float(probabilities[index]))
                    step = _SubProgress(context, number, len(indices))
                    attribution = self.compute(model, batch, target, params, step)
                    panels.extend(_checked(panel) for panel in attribution.panels)
                context.report(1.0)
            except Exception as error:  # noqa: BLE001 - only OOM is mapped, the rest re-raised
                # Batched methods have already halved down to 1; single-pass ones cannot.
                if not is_out_of_memory(error):
                    raise
                raise DeviceOOM("The device ran out of memory even at batch size 1; try a "
                                "smaller model or fewer samples.") from error
            finally:
                model.module.zero_grad(set_to_none=True)
                _remove_leftover_hooks(model.module, hooks_before)
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        return VisualizationResult(self.name, params_to_dict(params), elapsed_ms, probabilities,
                                   tuple(panels))


class _SubProgress(RunContext):
    """A RunContext that maps 0..1 of one target onto its share of the whole run. Progress
    only moves forward: a batch retried after running out of memory counts its rows again."""

    def __init__(self, parent: RunContext, number: int, count: int) -> None:
        super().__init__(progress=None, cancel_event=parent.cancel_event,
                         batch_size=parent.batch_size)
        self._parent, self._number, self._count = parent, number, count
        self._done = 0.0

    def report(self, fraction: float) -> None:
        self._done = max(self._done, min(1.0, max(0.0, fraction)))
        self._parent.report((self._number + self._done) / self._count)


def _checked(panel: Panel) -> Panel:
    if panel.kind == "heatmap":
        values = np.asarray(panel.values, dtype=np.float32)
        if values.ndim != 2:
            raise ModelOutputInvalid("A visualization produced a map of the wrong shape.")
        if not np.isfinite(values).all():
            raise ModelOutputInvalid("The visualization produced NaN or infinite values.")
        return dataclasses.replace(panel, values=values)
    return panel


def _remove_leftover_hooks(module: "torch.nn.Module", before: set[tuple[int, str, int]]) -> None:
    """Methods use context managers for hooks; this is the backstop if one leaks anyway. Only
    hooks added during the run are removed; the model's own hooks stay."""
    leaked = hook_ids(module) - before
    if not leaked:
        return
    import logging

    logging.getLogger(__name__).error("a visualization leaked %d hooks; removing them", len(leaked))
    for submodule in module.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(submodule, name, {})
            for key in [k for k in hooks if (id(submodule), name, k) in leaked]:
                del hooks[key]


visualization_registry: Registry[Visualization] = Registry("visualization", UnknownVisualization)
