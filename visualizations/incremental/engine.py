"""Exact incremental inference over a torch.fx graph (after Krypton: Nakandala, Kumar &
Papakonstantinou, SIGMOD 2019, https://arxiv.org/abs/1807.10355).

A batch of copies of one image, each changed only inside one rectangle, is evaluated by
reusing the unoccluded image's activations (:meth:`TracedModel.cache`, one forward pass) and
recomputing, node by node, only each copy's window of changed positions (``rules`` says how
each operation grows or moves a window). Where a window would cover most of a map -- or an
operation has no window rule (global pooling, flatten, linear...) -- the changed maps are
materialized in full and the rest of the network runs as usual: the result is the same
computation on the same numbers, so it equals a dense forward up to float rounding.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from visualizations.incremental.patched import Patched, cut, gather, materialize
from visualizations.incremental.rules import (CAT, ELEMENTWISE, OTHER, PAD, SHAPE, WINDOW, Kind,
                                              node_kind)
from visualizations.incremental.windows import affected_outputs, input_span, union

if TYPE_CHECKING:
    import torch
    from torch import fx

log = logging.getLogger(__name__)

# A window operation whose output window would cover at least this share of its map runs
# dense instead (with the rest of the network). Measured side by side (224 px, window 16,
# stride 8, batches of 16, 1 CPU thread; time / dense batched passes): switching at 0.45 /
# 0.6 / 0.75 of the map gave resnet18 0.47x / 0.43x / 0.44x and resnet50 0.38x / 0.44x /
# 0.44x, and 1.0 (never switching) gave resnet18 0.54x: convolutions dominate (87 % of the
# time, gathering windows about 3 %), so past about half the map a window saves too little
# to pay for its halo and the smaller, less efficient convolution shapes.
DENSE_SHARE = 0.5


class NotIncremental(Exception):
    """The model's graph cannot be evaluated incrementally; ``str(error)`` says why."""


class Dense:
    """A value computed for the whole batch at full size (no longer windowed)."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value


@dataclass
class Stats:
    """Convolution work of one batch: what dense forwards would do, and what was done."""

    dense_macs: int = 0
    done_macs: int = 0
    dense_from: str = ""     # the first node computed on full maps, and why

    @property
    def share(self) -> float:
        return self.done_macs / self.dense_macs if self.dense_macs else 1.0


@dataclass
class ImageCache:
    """Every node's value for the unoccluded image, 4-D maps in channels-last memory."""

    values: dict["fx.Node", Any]
    output: Any
    dense_macs_per_copy: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _leaves(value: Any) -> list[Any]:
    from torch.fx.node import map_aggregate

    found: list[Any] = []
    map_aggregate(value, found.append)
    return found


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


