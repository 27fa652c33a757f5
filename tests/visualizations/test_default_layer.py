"""The default CAM layer is the tensor the head pools, after its activation -- also when that
activation is a reused module (the demo's ReLU6, torchvision ResNet blocks' ``relu``) or a
function (DenseNet's ``F.relu``, ShuffleNet's and MNASNet's ``x.mean``).

The evidence is an equivalence between two independent routes: CAM multiplies the classifier's
weights into the captured feature maps (no gradients), Grad-CAM weights the same layer by the
class score's back-propagated gradients. For a global-average-pool + linear head the two agree
up to a positive scale (1 / (h * w)) exactly at the tensor the head pools; at the batch norm in
front of the activation (the old default on the demo, ``_bn1``) they do not.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from app.catalog import ModelCatalog, demo_directory
from app.errors import MethodUnsupported
from model_adapters.base import LoadedModel
from model_adapters.cam_layers import POOLED_LAYER
from tests.visualizations.models import wrap
from visualizations import visualization_registry

CAM = visualization_registry.get("cam")
GRAD_CAM = visualization_registry.get("grad_cam")


def assert_positive_multiple(cam: np.ndarray, grad_cam: np.ndarray) -> float:
    """``cam == scale * grad_cam`` for one scale > 0 (least squares), to 0.1 % of the map."""
    cam, grad_cam = cam.astype(np.float64).ravel(), grad_cam.astype(np.float64).ravel()
    scale = float(cam @ grad_cam / (grad_cam @ grad_cam))
    residual = np.linalg.norm(cam - scale * grad_cam) / np.linalg.norm(cam)
    assert scale > 0 and residual < 1e-3, (scale, residual)
    return scale


def default_maps(model: LoadedModel, batch: torch.Tensor, target: int) -> tuple[np.ndarray, ...]:
    (cam,) = CAM.run(model, batch, [target], {}).panels
    (grad_cam,) = GRAD_CAM.run(model, batch, [target], {"relu": False}).panels
    return cam.values, grad_cam.values


@pytest.fixture(scope="module")
def demo_model() -> LoadedModel:
    catalog = ModelCatalog(demo_directory(), torch.device("cpu"), settle_seconds=0.0)
    return catalog.load(catalog.get("latest").id)


@pytest.mark.parametrize("photo, target", [("coffee", 967), ("astronaut", None),
                                           ("chelsea", 285)])
def test_demo_grad_cam_at_the_default_layer_is_a_positive_multiple_of_cam(
        demo_model: LoadedModel, photo: str, target: int | None) -> None:
    batch = demo_model.preprocess([Image.open(demo_directory() / "images" / f"{photo}.jpg")])
    target = target if target is not None else int(demo_model.predict(batch)[0].argmax())
    cam, grad_cam = default_maps(demo_model, batch, target)
    scale = assert_positive_multiple(cam, grad_cam)
    assert scale == pytest.approx(7 * 7, rel=1e-3)          # the 7 x 7 map at 224 px
    # EfficientNet-Lite0 ends in _bn1, then its one ReLU6 module (called all over the network),
    # then the pool: no module outputs the pooled tensor.
    assert demo_model.meta.default_cam_layer == POOLED_LAYER


def test_demo_cam_refuses_the_pre_activation_layer_instead_of_substituting(
        demo_model: LoadedModel) -> None:
    batch = demo_model.preprocess([Image.open(demo_directory() / "images" / "coffee.jpg")])
    with pytest.raises(MethodUnsupported) as caught:
        CAM.run(demo_model, batch, [967], {"layer": "_bn1"})
    assert POOLED_LAYER in caught.value.message and "grad_cam" in caught.value.message
    # Grad-CAM still runs there, and says where it ran.
    (panel,) = GRAD_CAM.run(demo_model, batch, [967], {"layer": "_bn1"}).panels
    assert panel.title.endswith("at _bn1")
    (default,) = GRAD_CAM.run(demo_model, batch, [967], {}).panels
    assert default.title.endswith("at the pooled features")


# torchvision classifiers with a global-average-pool + linear head whose last activation is a
# reused module (ResNet's block ``relu``), a function (DenseNet), or whose pooling is a function
# (ShuffleNet, MNASNet), plus SE blocks that pool earlier (EfficientNet, RegNet-Y). (MobileNetV3
# has two linear layers in its head: no CAM.)
TORCHVISION_CASES = ["resnet18", "densenet121", "shufflenet_v2_x0_5", "mnasnet0_5",
                     "mobilenet_v2", "efficientnet_b0", "regnet_y_400mf"]


@pytest.mark.parametrize("architecture", TORCHVISION_CASES)
def test_torchvision_grad_cam_at_the_default_layer_is_a_positive_multiple_of_cam(
        architecture: str) -> None:
    torch.manual_seed(0)
    module = torchvision.models.get_model(architecture, num_classes=5).eval()
    model = wrap(module, side=96, architecture=architecture)
    image = torch.randn(1, 3, 96, 96)
    for target in (0, 3):
        cam, grad_cam = default_maps(model, image, target)
        assert np.abs(cam).max() > 0
        assert_positive_multiple(cam, grad_cam)


class SharedActivation(nn.Module):
    """One ReLU module used twice; the feature stack ends in batch norm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.act = nn.ReLU()
        self.body = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.act(self.body(x))
        return self.fc(self.pool(x).flatten(1))


class FunctionalHead(nn.Module):
    """conv, batch norm, then ``F.relu`` and ``x.mean`` as functions (DenseNet-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.relu(self.features(x), inplace=True).mean(dim=(2, 3)))


@pytest.mark.parametrize("module_class", [SharedActivation, FunctionalHead])
def test_a_pre_activation_layer_is_never_the_default(module_class: type[nn.Module]) -> None:
    torch.manual_seed(0)
    module = module_class().eval()
    with torch.no_grad():            # running statistics far from (0, 1): a visible activation
        for layer in module.modules():
            if isinstance(layer, nn.BatchNorm2d):
                layer.running_mean.uniform_(-0.5, 0.5)
    model = wrap(module)
    assert model.meta.default_cam_layer == POOLED_LAYER
    image = torch.randn(1, 3, 32, 32)
    # The head reads relu(batch norm): check against the classifier's actual input.
    cam, grad_cam = default_maps(model, image, 1)
    assert_positive_multiple(cam, grad_cam)
    bias = float(module.fc.bias[1].detach())
    with torch.no_grad():
        logit = float(module(image)[0, 1])
    assert cam.mean() + bias == pytest.approx(logit, rel=1e-4, abs=1e-5)
