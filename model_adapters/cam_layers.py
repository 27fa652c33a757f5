"""Find the layers usable for class activation maps (CAM) with one forward-hook pass.

CAM methods (Grad-CAM, Selvaraju et al. 2017, https://arxiv.org/abs/1610.02391) weight a
convolutional feature map by class gradients, so they need a module whose output is a spatial
``(N, C, H, W)`` map. We find such modules by running one dummy input through the model with a
forward hook on every named module, instead of guessing from class names.

The rule for the default layer ("the tensor the head pools"):

1. Candidates are named modules whose output is one 4-D tensor with more than one spatial cell
   (``H * W > 1``) at the model's input size, recorded in forward *completion* order. A container
   completes after its children, so when ``layer4`` and ``layer4.1`` return the same tensor,
   the outer name (``layer4``) comes later and wins -- that is the name people write by hand.
2. Modules called more than once in a forward pass (e.g. a shared ``nn.ReLU`` in a ResNet
   BasicBlock, or EfficientNet-Lite's ``_swish`` used by both stem and head) are dropped: a hook
   on them sees several unrelated outputs, so a CAM on them would be ambiguous.
3. The default is the tensor the head actually pools: the input of the last global spatial
   pooling in the forward pass (``AdaptiveAvgPool2d(1)``, ``F.adaptive_avg_pool2d``,
   ``x.mean((2, 3))``, ... -- seen by a ``TorchFunctionMode``, so functional pooling counts too).
   When a candidate's output *is* that tensor (the same object, not changed in place since),
   the outermost such name is the default: ``layer4`` (ResNet: each block ends with its ReLU),
   ``features`` (MobileNet, EfficientNet, ConvNeXt), ``trunk_output`` (RegNet), ``Mixed_7c``
   (Inception v3), ``conv5`` (ShuffleNet), ``layers`` (MNASNet), ``classifier.2`` (SqueezeNet:
   the ReLU on the final 1x1 class conv). When no module outputs it -- the activation in front
   of the pool is a reused module (the demo EfficientNet-Lite0: ``_bn1``, then the shared
   ``_swish`` ReLU6) or a function (DenseNet: ``features``, then ``F.relu``) -- the pooled tensor
   itself is offered as the layer :data:`POOLED_LAYER` and is the default, so the default is
   never a pre-activation tensor. Without global pooling (VGG, AlexNet: a flatten head), the
   default is the last candidate that is not itself a pooling layer (``features``).

Transformers (models with attention modules: ViT, Swin, MaxViT) also carry 4-D tensors that are
not feature maps -- channels-last windows, partitions -- so for them a layer qualifies only when
it lies on a grid over the input:

4. A 4-D output ``(N, C, H, W)`` with the input's aspect ratio: Swin's ``permute`` (its
   channels-last stages turned back to ``(N, C, H, W)`` in front of the pool), MaxViT's
   ``blocks.N``, a ViT's patch embedding, a CNN backbone's maps in a hybrid.
5. A 3-D token output ``(1, T, D)`` whose ``T`` is a few prefix tokens (class, distillation,
   register tokens) plus a patch grid that tiles the input (:func:`token_grid`) -- the same grid
   as the patch embedding, when there is one -- and that completes before the last attention
   starts (after it only the class token reaches the head, so later patch tokens get no
   gradient). Dropout and identity modules, copies of their neighbours, are left out. Grad-CAM
   drops the prefix and reshapes the patch tokens to ``(N, D, rows, cols)``.
6. The default is the last token layer -- for ViT the last block's ``ln_1``, as pytorch-grad-cam
   recommends -- unless a 4-D map (rule 4) completes after the last attention (a CNN stage after
   an attention block in a hybrid): then, and without token layers (Swin: ``permute``;
   MaxViT: ``blocks.3``), rule 3.

A transformer with no such layer is reported as CAM-unsupported with a reason.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

# The layer name of "the tensor the head pools" when no module outputs it (rule 3). Module
# names never start with "@", and it needs no quoting on a command line.
POOLED_LAYER = "@pooled"

# Pooling layers are skipped when choosing the default (rule 3 above).
_POOLING_TYPES: tuple[type[nn.Module], ...] = (
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.AvgPool2d, nn.MaxPool2d, nn.LPPool2d,
    nn.FractionalMaxPool2d,
)

TRANSFORMER_REASON = ("CAM needs a feature map or patch tokens laid out on a grid over the image, "
                      "and this transformer has neither; use a gradient or perturbation method.")
# Prefix tokens a ViT-style model may put before its patch tokens: class, distillation and
# register tokens.
MAX_PREFIX_TOKENS = 8
NO_SPATIAL_REASON = "The model has no layer with a spatial feature map to compute a CAM on."
SCRIPTED_REASON = ("TorchScript models cannot be hooked, so their layers are not available for "
                   "CAM; save a state_dict instead.")


@dataclass(frozen=True)
class CamLayers:
    """The result of the probe: candidates in forward order, the default, or why there is none."""

    layers: tuple[str, ...]
    default: str | None
    unsupported_reason: str | None
    output: Any = None  # the model's output on the probe input (to check the class count)


# Torch functions that can reduce an (N, C, H, W) map to one value per channel. Matched by name,
# so ``F.adaptive_avg_pool2d``, ``torch.mean`` and ``Tensor.mean`` all count; the output shape
# decides whether a call was global pooling.
_POOLING_FUNCTIONS = frozenset({
    "adaptive_avg_pool2d", "adaptive_max_pool2d", "avg_pool2d", "max_pool2d", "lp_pool2d",
    "mean", "nanmean", "sum", "amax", "max", "logsumexp"})


def _is_global_pool(func: Callable[..., Any], inputs: Any, output: Any) -> bool:
    """Whether ``func(inputs, ...)`` turned a spatial map (N, C, H, W) into one value per
    channel: (N, C) or (N, C, 1, 1)."""
    if getattr(func, "__name__", None) not in _POOLING_FUNCTIONS or not _is_spatial(inputs):
        return False
    if isinstance(output, tuple) and output:      # torch.max(x, dim) -> (values, indices)
        output = output[0]
    if not isinstance(output, torch.Tensor) or tuple(output.shape[:2]) != tuple(inputs.shape[:2]):
        return False
    return output.dim() == 2 or (output.dim() == 4 and tuple(output.shape[2:]) == (1, 1))


def _version(tensor: torch.Tensor) -> int:
    """The tensor's in-place version counter (-1 for inference tensors, which have none)."""
    return -1 if tensor.is_inference() else tensor._version