class TracedModel:
    """A model's torch.fx graph with a :class:`~rules.Kind` per node."""

    def __init__(self, module: "torch.nn.Module") -> None:
        import torch.fx

        try:
            graph_module = torch.fx.symbolic_trace(module)
        except Exception as error:  # noqa: BLE001 - any tracing failure means "not traceable"
            raise NotIncremental(f"torch.fx cannot trace the model ({_first_line(error)})") \
                from None
        self._root = weakref.ref(module)
        self.graph_module = graph_module
        self.nodes = list(graph_module.graph.nodes)
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise NotIncremental(f"the model takes {len(placeholders)} inputs, not one image")
        self.input = placeholders[0]
        self.depends = self._depending_on_input()
        self.kinds = {node: self._kind(node, module) for node in self.nodes
                      if node.op in ("call_module", "call_function", "call_method")}
        for node, kind in self.kinds.items():
            mutated = node.args[0] if node.args else None
            if kind.inplace and hasattr(mutated, "users") and len(mutated.users) > 1:
                raise NotIncremental(f"in-place {node.name} changes a value that other "
                                     "operations also read")
        order = {node: index for index, node in enumerate(self.nodes)}
        self.last_use = {node: max((order[user] for user in node.users), default=order[node])
                         for node in self.nodes}

    def _depending_on_input(self) -> set["fx.Node"]:
        depends = {self.input}
        for node in self.nodes:
            if any(arg in depends for arg in node.all_input_nodes):
                depends.add(node)
        return depends

    def _kind(self, node: "fx.Node", module: "torch.nn.Module") -> Kind:
        from torch.fx.node import map_arg

        def static(value: Any) -> Any:
            return map_arg(value, lambda n: self._fetch(module, n.target)
                           if n.op == "get_attr" else n)
        try:
            return node_kind(node, module, static)
        except Exception as error:  # noqa: BLE001 - an odd node is run dense, never wrong
            return Kind(OTHER, why=f"{node.name} ({_first_line(error)})")

    @staticmethod
    def _fetch(module: "torch.nn.Module", target: str) -> Any:
        value: Any = module
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def module(self) -> "torch.nn.Module":
        module = self._root()
        if module is None:
            raise NotIncremental("the model is gone")
        return module

    # --- running ------------------------------------------------------------------------------

    def _call(self, node: "fx.Node", args: tuple, kwargs: dict, root: "torch.nn.Module") -> Any:
        if node.op == "call_module":
            return root.get_submodule(node.target)(*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    def cache(self, image: "torch.Tensor") -> ImageCache:
        """One forward pass of ``image`` (1, C, H, W), keeping every node's value."""
        import torch
        from torch.fx.node import map_arg

        root = self.module()
        values: dict[Any, Any] = {}
        output = None
        macs = 0
        with torch.inference_mode():
            for node in self.nodes:
                if node.op == "placeholder":
                    value = image
                elif node.op == "get_attr":
                    value = self._fetch(root, node.target)
                elif node.op == "output":
                    output = map_arg(node.args[0], values.__getitem__)
                    continue
                else:
                    args = map_arg(node.args, values.__getitem__)
                    kwargs = map_arg(node.kwargs, values.__getitem__)
                    kind = self.kinds[node]
                    if kind.inplace:      # keep the cached input as it was
                        args = (args[0].clone(), *args[1:])
                    value = self._call(node, args, kwargs, root)
                    if kind.name == WINDOW and isinstance(value, torch.Tensor):
                        macs += int(value[0, 0].numel()) * kind.macs_per_output
                if isinstance(value, torch.Tensor) and value.ndim == 4:
                    value = value.contiguous(memory_format=torch.channels_last)
                values[node] = value
        return ImageCache(values, output, macs)

    def run(self, cache: ImageCache, patch: "torch.Tensor", top: np.ndarray, left: np.ndarray,
            dense_share: float = DENSE_SHARE) -> tuple["torch.Tensor", Stats]:
        """The outputs for copies of the cached image whose input differs from it only inside
        windows at (top, left) of ``patch``'s size, where it equals ``patch`` (B, C, h, w)."""
        import torch
        from torch.fx.node import map_arg

        root = self.module()
        batch = int(patch.shape[0])
        stats = Stats(dense_macs=cache.dense_macs_per_copy * batch)
        env: dict[Any, Any] = {}
        result = None
        with torch.inference_mode():
            for index, node in enumerate(self.nodes):
                if node.op == "placeholder":
                    env[node] = Patched(cache.values[node],
                                        patch.contiguous(memory_format=torch.channels_last),
                                        np.asarray(top, dtype=np.int64),
                                        np.asarray(left, dtype=np.int64))
                elif node.op == "output":
                    result = map_arg(node.args[0], env.__getitem__)
                    result = _densified(result)
                elif node not in self.depends:
                    env[node] = cache.values[node]
                else:
                    env[node] = self._step(node, root, cache, env, stats, dense_share)
                for used in node.all_input_nodes:
                    if self.last_use[used] == index:
                        env.pop(used, None)
        if isinstance(result, torch.Tensor) and result.shape[0] != batch:
            result = result.expand(batch, *result.shape[1:])
        return result, stats

    def _step(self, node: "fx.Node", root: "torch.nn.Module", cache: ImageCache,
              env: dict[Any, Any], stats: Stats, dense_share: float) -> Any:
        from torch.fx.node import map_arg

        kind = self.kinds[node]
        args = map_arg(node.args, env.__getitem__)
        kwargs = map_arg(node.kwargs, env.__getitem__)
        why = kind.why
        if not any(isinstance(v, Dense) for v in _leaves((args, kwargs))):
            handled, why = self._incremental(node, kind, args, kwargs, root, cache, stats,
                                             dense_share)
            if handled is not None:
                return handled
        if why and not stats.dense_from:
            stats.dense_from = f"{node.name} ({why})"
        value = self._call(node, *_densified((args, kwargs)), root)
        if kind.name == WINDOW and hasattr(value, "shape") and len(value.shape) == 4:
            stats.done_macs += int(value.shape[0] * value.shape[-2] * value.shape[-1]) \
                * kind.macs_per_output
        return Dense(value)

    def _incremental(self, node: "fx.Node", kind: Kind, args: tuple, kwargs: dict,
                     root: "torch.nn.Module", cache: ImageCache, stats: Stats,
                     dense_share: float) -> tuple[Any, str]:
        """(the node's windowed value, "") or (None, why it must run dense)."""
        import torch

        if kind.name == OTHER:
            return None, kind.why
        reference = cache.values[node]
        if kind.name == SHAPE:
            value = args[0]
            if not isinstance(value, Patched):
                return None, "shape of a computed value"
            shape = value.logical_shape()
            if node.op == "call_method" and node.target == "dim":
                return Dense(len(shape)), ""
            if node.op == "call_method" and (args[1:] or kwargs):
                return Dense(shape[(args[1:] or (kwargs.get("dim"),))[0]]), ""
            return Dense(shape), ""
        if not (isinstance(reference, torch.Tensor) and reference.ndim == 4):
            return None, "not a 4-D map"
        if kind.name == WINDOW:
            value = args[0]
            if not isinstance(value, Patched) or any(isinstance(v, Patched)
                                                     for v in _leaves((args[1:], kwargs))):
                return None, "window operation on computed weights"
            out_size = (int(reference.shape[-2]), int(reference.shape[-1]))
            rows, columns = kind.axes(out_size)
            out_top, out_h = affected_outputs(value.top, value.window_size[0], rows)
            out_left, out_w = affected_outputs(value.left, value.window_size[1], columns)
            if out_h * out_w >= dense_share * out_size[0] * out_size[1]:
                return None, f"its windows cover {out_h}x{out_w} of {out_size[0]}x{out_size[1]}"
            in_top, in_h = input_span(out_top, out_h, rows)
            in_left, in_w = input_span(out_left, out_w, columns)
            window = value.patch if value.covers(in_top, in_left, (in_h, in_w)) else \
                gather(value, in_top, in_left, (in_h, in_w), kind.outside)
            out = kind.run(window)
            stats.done_macs += int(out.shape[0]) * out_h * out_w * kind.macs_per_output
            return Patched(reference, out, out_top, out_left), ""
        if kind.name == PAD:
            value = args[0]
            if not isinstance(value, Patched):
                return None, "padding of a computed value"
            return Patched(reference, value.patch.clone(), value.top + kind.pads[0],
                           value.left + kind.pads[1]), ""
        if kind.name in (ELEMENTWISE, CAT):
            return self._on_union(node, kind, args, kwargs, root, reference)
        return None, kind.why or kind.name

    def _on_union(self, node: "fx.Node", kind: Kind, args: tuple, kwargs: dict,
                  root: "torch.nn.Module", reference: "torch.Tensor") -> tuple[Any, str]:
        """Element-wise operations and concatenation: every operand cut to the union of the
        changed operands' windows."""
        import torch
        from torch.fx.node import map_aggregate

        patched = [v for v in _leaves((args, kwargs)) if isinstance(v, Patched)]
        size = patched[0].map_size
        if any(p.map_size != size for p in patched) or tuple(reference.shape[-2:]) != size:
            return None, "operands of different map sizes"
        if len(patched) == 1:
            top, left, window = patched[0].top, patched[0].left, patched[0].window_size
        else:
            top, h = union([(p.top, p.window_size[0]) for p in patched], size[0])
            left, w = union([(p.left, p.window_size[1]) for p in patched], size[1])
            window = (h, w)
        refused: list[str] = []

        def cut_to_window(value: Any) -> Any:
            if isinstance(value, Patched):
                return value.patch if value.covers(top, left, window) else \
                    gather(value, top, left, window)
            if isinstance(value, torch.Tensor) and value.ndim >= 2 and \
                    tuple(value.shape[-2:]) != (1, 1):
                if value.ndim == 4 and value.shape[0] == 1 and tuple(value.shape[-2:]) == size:
                    return cut(value, top, left, window)
                refused.append("a constant operand with its own spatial shape")
            return value

        new_args = map_aggregate(args, cut_to_window)
        new_kwargs = map_aggregate(kwargs, cut_to_window)
        if refused:
            return None, refused[0]
        out = self._call(node, new_args, new_kwargs, root)
        batch = patched[0].batch
        if not (isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[0] == batch
                and tuple(out.shape[-2:]) == window
                and out.shape[1] == reference.shape[1]):
            return None, "an unexpected result shape"
        return Patched(reference, out, top, left), ""


def _densified(value: Any) -> Any:
    from torch.fx.node import map_aggregate

    def full(item: Any) -> Any:
        if isinstance(item, Patched):
            return materialize(item)
        if isinstance(item, Dense):
            return item.value
        return item
    return map_aggregate(value, full)
