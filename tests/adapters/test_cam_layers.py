"""The default CAM layer is "the last spatial layer before global pooling" for every torchvision
classification architecture, and transformers are reported as unsupported."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from model_adapters.cam_layers import TRANSFORMER_REASON, find_cam_layers
from model_adapters.loading import loaded_model_from_module
from model_adapters.torchvision_builds import build, default_preprocess
from tests.adapters.conftest import TinyNet

# Family prefix -> the module whose output feeds the classifier's global pooling.
EXPECTED_DEFAULT = {
    "alexnet": "features", "vgg": "features", "densenet": "features",
    "mobilenet_v2": "features", "mobilenet_v3": "features", "efficientnet": "features",
    "convnext": "features", "resnet": "layer4", "resnext": "layer4", "wide_resnet": "layer4",
    "regnet": "trunk_output", "inception_v3": "Mixed_7c", "googlenet": "inception5b",
    "shufflenet": "conv5", "mnasnet": "layers", "squeezenet": "classifier.2",
}
TRANSFORMERS = ("vit_", "swin_", "maxvit_")
ALL_ARCHITECTURES = sorted(torchvision.models.list_models(module=torchvision.models))


def _expected(name: str) -> str | None:
    if name.startswith(TRANSFORMERS):
        return None
    matches = [family for family in EXPECTED_DEFAULT if name.startswith(family)]
    assert matches, f"no expectation for new torchvision architecture {name!r}: add one"
    return EXPECTED_DEFAULT[max(matches, key=len)]


@pytest.mark.slow
def test_default_cam_layer_for_every_torchvision_classifier() -> None:
    # Built and probed on the meta device: shapes only, so all ~80 models take seconds.
    assert len(ALL_ARCHITECTURES) > 60
    for name in ALL_ARCHITECTURES:
        model = build(name).eval()
        size = default_preprocess(name, model).input_size
        cam = find_cam_layers(model, size, 3, torch.device("meta"))
        expected = _expected(name)
        assert tuple(cam.output.shape) == (1, 1000), name
        if expected is None:
            assert cam.layers == () and cam.default is None, name
            assert cam.unsupported_reason == TRANSFORMER_REASON, name
            continue
        assert cam.unsupported_reason is None, name
        assert cam.default == expected, (name, cam.default)
        assert cam.default in cam.layers, name


def test_layers_are_in_forward_order_and_shared_modules_are_dropped() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.act = nn.ReLU()  # called twice: ambiguous for a hook, so never listed
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act(self.stem(x))
            x = self.act(self.body(x))
            return self.fc(self.pool(x).flatten(1))

    cam = find_cam_layers(Shared().eval(), (16, 16))
    assert cam.layers == ("stem", "body.0", "body.1", "body")
    assert cam.default == "body"


def test_pooling_layers_are_listed_but_never_the_default() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Linear(36, 2))
    cam = find_cam_layers(model.eval(), (32, 32))
    assert cam.layers == ("0", "1", "2", "3")
    assert cam.default == "1"


def test_model_without_spatial_layers_reports_why() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    loaded = loaded_model_from_module(model, architecture="mlp", input_size=(8, 8), mean=[0.5],
                                      std=[0.5], class_names=["a", "b"])
    assert loaded.meta.cam_layers == () and loaded.meta.default_cam_layer is None
    assert loaded.meta.cam_unsupported_reason


def test_transformer_is_loadable_and_reports_cam_unsupported() -> None:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=1,
                                               num_heads=2, hidden_dim=8, mlp_dim=16,
                                               num_classes=4)
    loaded = loaded_model_from_module(vit, architecture="vit_tiny", input_size=(32, 32),
                                      mean=[0.5], std=[0.5], class_names=None)
    assert loaded.meta.cam_layers == ()
    assert loaded.meta.cam_unsupported_reason == TRANSFORMER_REASON
    assert loaded.predict(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


def test_loaded_model_from_module_fills_meta() -> None:
    loaded = loaded_model_from_module(TinyNet(num_classes=3), architecture="tiny",
                                      input_size=(20, 24), mean=[0.1, 0.2, 0.3], std=[0.5],
                                      class_names=["cat", "dog", "fish"], resize=32,
                                      sha256="ab" * 32, mtime=5.0)
    meta = loaded.meta
    assert (meta.architecture, meta.num_classes, meta.input_size, meta.resize) == \
        ("tiny", 3, (20, 24), 32)
    assert (meta.mean, meta.std) == ((0.1, 0.2, 0.3), (0.5, 0.5, 0.5))
    assert meta.cam_layers == ("features.0", "features.1", "features.2", "features.3", "features")
    assert meta.default_cam_layer == "features"
    assert meta.parameters == sum(p.numel() for p in TinyNet(num_classes=3).parameters())
    assert (meta.checkpoint_file, meta.sha256, meta.mtime, meta.adapter) == \
        ("<memory>", "ab" * 32, 5.0, "memory")
    assert not loaded.module.training
    assert meta.class_index("dog") == 1


def test_loaded_model_from_module_checks_the_class_count() -> None:
    from app.errors import LabelsMismatch

    with pytest.raises(LabelsMismatch):
        loaded_model_from_module(TinyNet(num_classes=3), architecture="tiny", input_size=(8, 8),
                                 mean=[0.5], std=[0.5], class_names=["a", "b"])
    default = loaded_model_from_module(TinyNet(num_classes=3), architecture="tiny",
                                       input_size=(8, 8), mean=[0.5], std=[0.5],
                                       class_names=None)
    assert default.meta.class_names == ("class 0", "class 1", "class 2")


def test_a_model_that_cannot_run_at_its_input_size_is_a_clear_error() -> None:
    from app.errors import CheckpointMismatch

    with pytest.raises(CheckpointMismatch, match="1x16x16"):
        loaded_model_from_module(TinyNet(), architecture="tiny", input_size=(16, 16),
                                 mean=[0.5], std=[0.5], class_names=None, channels=1)
