"""Integrated gradients: gradients integrated along a straight path from a baseline image.

Sundararajan, Taly & Yan (2017), "Axiomatic Attribution for Deep Networks",
https://arxiv.org/abs/1703.01365. The attributions of all pixels sum (up to the integration
error) to the difference of the target logit between the image and the baseline
("completeness"), so the map is signed: red pixels raise the score, blue ones lower it.

Caveat: the picture depends on the baseline -- what "absence of signal" means. A black baseline
cannot attribute anything to black pixels; a blurred one asks what the sharp details add
(Sturmfels et al. 2020, https://distill.pub/2020/attribution-baselines/); a noise baseline
averages over no particular image.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from visualizations.base import Attribution, Panel, RunContext, TargetInfo, Visualization, param
from visualizations.batching import call_with_oom_fallback, choose_batch_size
from visualizations.common import (ObservedForward, as_model_input, blurred, pixel_values,
                                   quiet_captum, to_map)

if TYPE_CHECKING:
    import torch

    from model_adapters.base import LoadedModel, ModelMeta

BASELINES = ("black", "blurred", "noise")


@dataclass(frozen=True)
class IntegratedGradientsParams:
    steps: int = param(32, label="Steps", min=4, max=256,
                       help="Points on the path from the baseline to the image.")
    baseline: str = param("black", label="Baseline", choices=BASELINES,
                          help="The image that stands for 'no signal': black, a strongly "
                               "blurred copy, or uniform noise.")


def make_baseline(kind: str, meta: "ModelMeta", inputs: "torch.Tensor") -> "torch.Tensor":
    """The baseline image in the model's normalized space, shaped like ``inputs``."""
    import torch

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

    def cost(self, params: Any, meta: "ModelMeta") -> int:
        return params.steps

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
        return Attribution((Panel(f"Integrated gradients for {target.label} "
                                  f"({params.baseline} baseline)", to_map(values), signed=True,
                                  target=target),))
