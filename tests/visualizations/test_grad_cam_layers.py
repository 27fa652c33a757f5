"""Grad-CAM at every kind of layer: ViT patch tokens laid out on their grid, Swin's feature
map, convolutional layers (the same numbers as captum's LayerGradCam, in-place ops after the
layer included), and a clear refusal when the model switches gradients off."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from tests.visualizations.models import TinyCnn, TinyTransformer, wrap
from visualizations import visualization_registry
from visualizations.common import upsample
from visualizations.base import RunContext
from visualizations.grad_cam import grad_cam_map


def quadrant_energy(values: np.ndarray) -> dict[str, float]:
    half = values.shape[0] // 2
    energy = np.abs(values)
    parts = {"top-left": energy[:half, :half], "top-right": energy[:half, half:],
             "bottom-left": energy[half:, :half], "bottom-right": energy[half:, half:]}
    total = energy.sum()
    return {name: float(part.sum() / total) for name, part in parts.items()}


@pytest.mark.parametrize("quadrant, transposed, rows, cols", [
    ("top-right", "bottom-left", slice(0, 16), slice(16, 32)),
    ("bottom-left", "top-right", slice(16, 32), slice(0, 16))])
def test_patch_tokens_land_where_they_came_from(quadrant, transposed, rows, cols) -> None:
    """Only one quadrant of the image has content, so only its patch tokens are non-zero: the
    map must sit there (bilinear upsampling of the 4 x 4 grid spreads a little over the
    borders). A transposed grid would swap top-right and bottom-left, and keeping the class
    token would not even reshape."""
    torch.manual_seed(0)
    model = wrap(TinyTransformer())
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, rows, cols] = torch.rand(1, 3, 16, 16) + 0.5
    result = visualization_registry.get("grad_cam").run(model, image, [0], {"relu": False})
    (panel,) = result.panels
    assert "at norm" in panel.title
    energy = quadrant_energy(panel.values)
    assert energy[quadrant] > 0.8 and energy[transposed] < 0.02, energy


def test_vit_grad_cam_and_guided_grad_cam_run_at_the_default_layer() -> None:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=16, mlp_dim=32,
                                               num_classes=3)
    torch.nn.init.normal_(vit.heads.head.weight)      # torchvision starts the head at zero
    model = wrap(vit)
    image = torch.rand(1, 3, 32, 32)
    for name in ("grad_cam", "guided_grad_cam"):
        (panel,) = visualization_registry.get(name).run(model, image, [0], {}).panels
        assert "encoder_layer_1.ln_1" in panel.title
        assert panel.values.shape == (32, 32) and np.isfinite(panel.values).all()
        assert panel.values.max() > 0
    # Why not a later layer: after the last attention only the class token reaches the head,
    # so the patch tokens of the last block's ln_2 get no gradient at all.
    late = grad_cam_map(model, image, 0, "encoder.layers.encoder_layer_1.ln_2", False,
                        RunContext())
    assert float(late.abs().max()) == 0.0


def test_swin_gets_grad_cam_and_exact_cam_on_its_feature_map() -> None:
    torch.manual_seed(0)
    swin = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[1, 1],
                                              num_heads=[1, 1], window_size=[2, 2],
                                              num_classes=3)
    model = wrap(swin)
    assert model.meta.default_cam_layer == "permute"   # (N, C, 4, 4) in front of the pool
    image = torch.rand(1, 3, 32, 32)
    (grad_cam,) = visualization_registry.get("grad_cam").run(model, image, None, {}).panels
    (cam,) = visualization_registry.get("cam").run(model, image, None, {}).panels
    assert grad_cam.values.shape == cam.values.shape == (32, 32)
    assert np.isfinite(cam.values).all() and np.abs(cam.values).max() > 0


def assert_equals_captums_layer_grad_cam(model, image: torch.Tensor, target: int, layer: str,
                                         relu: bool) -> None:
    from captum.attr import LayerGradCam

    ours = grad_cam_map(model, image, target, layer, relu, RunContext())
    coarse = LayerGradCam(model.module, dict(model.module.named_modules())[layer]).attribute(
        image.clone().requires_grad_(True), target=target, relu_attributions=relu)
    theirs = upsample(coarse.detach().float(), tuple(image.shape[-2:]))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("layer", ["features.0", "features.2", "features.4", "features"])
@pytest.mark.parametrize("relu", [True, False])
def test_feature_map_grad_cam_equals_captums_layer_grad_cam(layer: str, relu: bool) -> None:
    torch.manual_seed(0)
    model = wrap(TinyCnn().eval())
    assert_equals_captums_layer_grad_cam(model, torch.randn(1, 3, 32, 32), 2, layer, relu)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("layer", ["layer4.1.bn2", "layer3.0.conv1", "layer4"])
def test_layers_followed_by_in_place_ops_still_equal_captum(layer: str) -> None:
    """resnet18's ``bn2`` output is changed in place (``out += identity``, ``relu_``): the
    activations must be taken before that, as captum does."""
    from visualizations.common import prepare_model

    torch.manual_seed(0)
    model = wrap(torchvision.models.resnet18(num_classes=3).eval(), side=64)
    prepare_model(model)                                  # channels-last, as in a real run
    assert_equals_captums_layer_grad_cam(model, torch.randn(1, 3, 64, 64), 1, layer, False)


class NoGradBackbone(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        with torch.no_grad():
            features = self.conv(x)
        return self.fc(features.mean(dim=(2, 3)))


def test_a_model_that_switches_gradients_off_is_refused_with_a_reason() -> None:
    from app.errors import MethodUnsupported

    with pytest.raises(MethodUnsupported) as caught:
        visualization_registry.get("grad_cam").run(wrap(NoGradBackbone()),
                                                   torch.rand(1, 3, 32, 32), None, {})
    assert "no_grad" in caught.value.message
