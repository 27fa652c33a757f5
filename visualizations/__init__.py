"""Visualization methods. Discovery is explicit: each method module is imported and registered
here (as captum's ``attr/__init__.py`` does); no folder scanning."""
from visualizations.adversarial import AdversarialExample
from visualizations.base import Visualization, visualization_registry
from visualizations.cam import ClassActivationMap
from visualizations.grad_cam import GradCamMap
from visualizations.guided_grad_cam import GuidedGradCamMap
from visualizations.integrated_gradients import IntegratedGradientsMap
from visualizations.occlusion import OcclusionMap
from visualizations.partial_occlusion import PartialOcclusionMap
from visualizations.saliency import SaliencyMap

# Registry order is the order users see (the order of the method table).
for _method in (SaliencyMap(), IntegratedGradientsMap(), OcclusionMap(), PartialOcclusionMap(),
                ClassActivationMap(), GradCamMap(), GuidedGradCamMap(), AdversarialExample()):
    visualization_registry.register(_method.name, _method)
del _method

__all__ = ["Visualization", "visualization_registry"]
