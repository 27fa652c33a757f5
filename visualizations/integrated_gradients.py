"""Integrated gradients: gradients integrated along a straight path from a baseline image.

Sundararajan, Taly & Yan (2017), "Axiomatic Attribution for Deep Networks",
https://arxiv.org/abs/1703.01365. The attributions of all pixels sum (up to the integration
error) to the difference of the target logit between the image and the baseline
("completeness"), so the map is signed: red pixels raise the score, blue ones lower it.

Every panel reports how well that holds: ``metrics["completeness_error"]`` is
``|sum of attributions - (f(image) - f(baseline))| / |f(image) - f(baseline)|`` for the target
logit ``f`` (two extra rows in one forward pass). The integral is a Gauss-Legendre quadrature
(captum's default) over ``steps`` points, run in bounded step batches; when the error is 5 % or
more the panel carries a note saying so.

Caveat: the picture depends on the baseline -- what "absence of signal" means. The default,
``blurred``, asks what the sharp details add (Sturmfels et al. 2020,
https://distill.pub/2020/attribution-baselines/); ``mean`` is the training mean colour (zero in
the model's normalized input space, captum's default); a black baseline cannot attribute
anything to black pixels; a noise baseline stands for one particular random image.

The default baseline was chosen on ground truth: on the pointing game of
``tests/visualizations/test_pointing_game.py`` (16 targets, 64 steps) the blurred baseline hit
13, noise 14, black 11 and the mean colour 9; on the held-out set of issue 9 (12 targets)
blurred 12, the mean colour 12, noise 9, black 8 -- blurred is best over both (25 of 28). The
step count was chosen on the completeness error (below).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from visualizations.base import Attribution, Panel, RunContext, TargetInfo, Visualization, param
from visualizations.batching import call_with_oom_fallback, choose_batch_size
from visualizations.common import (ObservedForward, as_model_input, blurred, check_finite,
                                   pixel_values, quiet_captum, to_map)

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel, ModelMeta

# Completeness error on the five demo photos, the worst of the five: blurred baseline 5.6 % at
# 128 steps, 3.0 % at 256; mean-colour baseline 59 % at 32, 15 % at 64, 6.4 % at 128, 3.9 % at
# 256 (captum's Riemann trapezoid rule instead of Gauss-Legendre, 128 steps: 22 %). 256 steps
# cost 258 model evaluations, well inside CONVSCOPE_MAX_COST's default of 5000.
STEPS_DEFAULT = 256
BASELINES = ("blurred", "mean", "black", "noise")
# The completeness error above which a panel warns that the integral is coarse.
COMPLETENESS_WARNING = 0.05


@dataclass(frozen=True)
class IntegratedGradientsParams:
    steps: int = param(STEPS_DEFAULT, label="Steps", min=4, max=1024,
                       help="Points on the path from the baseline to the image; more points "
                            "make the attributions add up more exactly (see the panel's "
                            "completeness error).")
    baseline: str = param("blurred", label="Baseline", choices=BASELINES,
                          help="The image that stands for 'no signal': a strongly blurred "
                               "copy, the training mean colour, black, or uniform noise.")


def make_baseline(kind: str, meta: "ModelMeta", inputs: "torch.Tensor") -> "torch.Tensor":
    """The baseline image in the model's normalized space, shaped like ``inputs``."""
    import torch

    if kind == "mean":
        return torch.zeros_like(inputs)               # the normalization mean colour
    if kind == "black":
        return pixel_values(meta, inputs, 0.0).expand_as(inputs).contiguous()
    if kind == "blurred":
        # sigma = 1/16 of the shorter side: objects become blobs, their details are gone.
        return blurred(inputs, min(inputs.shape[-2:]) / 16.0)
    generator = torch.Generator(device="cpu").manual_seed(0)  # same request, same picture
    uniform = torch.rand(inputs.shape, generator=generator).to(inputs.device, inputs.dtype)
    low, high = pixel_values(meta, inputs, 0.0), pixel_values(meta, inputs, 1.0)
    return low + uniform * (high - low)


class IntegratedGradientsMap(Visualization):
    name = "integrated_gradients"
    title = "Integrated gradients"
    description = ("Each pixel's share of the class score relative to a baseline image, from "
                   "gradients accumulated along the path from the baseline to the image. "
                   "Signed: red raises the score, blue lowers it.")
    reference = "https://arxiv.org/abs/1703.01365"
    display_clip_percentile = 99.5     # display only: outlier pixels saturate
    display_smoothed_view = True
    Params = IntegratedGradientsParams
    # Version 2: blurred baseline and 256 steps by default; completeness error and warning on
    # every panel.
    version = 2

    def cost(self, params: Any, meta: "ModelMeta") -> int:
        return params.steps + 2          # the path, and the image and baseline for completeness

    def compute(self, model: "LoadedModel", batch: "torch.Tensor", target: TargetInfo,
                params: IntegratedGradientsParams, context: RunContext) -> Attribution:
        from captum.attr import IntegratedGradients

        inputs = as_model_input(batch.detach().clone())
        baseline = as_model_input(make_baseline(params.baseline, model.meta, inputs))
        forward = ObservedForward(model.module, context, params.steps)
        integrated = IntegratedGradients(forward)

        def attribute(batch_size: int) -> "torch.Tensor":
            forward.rows_seen = 0
            with quiet_captum():
                return integrated.attribute(inputs, baselines=baseline, target=target.index,
                                            n_steps=params.steps,
                                            internal_batch_size=min(batch_size, params.steps))

        size = choose_batch_size(model, inputs, context, backward=True)
        attributions = call_with_oom_fallback(attribute, size)
        values = attributions.sum(dim=1)  # signed contribution of each pixel, all channels
        metrics, notes = completeness(model, inputs, baseline, target.index,
                                      float(attributions.sum()), params.steps)
        return Attribution((Panel(f"Integrated gradients for {target.label} "
                                  f"({params.baseline} baseline)", to_map(values), signed=True,
                                  target=target, metrics=metrics, notes=notes),))


def completeness(model: "LoadedModel", inputs: "torch.Tensor", baseline: "torch.Tensor",
                 target: int, attribution_sum: float,
                 steps: int) -> tuple[dict[str, float], tuple[str, ...]]:
    """The completeness check of one IG map: metrics, and a note when it is poor."""
    import torch

    with torch.inference_mode():
        logits = model.module(as_model_input(torch.cat([inputs, baseline])))
    check_finite(logits, "logits")
    difference = float(logits[0, target] - logits[1, target])
    metrics = {"attribution_sum": attribution_sum, "logit_difference": difference}
    if abs(difference) < 1e-6 * max(1.0, float(logits[0, target].abs())):
        return metrics, ("The class score is the same for the image and the baseline, so the "
                         "attributions have nothing to add up to; try another baseline.",)
    error = abs(attribution_sum - difference) / abs(difference)
    metrics["completeness_error"] = error
    if error < COMPLETENESS_WARNING:
        return metrics, ()
    return metrics, (f"Completeness error {100 * error:.1f} %: the attributions add up to "
                     f"{attribution_sum:.3g} instead of the score difference {difference:.3g}, "
                     f"so the {steps}-step integral is coarse here; raise 'steps'.",)
