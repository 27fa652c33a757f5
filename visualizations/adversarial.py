"""Adversarial fragility: the smallest L-infinity perturbation that changes the model's mind.

Goodfellow, Shlens & Szegedy (2015), "Explaining and Harnessing Adversarial Examples"
(https://arxiv.org/abs/1412.6572) showed that an imperceptible perturbation turns a panda into a
gibbon; Madry et al. (2018, https://arxiv.org/abs/1706.06083) made projected gradient descent
(PGD) the standard way to find one. This method searches for the *smallest* budget that works:
the image is attacked in pixel space (values in [0, 1], normalized for the model on every pass,
and always clamped to the valid range), for several budgets at once in one batch, and the
bracket around the smallest successful budget is narrowed round by round.

The target decides the attack: for the predicted class it is untargeted (any other class must
win); for another class it is targeted (that class must win). After an untargeted round has
found which class takes over, later rounds aim at that class alone: the gradient of "the best
rival" jumps between nearly tied rivals, which wastes budget, while a single rival's margin
points one way. The loss is the logit margin (Carlini & Wagner 2017), which, unlike
cross-entropy, does not saturate near the decision boundary. PGD starts from the unperturbed image (deterministic) and takes ``steps`` signed
gradient steps of 2.5 epsilon / steps, projected onto the budget.

Caveat: PGD is a local search, so the budget found is an upper bound of the true minimum; for a
linear model it is exact to the search's resolution (tested against the closed form).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from visualizations.base import Attribution, Panel, RunContext, TargetInfo, Visualization, param
from visualizations.common import as_model_input, check_finite, to_map

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel, ModelMeta

CANDIDATES = 8              # budgets tried per search round, in one batch


@dataclass(frozen=True)
class AdversarialParams:
    max_epsilon: float = param(8.0, label="Largest budget (pixel units)", min=0.25, max=64.0,
                               help="The most any pixel channel may change, in 0-255 units; "
                                    "no flip within it is reported as such.")
    steps: int = param(10, label="PGD steps", min=1, max=100,
                       help="Gradient steps per attack; more find smaller perturbations.")
    rounds: int = param(3, label="Search rounds", min=1, max=6,
                        help=f"Each round tries {CANDIDATES} budgets at once and narrows the "
                             "bracket around the smallest that works eightfold.")


@dataclass(frozen=True)
class AttackResult:
    """The smallest budget that flipped the decision (pixel units; None: none within the
    largest), its perturbation in pixel space (1, C, H, W) and the logits it produced."""

    epsilon: float | None
    perturbation: "torch.Tensor"
    logits: "torch.Tensor"


def _margin(logits: "torch.Tensor", original: int, target: int) -> "torch.Tensor":
    """Per row: how far the attack's goal is from being met (> 0: met)."""
    import torch

    if target == original:      # untargeted: the best other class must beat the original
        others = logits.clone()
        others[:, original] = -torch.inf
        return others.max(dim=1).values - logits[:, original]
    rivals = logits.clone()
    rivals[:, target] = -torch.inf
    return logits[:, target] - rivals.max(dim=1).values


def attack(model: "LoadedModel", batch: "torch.Tensor", original: int, target: int,
           params: AdversarialParams, context: RunContext) -> AttackResult:
    """Search for the smallest L-infinity budget (see the module docstring)."""
    import torch

    mean, std = (part.to(batch.device, batch.dtype) for part in model.meta.normalization())
    pixels = (batch.detach() * std + mean).clamp(0, 1)          # (1, C, H, W) in [0, 1]

    def logits_of(images: "torch.Tensor") -> "torch.Tensor":
        return model.module(as_model_input((images - mean) / std))

    low, high = 0.0, params.max_epsilon
    best: AttackResult | None = None
    goal = target
    for number in range(params.rounds):
        budgets = [low + (high - low) * k / CANDIDATES for k in range(1, CANDIDATES + 1)]
        found = _pgd(logits_of, pixels, budgets, original, goal, params.steps, context,
                     (number, params.rounds))
        success = [index for index, result in enumerate(found) if result is not None]
        if not success:
            break
        first = success[0]
        best = AttackResult(budgets[first], *found[first])
        goal = int(best.logits.argmax())
        low, high = (budgets[first - 1] if first else low), budgets[first]
    if best is None:
        with torch.no_grad():
            logits = logits_of(pixels)
        return AttackResult(None, torch.zeros_like(pixels), logits)
    return best


def _pgd(logits_of: Any, pixels: "torch.Tensor", budgets: list[float], original: int,
         target: int, steps: int, context: RunContext, round_of: tuple[int, int]
         ) -> list[tuple["torch.Tensor", "torch.Tensor"] | None]:
    """PGD for every budget at once; per budget the first (perturbation, logits) that met the
    goal, or None."""
    import torch

    count = len(budgets)
    radius = torch.tensor(budgets, device=pixels.device, dtype=pixels.dtype).view(-1, 1, 1, 1)
    radius = radius / 255.0
    step = 2.5 * radius / steps
    delta = torch.zeros((count, *pixels.shape[1:]), device=pixels.device, dtype=pixels.dtype)
    found: list[tuple["torch.Tensor", "torch.Tensor"] | None] = [None] * count
    for number in range(steps + 1):
        context.check_cancelled()
        with torch.enable_grad():
            delta.requires_grad_(True)
            logits = logits_of(pixels + delta)
            check_finite(logits, "logits")
            margin = _margin(logits, original, target)
            (gradient,) = torch.autograd.grad(margin.sum(), delta)
        delta, margin = delta.detach(), margin.detach()
        for index in range(count):
            if found[index] is None and float(margin[index]) > 0:
                found[index] = (delta[index:index + 1].clone(), logits[index:index + 1].detach())
        context.report((round_of[0] + (number + 1) / (steps + 1)) / round_of[1])
        if all(result is not None for result in found) or number == steps:
            break
        delta = torch.max(torch.min(delta + step * gradient.sign(), radius), -radius)
        delta = (pixels + delta).clamp(0, 1) - pixels          # stay a valid image
    return found


