"""Building torchvision classification models cheaply, and recognizing their state_dicts.

Models are built on the ``meta`` device (shapes only: no memory, no weight init), so
fingerprinting all ~80 architectures takes a few seconds once per process, and a real load
assigns the checkpoint's tensors straight into the meta-built module.
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping

import torch
import torchvision
from torch import nn

log = logging.getLogger(__name__)

# Builder kwargs tried for each architecture. Inception v3 and GoogLeNet are trained with an
# auxiliary head by default but often saved without one, so both shapes are recognized;
# init_weights=False skips a slow scipy init (and its FutureWarning) that the load overwrites.
_VARIANTS: dict[str, tuple[dict[str, Any], ...]] = {
    "inception_v3": ({"init_weights": False}, {"init_weights": False, "aux_logits": False}),
    "googlenet": ({"init_weights": False}, {"init_weights": False, "aux_logits": False}),
}
# Keys whose first dimension equals this are the classifier's (width = num_classes).
_PROBE_CLASSES = 1000


def classification_architectures() -> list[str]:
    """Every torchvision classification model name (not detection/segmentation/video)."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def variants(architecture: str) -> tuple[dict[str, Any], ...]:
    return _VARIANTS.get(architecture, ({},))


def _patch_regnet_for_meta() -> None:
    """RegNet computes its block widths with torch ops and ``.tolist()``, which cannot run on
    ``meta``. Pin that pure arithmetic to the CPU; the result is identical everywhere."""
    from torchvision.models import regnet

    original = regnet.BlockParams.from_init_params
    if getattr(original, "_convscope_cpu", False):
        return

    def from_init_params(*args: Any, **kwargs: Any) -> Any:
        with torch.device("cpu"):
            return original(*args, **kwargs)

    from_init_params._convscope_cpu = True  # type: ignore[attr-defined]
    regnet.BlockParams.from_init_params = from_init_params  # type: ignore[method-assign]


_patch_lock = threading.Lock()


def build(architecture: str, num_classes: int = _PROBE_CLASSES, *, meta: bool = True,
          **kwargs: Any) -> nn.Module:
    """``torchvision.models.get_model(name, weights=None, ...)``, on ``meta`` when possible."""
    options = {**variants(architecture)[0], **kwargs}
    if meta:
        with _patch_lock:
            _patch_regnet_for_meta()
        try:
            with torch.device("meta"):
                return torchvision.models.get_model(architecture, weights=None,
                                                    num_classes=num_classes, **options)
        except Exception:  # noqa: BLE001 -- some builder cannot run on meta: build for real
            log.debug("Building %s on meta failed; building on CPU.", architecture, exc_info=True)
    return torchvision.models.get_model(architecture, weights=None, num_classes=num_classes,
                                        **options)


@dataclass(frozen=True)
class Fingerprint:
    """Key -> shape of one architecture variant, with the classifier keys marked."""

    architecture: str
    build_kwargs: tuple[tuple[str, Any], ...]
    shapes: Mapping[str, tuple[int, ...]]
    class_keys: frozenset[str]     # keys whose first dimension is num_classes

    def match(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any] | None:
        """Builder kwargs (``num_classes``, plus ``image_size`` for a ViT fine-tuned at another
        resolution) when ``state_dict`` has exactly this shape apart from those, else None."""
        if set(state_dict) != set(self.shapes):
            return None
        widths = set()
        extra: dict[str, Any] = {}
        for key, expected in self.shapes.items():
            actual = tuple(state_dict[key].shape)
            if key in self.class_keys:
                if len(actual) != len(expected) or actual[1:] != expected[1:]:
                    return None
                widths.add(actual[0])
            elif key == _VIT_POSITIONS and actual != expected:
                image_size = _vit_image_size(actual, expected, self.shapes)
                if image_size is None:
                    return None
                extra["image_size"] = image_size
            elif actual != expected:
                return None
        if len(widths) > 1:
            return None
        return {"num_classes": widths.pop() if widths else _PROBE_CLASSES, **extra}