class PooledTensorWatch(TorchFunctionMode):
    """While active, remembers the input of the latest global spatial pooling call: after a
    forward pass, the tensor the head pooled (SE blocks pool earlier; the head pools last).

    With ``gradient=True`` (Grad-CAM), each candidate call gets a copy of its input, so the
    class score's gradient with respect to exactly that tensor can be taken afterwards.
    ``version`` is the tensor's in-place version counter at the call (the probe compares it with
    a module output's, to tell "the same tensor" from "the same tensor, since then modified in
    place", as DenseNet's ``F.relu(features, inplace=True)`` does).
    """

    def __init__(self, gradient: bool = False) -> None:
        super().__init__()
        self.gradient = gradient
        self.tensor: torch.Tensor | None = None
        self.version = -1

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        candidate = (args and getattr(func, "__name__", None) in _POOLING_FUNCTIONS
                     and _is_spatial(args[0]))
        if not candidate:
            return func(*args, **kwargs)
        pooled = args[0]
        if self.gradient and pooled.requires_grad:
            pooled = pooled.clone()
            args = (pooled, *args[1:])
        version = _version(pooled)
        output = func(*args, **kwargs)
        if _is_global_pool(func, pooled, output):
            self.tensor, self.version = pooled, version
        return output


def _attention_types() -> tuple[type[nn.Module], ...]:
    """Token-attention module types: torch's own and torchvision's Swin / MaxViT variants."""
    types: list[type[nn.Module]] = [nn.MultiheadAttention]
    try:
        from torchvision.models import maxvit, swin_transformer

        types += [swin_transformer.ShiftedWindowAttention, swin_transformer.ShiftedWindowAttentionV2,
                  maxvit.RelativePositionalMultiHeadAttention]
    except (ImportError, AttributeError):  # an older torchvision: nn.MultiheadAttention still counts
        pass
    return tuple(types)


def _is_spatial(output: Any) -> bool:
    return (isinstance(output, torch.Tensor) and output.dim() == 4
            and output.shape[2] * output.shape[3] > 1)


def _on_input_grid(rows: int, cols: int, input_size: tuple[int, int]) -> bool:
    """Whether a ``rows x cols`` map is the input seen at one stride ``s``: ``(rows, cols)`` is
    ``(H / s, W / s)`` rounded one way (down, up as padded convolutions do, or to nearest), so
    also at sizes ``s`` does not divide. Channels-last windows, partitions and bias tables read
    as ``(N, C, H, W)`` fail it (on a square input, say, they are not square)."""
    height, width = input_size
    return rows * cols > 1 and any(
        rounding(height / stride) == rows and rounding(width / stride) == cols
        for stride in range(1, max(height, width) + 1)
        for rounding in (math.floor, math.ceil, round))


