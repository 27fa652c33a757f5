"""How far to believe one prediction: figures beside the top-5, each naming its method.

A softmax probability is not an uncertainty (Gal & Ghahramani 2016): a model can be confident
and wrong, and confident on inputs unlike anything it was trained on. So every prediction also
gets, in one small batch each:

* **entropy** -- the predictive entropy of the softmax, in nats, and as a share of its maximum
  log(classes): 0 = all mass on one class, 1 = uniform;
* **tta** (test-time augmentation) -- the same image under ``TTA_VIEWS``: identity, horizontal
  flip, shifts by 4 % of the side in each direction (reflect-padded), zoom in to 1/1.1 of the
  centre and out to 0.9 (reflect-padded); the mean and spread (standard deviation) of the top
  classes' probabilities over the views, and the share of views that keep the top-1 class. A
  model that is right for the right reasons should not care;
* **mc_dropout** -- Monte Carlo dropout (Gal & Ghahramani 2016): ``MC_PASSES`` passes with the
  model's dropout layers active (nothing else switched to training), the same figures. Models
  without dropout layers say so instead;
* **ood** -- the energy score -logsumexp(logits) (Liu, Wang, Owens & Li 2020): lower means the
  logits are large, as on images like the training data. It is judged against ``REFERENCE``
  synthetic images (noise, flat colours, stripes, checkerboards, blobs) computed once per model:
  "typical" when lower than every reference, "unusual" when no lower than their median,
  "borderline" between. It is a hint, not a detector: natural photos of unknown classes often
  look typical, and a model can be sure of junk.
"""
from __future__ import annotations

import math
import threading
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel

TTA_VIEWS = ("identity", "flip", "shift right", "shift left", "shift down", "shift up",
             "zoom in", "zoom out")
SHIFT = 0.04                # of the image side
MC_PASSES = 8
TOP_CLASSES = 3
REFERENCE_SEED = 0

_references: "weakref.WeakKeyDictionary[Any, list[float]]" = weakref.WeakKeyDictionary()
_references_lock = threading.Lock()


def uncertainty(model: "LoadedModel", batch: "torch.Tensor",
                probabilities: np.ndarray) -> dict[str, Any]:
    """Every figure for one preprocessed image ``(1, C, H, W)`` with its class
    ``probabilities``, as the JSON block stored with the prediction."""
    import torch

    top = [int(index) for index in np.argsort(-probabilities)[:TOP_CLASSES]]
    with model.lock, torch.inference_mode():
        views = torch.cat([view for _, view in augmented_views(batch)])
        tta = torch.softmax(model.module(views).float(), dim=1).cpu().numpy()
        logits = model.module(batch).float()
        energy = float(-torch.logsumexp(logits, dim=1)[0])
    return {"entropy": entropy_figures(probabilities),
            "tta": {"method": "test-time augmentation: " + ", ".join(TTA_VIEWS),
                    **spread_figures(tta, top, model)},
            "mc_dropout": mc_dropout(model, batch, top),
            "ood": ood_figures(energy, reference_energies(model))}


def entropy_figures(probabilities: np.ndarray) -> dict[str, Any]:
    p = np.clip(probabilities.astype(np.float64), 1e-12, 1.0)
    value = float(-(p * np.log(p)).sum())
    return {"method": "predictive entropy of the softmax (nats)", "value": round(value, 4),
            "normalized": round(value / math.log(len(p)), 4) if len(p) > 1 else 0.0}


def spread_figures(samples: np.ndarray, top: list[int], model: "LoadedModel") -> dict[str, Any]:
    """Mean and spread over ``samples`` (views or passes x classes) of the ``top`` classes, and
    how often the first of them stays the top-1."""
    keeps = float((samples.argmax(axis=1) == top[0]).mean())
    return {"samples": int(samples.shape[0]),
            "top1_agreement": round(keeps, 4), "top1_changed": keeps < 1.0,
            "classes": [{"index": index, "label": model.meta.class_names[index],
                         "mean": round(float(samples[:, index].mean()), 4),
                         "std": round(float(samples[:, index].std()), 4)} for index in top]}