class AdversarialExample(Visualization):
    name = "adversarial"
    title = "Adversarial fragility"
    description = ("The smallest change to the pixels (in 0-255 units, the same for every pixel "
                   "at most) that makes the model predict another class, found by projected "
                   "gradient descent; with the perturbation amplified, the perturbed image and "
                   "where the model looks before and after.")
    reference = "https://arxiv.org/abs/1706.06083"
    Params = AdversarialParams
    version = 1

    def cost(self, params: AdversarialParams, meta: "ModelMeta") -> int:
        # the search, one forward for the starting prediction, two Grad-CAMs
        return params.rounds * CANDIDATES * (params.steps + 1) + 3

    def compute(self, model: "LoadedModel", batch: "torch.Tensor", target: TargetInfo,
                params: AdversarialParams, context: RunContext) -> Attribution:
        import torch

        with torch.no_grad():
            probabilities = torch.softmax(model.module(as_model_input(batch)).float(), dim=1)[0]
        original = int(probabilities.argmax())
        result = attack(model, batch, original, target.index, params, context)
        mean, std = (part.to(batch.device, batch.dtype) for part in model.meta.normalization())
        pixels = (batch.detach() * std + mean).clamp(0, 1)
        perturbed = (pixels + result.perturbation).clamp(0, 1)
        after = torch.softmax(result.logits.float(), dim=1)[0]
        new_index = int(after.argmax())
        names = model.meta.class_names
        if result.epsilon is None:
            extra = {"epsilon": None, "new_class": None}
            headline = (f"No flip within {params.max_epsilon:g}/255 "
                        f"({'any class' if target.index == original else target.label})")
        else:
            extra = {"epsilon": round(result.epsilon, 4),
                     "new_class": {"index": new_index, "label": names[new_index],
                                   "probability": float(after[new_index])}}
            headline = f"ε = {result.epsilon:.3g}/255 turns it into {names[new_index]}"
        # Where the attack spent its budget: the largest change over the channels, in pixel
        # units (the heatmap every target gets; the pictures below show it in colour).
        magnitude = to_map(result.perturbation.abs().amax(dim=1, keepdim=True) * 255.0)
        panels = [
            Panel(f"How much each pixel changes, in 0-255 units ({headline})", magnitude,
                  target=target, extra=extra),
            Panel(f"Perturbation, amplified ({headline})",
                  _amplified(result.perturbation), kind="image", target=target, extra=extra),
            Panel(f"Perturbed image: {names[new_index]} (p = {float(after[new_index]):.3f})",
                  _as_uint8(perturbed), kind="image", target=target, extra=extra)]
        panels += self._grad_cams(model, batch, (perturbed - mean) / std, original, new_index,
                                  probabilities, after, extra, context)
        return Attribution(tuple(panels))

    def _grad_cams(self, model: "LoadedModel", batch: "torch.Tensor", perturbed: "torch.Tensor",
                   original: int, new_index: int, before: "torch.Tensor", after: "torch.Tensor",
                   extra: dict[str, Any], context: RunContext) -> list[Panel]:
        """Grad-CAM of the original image for the original class and of the perturbed image for
        the class it now gets, at the model's default CAM layer (none without CAM layers)."""
        from visualizations.grad_cam import grad_cam_map

        layer = model.meta.default_cam_layer
        if layer is None:
            return []
        names = model.meta.class_names
        panels = []
        for title, inputs, index, probability in (
                ("original", batch, original, float(before[original])),
                ("perturbed", perturbed, new_index, float(after[new_index]))):
            values = grad_cam_map(model, as_model_input(inputs.detach().clone()), index, layer,
                                  True, context)
            panels.append(Panel(f"Grad-CAM of the {title} image for {names[index]}",
                                to_map(values),
                                target=TargetInfo(index, names[index], probability),
                                extra=extra))
        return panels


def _as_uint8(pixels: "torch.Tensor") -> np.ndarray:
    """(1, C, H, W) in [0, 1] as uint8 (H, W, 3)."""
    array = (pixels[0].detach().float().cpu().permute(1, 2, 0).numpy() * 255.0 + 0.5)
    array = array.clip(0, 255).astype(np.uint8)
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[:, :, :3]


def _amplified(perturbation: "torch.Tensor") -> np.ndarray:
    """The perturbation made visible: grey is 0, its largest change goes to black or white."""
    bound = float(perturbation.abs().max())
    scaled = 0.5 + 0.5 * perturbation / bound if bound > 0 else perturbation * 0 + 0.5
    return _as_uint8(scaled)