def token_grid(tokens: int, input_size: tuple[int, int]) -> tuple[int, int, int] | None:
    """``(prefix, rows, cols)`` when ``tokens`` is a few prefix tokens followed by a row-major
    grid of patch tokens tiling the input (square patches of a whole-number side), the fewest
    prefix tokens first; else None."""
    height, width = input_size
    for prefix in range(min(MAX_PREFIX_TOKENS, tokens - 2) + 1):
        patches = tokens - prefix
        if (height * width) % patches:
            continue
        side = math.isqrt(height * width // patches)
        if side * side * patches == height * width and height % side == 0 and width % side == 0:
            return prefix, height // side, width // side
    return None


def _token_grid_of(output: Any, input_size: tuple[int, int]) -> tuple[int, int] | None:
    """``(rows, cols)`` of a probe output that is patch tokens ``(1, T, D)``, else None."""
    if not (isinstance(output, torch.Tensor) and output.dim() == 3 and output.shape[0] == 1):
        return None   # batch 1 in the probe: windowed (B * windows, T, D) tokens are not a grid
    grid = token_grid(int(output.shape[1]), input_size)
    return grid[1:] if grid else None


def find_cam_layers(module: nn.Module, input_size: tuple[int, int], channels: int = 3,
                    device: torch.device | str | None = None) -> CamLayers:
    """Run one dummy batch through ``module`` (eval mode, no_grad) and report its CAM layers.

    ``device`` defaults to the device of the module's first parameter; a module built on the
    ``meta`` device is probed on ``meta`` too (shapes only, no arithmetic), which is how the
    tests cover every torchvision architecture cheaply.
    """
    first = next(module.parameters(), None)
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    # A float64 (or half) model gets a probe of its own floating-point type.
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    height, width = input_size
    probe = torch.zeros(1, channels, height, width, device=device, dtype=dtype)

    if isinstance(module, torch.jit.ScriptModule):
        with torch.no_grad():
            return CamLayers((), None, SCRIPTED_REASON, module(probe))

    calls: dict[str, int] = {}
    spatial_order: list[str] = []  # names in completion order, first completion only
    # name -> (weak reference to its first output, that output's in-place version then)
    outputs: dict[str, tuple[weakref.ref, int]] = {}
    tokens: set[str] = set()       # those of them that are patch tokens (transformers)
    map_grids: set[tuple[int, int]] = set()   # (rows, cols) of the 4-D maps seen so far
    last_attention_at: int | None = None  # len(spatial_order) when the last attention started
    names = {child: name for name, child in module.named_modules() if name}
    attention = _attention_types()
    transformer = any(isinstance(child, attention) for child in names)

    def record(child: nn.Module, _inputs: Any, output: Any) -> None:
        name = names[child]
        calls[name] = calls.get(name, 0) + 1
        if calls[name] > 1:
            return
        if _is_spatial(output):
            outputs[name] = (weakref.ref(output), _version(output))
        if not transformer:
            if _is_spatial(output):
                spatial_order.append(name)
            return
        if _is_spatial(output) and _on_input_grid(*output.shape[2:], input_size):
            spatial_order.append(name)
            map_grids.add(tuple(output.shape[2:]))
            return
        grid = _token_grid_of(output, input_size)
        # Tokens must match the patch embedding's grid when there is one, so a channel-first
        # (1, C, L) tensor whose C happens to fit a grid is not read as tokens.
        if grid and (not map_grids or grid in map_grids) \
                and not isinstance(child, (nn.Dropout, nn.Identity)):   # copies of a neighbour
            spatial_order.append(name)
            tokens.add(name)

    def attention_starts(_child: nn.Module, _inputs: Any) -> None:
        nonlocal last_attention_at
        last_attention_at = len(spatial_order)

    handles = [child.register_forward_hook(record) for child in names]
    handles += [child.register_forward_pre_hook(attention_starts)
                for child in names if isinstance(child, attention)]
    watch = PooledTensorWatch()
    try:
        with torch.no_grad(), watch:
            output = module(probe)
    finally:
        for handle in handles:
            handle.remove()

    # After the last attention only the class token reaches the head: later patch tokens get
    # no gradient, so they are not offered at all.
    cut = len(spatial_order) if last_attention_at is None else last_attention_at
    layers = tuple(name for position, name in enumerate(spatial_order)
                   if calls[name] == 1 and (name not in tokens or position < cut))
    if not layers:
        return CamLayers((), None, TRANSFORMER_REASON if transformer else NO_SPATIAL_REASON,
                         output)
    by_name = {name: child for child, name in names.items()}
    features = [name for name in layers
                if name not in tokens and not isinstance(by_name[name], _POOLING_TYPES)]
    token_layers = [name for name in layers if name in tokens]
    maps_after_attention = [name for name in spatial_order[cut:] if name in features]
    if token_layers and not maps_after_attention:                        # rule 6
        return CamLayers(layers, token_layers[-1], None, output)
    if watch.tensor is not None:                                        # rule 3
        pooled_by = [name for name in features
                     if outputs[name][0]() is watch.tensor and outputs[name][1] == watch.version]
        if pooled_by:
            return CamLayers(layers, pooled_by[-1], None, output)
        return CamLayers((*layers, POOLED_LAYER), POOLED_LAYER, None, output)
    default = features[-1] if features else layers[-1]
    return CamLayers(layers, default, None, output)