def augmented_views(batch: "torch.Tensor") -> list[tuple[str, "torch.Tensor"]]:
    """``TTA_VIEWS`` of a (1, C, H, W) batch, each the same size."""
    import torch
    import torch.nn.functional as functional

    height, width = batch.shape[-2:]
    step = max(1, round(SHIFT * min(height, width)))

    def shifted(dx: int, dy: int) -> "torch.Tensor":
        padded = functional.pad(batch, (step, step, step, step), mode="reflect")
        top, left = step - dy, step - dx
        return padded[..., top:top + height, left:left + width]

    def zoomed(scale: float) -> "torch.Tensor":
        if scale > 1:                       # the centre 1/scale, enlarged to the full size
            crop_h, crop_w = round(height / scale), round(width / scale)
            top, left = (height - crop_h) // 2, (width - crop_w) // 2
            centre = batch[..., top:top + crop_h, left:left + crop_w]
            return functional.interpolate(centre, size=(height, width), mode="bilinear",
                                          align_corners=False)
        small = functional.interpolate(batch, size=(round(height * scale), round(width * scale)),
                                       mode="bilinear", align_corners=False)
        pad_h, pad_w = height - small.shape[-2], width - small.shape[-1]
        return functional.pad(small, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2,
                                      pad_h - pad_h // 2), mode="reflect")

    return [("identity", batch), ("flip", torch.flip(batch, dims=[-1])),
            ("shift right", shifted(step, 0)), ("shift left", shifted(-step, 0)),
            ("shift down", shifted(0, step)), ("shift up", shifted(0, -step)),
            ("zoom in", zoomed(1.1)), ("zoom out", zoomed(0.9))]


def dropout_layers(module: "torch.nn.Module") -> list["torch.nn.Module"]:
    import torch

    kinds = (torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d,
             torch.nn.AlphaDropout)
    return [layer for layer in module.modules() if isinstance(layer, kinds) and layer.p > 0]


def mc_dropout(model: "LoadedModel", batch: "torch.Tensor", top: list[int]) -> dict[str, Any]:
    """``MC_PASSES`` passes in one batch with only the dropout layers in training mode (each
    row of a batch gets its own dropout mask); the model is back in eval mode afterwards."""
    import torch

    method = f"Monte Carlo dropout, {MC_PASSES} passes"
    layers = dropout_layers(model.module)
    if not layers:
        return {"method": method, "available": False,
                "reason": "The model has no dropout layers, so MC dropout cannot sample it."}
    with model.lock, torch.inference_mode():
        try:
            for layer in layers:
                layer.train()
            repeated = batch.expand(MC_PASSES, *batch.shape[1:]).contiguous()
            samples = torch.softmax(model.module(repeated).float(), dim=1).cpu().numpy()
        finally:
            for layer in layers:
                layer.eval()
    return {"method": method, "available": True, "reason": None,
            **spread_figures(samples, top, model)}


def reference_images(channels: int, height: int, width: int) -> "torch.Tensor":
    """Synthetic images no classifier was trained on, in pixel values [0, 1]: uniform and
    Gaussian noise, flat colours, stripes, checkerboards and smooth colour blobs."""
    import torch
    import torch.nn.functional as functional

    generator = torch.Generator().manual_seed(REFERENCE_SEED)
    images = [torch.rand((channels, height, width), generator=generator) for _ in range(3)]
    images += [(0.5 + 0.25 * torch.randn((channels, height, width), generator=generator))
               .clamp(0, 1) for _ in range(3)]
    images += [torch.full((channels, height, width), value) for value in (0.0, 0.5, 1.0)]
    for colour in ((1.0, 0.0, 0.0), (0.2, 0.6, 0.3)):
        images.append(torch.tensor(colour[:channels] if channels == 3 else colour[:1])
                      .view(-1, 1, 1).expand(channels, height, width).clone())
    rows, cols = torch.arange(height).view(-1, 1), torch.arange(width).view(1, -1)
    for period in (4, 16):
        images.append(((cols // period) % 2).float().expand(channels, height, width).clone())
        images.append((((rows // period) + (cols // period)) % 2).float()
                      .expand(channels, height, width).clone())
    blobs = functional.interpolate(torch.rand((3, channels, 7, 7), generator=generator),
                                   size=(height, width), mode="bilinear", align_corners=False)
    images += list(blobs)
    return torch.stack(images)


def reference_energies(model: "LoadedModel") -> list[float]:
    """The energy scores of ``reference_images`` for this model, computed once per model."""
    import torch

    with _references_lock:
        cached = _references.get(model.module)
    if cached is not None:
        return cached
    mean, std = model.meta.normalization()
    height, width = model.meta.input_size
    pixels = reference_images(model.meta.channels, height, width)
    with model.lock, torch.inference_mode():
        logits = model.module(((pixels - mean) / std).to(model.device)).float()
        energies = sorted((-torch.logsumexp(logits, dim=1)).cpu().tolist())
    with _references_lock:
        _references[model.module] = energies
    return energies


def ood_figures(energy: float, references: list[float]) -> dict[str, Any]:
    lowest, median = min(references), float(np.median(references))
    if energy < lowest:
        flag, meaning = "typical", "the model is surer of it than of any synthetic image"
    elif energy >= median:
        flag, meaning = "unusual", "the model is no surer of it than of noise or flat colours"
    else:
        flag, meaning = "borderline", "about as sure as on some synthetic images"
    return {"method": "energy score -logsumexp(logits) (Liu et al. 2020), judged against "
                      f"{len(references)} synthetic reference images",
            "energy": round(energy, 4), "reference_lowest": round(lowest, 4),
            "reference_median": round(median, 4), "flag": flag, "meaning": meaning}
