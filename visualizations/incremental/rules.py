"""Which graph operations can be computed on windows, and how.

Every traced node gets one :class:`Kind` when the model is traced:

* ``window``: convolutions and max/average pooling. Output windows follow from the kernel,
  stride, padding and dilation (``windows.affected_outputs``); the input they read is
  gathered with the padding's value outside the map, and the operation runs unpadded on it.
* ``elementwise``: activations, batch norm in eval mode, dropout in eval mode, arithmetic
  (residual adds, multiplications by constants). Several changed operands are gathered into
  the union of their windows.
* ``pad``: constant padding shifts the windows; ``cat``: channel concatenation, on the union.
* ``shape``: ``size()``/``dim()``/``.shape`` answer for the whole batch.
* ``other``: everything else (global pooling, flatten, linear, attention...) runs on full
  maps: changed inputs are materialized and the network is dense from there on.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from visualizations.incremental.windows import SlidingAxis

if TYPE_CHECKING:
    import torch
    from torch import fx

WINDOW, ELEMENTWISE, PAD, CAT, SHAPE, OTHER = ("window", "elementwise", "pad", "cat", "shape",
                                               "other")


@dataclass(frozen=True)
class Kind:
    name: str
    # For windows: kernel, stride, padding before, dilation per axis (rows, columns), the value
    # the padding has (0 for convolutions and average pooling, -inf for max pooling), and the
    # operation without padding as ``run(window) -> output``.
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    outside: float = 0.0
    run: Callable[["torch.Tensor"], "torch.Tensor"] | None = None
    pads: tuple[int, int] = (0, 0)        # for ``pad``: rows and columns added before the map
    # Multiply-accumulates per output position, for the cost estimate (convolutions only).
    macs_per_output: int = 0
    inplace: bool = False
    why: str = ""                           # for ``other``: what the operation is

    def axes(self, out_size: tuple[int, int]) -> tuple[SlidingAxis, SlidingAxis]:
        return tuple(SlidingAxis(self.kernel[i], self.stride[i], self.padding[i],
                                 self.dilation[i], out_size[i]) for i in range(2))  # type: ignore


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))


# Signatures of the functional forms, to read their arguments however they were passed.
def _conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1): ...  # noqa
def _max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1,  # noqa
                ceil_mode=False, return_indices=False): ...
def _avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,  # noqa
                count_include_pad=True, divisor_override=None): ...
def _pad(input, pad, mode="constant", value=None): ...  # noqa
def _cat(tensors, dim=0): ...  # noqa


def _bound(signature_of: Callable, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    try:
        bound = inspect.signature(signature_of).bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return dict(bound.arguments)


def _conv_kind(weight: "torch.Tensor", bias: Any, stride: Any, padding: Any, dilation: Any,
               groups: int) -> Kind:
    import torch.nn.functional as F

    kernel = (int(weight.shape[-2]), int(weight.shape[-1]))
    dilation = _pair(dilation)
    if isinstance(padding, str):
        # 'same' pads d*(k-1) in all, the smaller half before; 'valid' pads nothing.
        padding = tuple(dilation[i] * (kernel[i] - 1) // 2 if padding == "same" else 0
                        for i in range(2))
    stride = _pair(stride)

    def run(window: "torch.Tensor") -> "torch.Tensor":
        return F.conv2d(window, weight, bias, stride, 0, dilation, groups)

    return Kind(WINDOW, kernel, stride, _pair(padding), dilation, 0.0, run,
                macs_per_output=int(weight[0].numel()) * int(weight.shape[0]))


def _max_pool_kind(kernel: Any, stride: Any, padding: Any, dilation: Any) -> Kind:
    import torch.nn.functional as F

    kernel, stride = _pair(kernel), _pair(stride if stride else kernel)
    dilation = _pair(dilation)

    def run(window: "torch.Tensor") -> "torch.Tensor":
        return F.max_pool2d(window, kernel, stride, 0, dilation)

    # ceil_mode only adds outputs at the far edge, whose windows read -inf padding there.
    return Kind(WINDOW, kernel, stride, _pair(padding), dilation, float("-inf"), run)


def _avg_pool_kind(kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                   count_include_pad: bool, divisor_override: Any) -> Kind:
    import torch.nn.functional as F

    kernel, stride, padding = _pair(kernel), _pair(stride if stride else kernel), _pair(padding)
    if ceil_mode:
        return Kind(OTHER, why="average pooling with ceil_mode")
    if any(padding) and not count_include_pad:
        return Kind(OTHER, why="average pooling that excludes padding from the divisor")

    def run(window: "torch.Tensor") -> "torch.Tensor":
        return F.avg_pool2d(window, kernel, stride, 0, False, True, divisor_override)

    return Kind(WINDOW, kernel, stride, padding, (1, 1), 0.0, run)


def _pad_kind(pad: Any, mode: str, value: Any) -> Kind:
    pad = tuple(int(p) for p in pad) if isinstance(pad, (tuple, list)) else (int(pad),) * 4
    if mode != "constant" or len(pad) not in (2, 4) or min(pad) < 0:
        return Kind(OTHER, why=f"padding mode {mode!r} / {pad}")
    rows = pad[2] if len(pad) == 4 else 0
    return Kind(PAD, pads=(rows, pad[0]))


def _elementwise_modules() -> tuple[type, ...]:
    from torch import nn

    return (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
            nn.GELU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh,
            nn.PReLU, nn.Identity)


def _elementwise_functions() -> set[Any]:
    import torch
    import torch.nn.functional as F

    return {operator.add, operator.sub, operator.mul, operator.truediv, operator.neg,
            operator.iadd, operator.isub, operator.imul, operator.itruediv,
            torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.relu, torch.relu_,
            torch.sigmoid, torch.tanh, torch.clamp, torch.clamp_min, torch.clamp_max,
            F.relu, F.relu6, F.silu, F.hardswish, F.hardsigmoid, F.gelu, F.leaky_relu, F.elu,
            F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.sigmoid, F.tanh}


ELEMENTWISE_METHODS = {"add", "sub", "mul", "div", "neg", "relu", "sigmoid", "tanh", "clamp",
                       "clamp_min", "clamp_max", "contiguous", "add_", "sub_", "mul_", "div_",
                       "relu_", "sigmoid_", "tanh_", "clamp_", "clamp_min_", "clamp_max_"}
SHAPE_METHODS = {"size", "dim"}
INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv}


def module_kind(module: "torch.nn.Module") -> Kind:
    from torch import nn

    inplace = bool(getattr(module, "inplace", False))
    if type(module) is nn.Conv2d:
        if module.padding_mode != "zeros":
            return Kind(OTHER, why=f"convolution with {module.padding_mode!r} padding")
        return _conv_kind(module.weight, module.bias, module.stride, module.padding,
                          module.dilation, module.groups)
    if type(module) is nn.MaxPool2d:
        if module.return_indices:
            return Kind(OTHER, why="max pooling returning indices")
        return _max_pool_kind(module.kernel_size, module.stride, module.padding, module.dilation)
    if type(module) is nn.AvgPool2d:
        return _avg_pool_kind(module.kernel_size, module.stride, module.padding,
                              module.ceil_mode, module.count_include_pad,
                              module.divisor_override)
    if isinstance(module, (nn.ZeroPad2d, nn.ConstantPad2d)):
        return _pad_kind(module.padding, "constant", module.value)
    if isinstance(module, _elementwise_modules()):
        return Kind(ELEMENTWISE, inplace=inplace)
    if isinstance(module, (nn.Dropout, nn.Dropout2d, nn.AlphaDropout, nn.FeatureAlphaDropout)):
        return Kind(ELEMENTWISE, inplace=inplace) if not module.training else \
            Kind(OTHER, why="dropout in training mode")
    if isinstance(module, nn.BatchNorm2d):
        if module.training or module.running_mean is None:
            return Kind(OTHER, why="batch norm using batch statistics")
        return Kind(ELEMENTWISE)
    return Kind(OTHER, why=type(module).__name__)


def function_kind(target: Any, args: tuple, kwargs: dict) -> Kind:
    import torch
    import torch.nn.functional as F

    name = getattr(target, "__name__", str(target))
    if target in (torch.conv2d, F.conv2d):
        bound = _bound(_conv2d, args, kwargs)
        weight = bound and bound["weight"]
        if bound is None or not isinstance(weight, torch.Tensor) or weight.ndim != 4:
            return Kind(OTHER, why="conv2d with a computed weight")
        bias = bound["bias"]
        if bias is not None and not isinstance(bias, torch.Tensor):
            return Kind(OTHER, why="conv2d with a computed bias")
        return _conv_kind(weight, bias, bound["stride"], bound["padding"], bound["dilation"],
                          bound["groups"])
    if target in (F.max_pool2d, getattr(F, "_max_pool2d", None), torch.max_pool2d):
        bound = _bound(_max_pool2d, args, kwargs)
        if bound is None or bound["return_indices"]:
            return Kind(OTHER, why="max pooling returning indices")
        return _max_pool_kind(bound["kernel_size"], bound["stride"], bound["padding"],
                              bound["dilation"])
    if target is F.avg_pool2d:
        bound = _bound(_avg_pool2d, args, kwargs)
        if bound is None:
            return Kind(OTHER, why="avg_pool2d")
        return _avg_pool_kind(bound["kernel_size"], bound["stride"], bound["padding"],
                              bound["ceil_mode"], bound["count_include_pad"],
                              bound["divisor_override"])
    if target is F.pad:
        bound = _bound(_pad, args, kwargs)
        if bound is None:
            return Kind(OTHER, why="pad")
        return _pad_kind(bound["pad"], bound["mode"], bound["value"])
    if target in (torch.cat, torch.concat, getattr(torch, "concatenate", torch.cat)):
        bound = _bound(_cat, args, kwargs)
        if bound is None or bound["dim"] not in (1, -3):
            return Kind(OTHER, why="concatenation along a non-channel axis")
        return Kind(CAT)
    if target is getattr and len(args) == 2 and args[1] == "shape":
        return Kind(SHAPE)
    if target in (F.dropout, F.dropout2d):
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        return Kind(ELEMENTWISE) if training is False else Kind(OTHER, why="dropout")
    if target is F.batch_norm:
        training = kwargs.get("training", args[5] if len(args) > 5 else False)
        running = kwargs.get("running_mean", args[1] if len(args) > 1 else None)
        return Kind(ELEMENTWISE) if training is False and running is not None else \
            Kind(OTHER, why="batch norm using batch statistics")
    if target in _elementwise_functions():
        return Kind(ELEMENTWISE, inplace=target in INPLACE_OPERATORS or target is torch.relu_
                    or _inplace_argument(target, args, kwargs))
    return Kind(OTHER, why=name)


def _inplace_argument(target: Any, args: tuple, kwargs: dict) -> bool:
    if kwargs.get("inplace"):
        return True
    try:
        bound = inspect.signature(target).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return False
    return bool(bound.arguments.get("inplace", False))


def method_kind(name: str) -> Kind:
    if name in SHAPE_METHODS:
        return Kind(SHAPE)
    if name in ELEMENTWISE_METHODS:
        return Kind(ELEMENTWISE, inplace=name.endswith("_"))
    return Kind(OTHER, why=f".{name}()")


def node_kind(node: "fx.Node", root: "torch.nn.Module", static: Callable[[Any], Any]) -> Kind:
    """The kind of ``node``; ``static`` turns the node's arguments into values where they do
    not depend on the input (weights fetched by ``get_attr``), leaving the rest as nodes."""
    if node.op == "call_module":
        return module_kind(root.get_submodule(node.target))
    args, kwargs = static(node.args), static(node.kwargs)
    if node.op == "call_function":
        return function_kind(node.target, args, kwargs)
    if node.op == "call_method":
        return method_kind(node.target)
    return Kind(OTHER, why=node.op)