# A ViT's position embedding has one row per patch (+1 class token), so its length gives the
# image size the checkpoint was trained at (e.g. the 384/512/518 px SWAG fine-tunes).
_VIT_POSITIONS = "encoder.pos_embedding"


def _vit_image_size(actual: tuple[int, ...], expected: tuple[int, ...],
                    shapes: Mapping[str, tuple[int, ...]]) -> int | None:
    patch = shapes.get("conv_proj.weight", (0,))[-1]
    if len(actual) != 3 or (actual[0], actual[2]) != (expected[0], expected[2]) or patch < 1:
        return None
    side = math.isqrt(actual[1] - 1)
    return side * patch if side * side == actual[1] - 1 else None


@lru_cache(maxsize=None)
def fingerprints_of(architecture: str) -> tuple[Fingerprint, ...]:
    prints = []
    for kwargs in variants(architecture):
        module = build(architecture, _PROBE_CLASSES, **kwargs)
        shapes = {key: tuple(value.shape) for key, value in module.state_dict().items()}
        class_keys = frozenset(key for key, shape in shapes.items()
                               if shape and shape[0] == _PROBE_CLASSES)
        prints.append(Fingerprint(architecture, tuple(sorted(kwargs.items())), shapes, class_keys))
        del module
    return tuple(prints)


_index_lock = threading.Lock()
_index: dict[frozenset[str], list[Fingerprint]] | None = None


def fingerprint_index() -> dict[frozenset[str], list[Fingerprint]]:
    """All architectures' fingerprints, grouped by key set (computed once, ~3 s)."""
    global _index
    with _index_lock:
        if _index is None:
            index: dict[frozenset[str], list[Fingerprint]] = {}
            for architecture in classification_architectures():
                for fingerprint in fingerprints_of(architecture):
                    index.setdefault(frozenset(fingerprint.shapes), []).append(fingerprint)
            _index = index
        return _index


def recognize(state_dict: Mapping[str, torch.Tensor]
              ) -> tuple[Fingerprint, dict[str, Any]] | None:
    """The architecture (variant) whose keys and shapes match, with its builder kwargs."""
    candidates = fingerprint_index().get(frozenset(state_dict), [])
    for fingerprint in candidates:
        kwargs = fingerprint.match(state_dict)
        if kwargs is not None:
            return fingerprint, kwargs
    return None


@dataclass(frozen=True)
class DefaultPreprocess:
    input_size: tuple[int, int]
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GENERIC_PREPROCESS = DefaultPreprocess((224, 224), 256, IMAGENET_MEAN, IMAGENET_STD)


def default_preprocess(architecture: str, module: nn.Module) -> DefaultPreprocess:
    """Resize/crop/mean/std from torchvision's weights metadata (offline: no download).

    The DEFAULT weights' recipe is used, unless the model has a fixed input size (ViT's
    ``image_size``, 224 when built without weights) that DEFAULT does not match -- vit_h_14's
    DEFAULT is the 518 px SWAG recipe -- then the first recipe with that crop size is used.
    ``module`` is the built model (its ``image_size`` is the fixed input size).
    """
    return _default_preprocess(architecture, getattr(module, "image_size", None))


@lru_cache(maxsize=None)
def _default_preprocess(architecture: str, fixed_size: int | None) -> DefaultPreprocess:
    try:
        weights_enum = torchvision.models.get_model_weights(architecture)
    except (ValueError, KeyError):
        return GENERIC_PREPROCESS
    recipes = [weights_enum.DEFAULT] + [w for w in weights_enum if w is not weights_enum.DEFAULT]
    for weights in recipes:
        transform = weights.transforms()
        crop = int(transform.crop_size[0])
        if fixed_size is not None and crop != fixed_size:
            continue
        return DefaultPreprocess((crop, crop), int(transform.resize_size[0]),
                                 tuple(float(v) for v in transform.mean),
                                 tuple(float(v) for v in transform.std))
    return GENERIC_PREPROCESS
