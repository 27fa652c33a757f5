"""The default CAM layer is the tensor the head pools (after its activation) for every torchvision
CNN classifier; transformers get grid-shaped layers only (ViT: the last block's ln_1)."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from model_adapters.cam_layers import (POOLED_LAYER, TRANSFORMER_REASON, find_cam_layers,
                                       token_grid)
from model_adapters.loading import loaded_model_from_module
from model_adapters.torchvision_builds import build, default_preprocess
from tests.adapters.conftest import TinyNet

# Family prefix -> the module whose output the classifier's global pooling reads (DenseNet: no
# module outputs it, its final ReLU is functional, so the pooled tensor itself).
EXPECTED_DEFAULT = {
    "alexnet": "features", "vgg": "features", "densenet": POOLED_LAYER,
    "mobilenet_v2": "features", "mobilenet_v3": "features", "efficientnet": "features",
    "convnext": "features", "resnet": "layer4", "resnext": "layer4", "wide_resnet": "layer4",
    "regnet": "trunk_output", "inception_v3": "Mixed_7c", "googlenet": "inception5b",
    "shufflenet": "conv5", "mnasnet": "layers", "squeezenet": "classifier.2",
}
# Transformers: the ViT default is the input of the last attention (``num_layers - 1``).
EXPECTED_TRANSFORMER_DEFAULT = {
    "vit_b_16": "encoder.layers.encoder_layer_11.ln_1",
    "vit_b_32": "encoder.layers.encoder_layer_11.ln_1",
    "vit_l_16": "encoder.layers.encoder_layer_23.ln_1",
    "vit_l_32": "encoder.layers.encoder_layer_23.ln_1",
    "vit_h_14": "encoder.layers.encoder_layer_31.ln_1",
    "swin_": "permute", "maxvit_": "blocks.3",
}
ALL_ARCHITECTURES = sorted(torchvision.models.list_models(module=torchvision.models))


def _expected(name: str) -> str:
    expectations = {**EXPECTED_DEFAULT, **EXPECTED_TRANSFORMER_DEFAULT}
    matches = [family for family in expectations if name.startswith(family)]
    assert matches, f"no expectation for new torchvision architecture {name!r}: add one"
    return expectations[max(matches, key=len)]


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
    # "body" ends in batch norm: the head pools the shared ReLU's second output, which no
    # module name identifies, so the pooled tensor itself is offered and is the default.
    assert cam.layers == ("stem", "body.0", "body.1", "body", POOLED_LAYER)
    assert cam.default == POOLED_LAYER


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


def test_a_vit_gets_its_patch_token_layers_and_the_last_attentions_input() -> None:
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2,
                                               num_heads=2, hidden_dim=8, mlp_dim=16,
                                               num_classes=4)
    loaded = loaded_model_from_module(vit, architecture="vit_tiny", input_size=(32, 32),
                                      mean=[0.5], std=[0.5], class_names=None)
    assert loaded.meta.cam_unsupported_reason is None
    assert loaded.meta.default_cam_layer == "encoder.layers.encoder_layer_1.ln_1"
    assert "conv_proj" in loaded.meta.cam_layers                  # the 2 x 2 patch embedding
    assert "encoder.layers.encoder_layer_0.mlp" in loaded.meta.cam_layers
    assert loaded.predict(torch.zeros(1, 3, 32, 32)).shape == (1, 4)


class SequenceTransformer(nn.Module):
    """Attention over 3 learned tokens that are no grid over the image."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3 * 4),
                                    nn.Unflatten(1, (3, 4)))
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(x)
        attended, _ = self.attention(tokens, tokens, tokens)
        return self.fc(attended.mean(dim=1))


def test_a_transformer_without_a_grid_reports_cam_unsupported() -> None:
    loaded = loaded_model_from_module(SequenceTransformer(), architecture="seq", input_size=(8, 8),
                                      mean=[0.5], std=[0.5], class_names=None)
    assert loaded.meta.cam_layers == () and loaded.meta.default_cam_layer is None
    assert loaded.meta.cam_unsupported_reason == TRANSFORMER_REASON


class SelfAttention2d(nn.Module):
    """A non-local block: the map as tokens through pre-norm attention, back to (N, C, H, W)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        attended = self.attention(tokens, tokens, tokens, need_weights=False)[0]
        return x + attended.transpose(1, 2).reshape(n, c, h, w)


@pytest.mark.parametrize("side", [224, 227])
def test_a_cnn_with_an_attention_block_keeps_its_cnn_default(side: int) -> None:
    """A hybrid's last CNN stage after the attention stays the default, also at a size the
    stride does not divide."""
    resnet = torchvision.models.resnet18(num_classes=4)
    resnet.layer3 = nn.Sequential(resnet.layer3, SelfAttention2d(256))
    cam = find_cam_layers(resnet.eval(), (side, side))
    assert cam.default == "layer4" and "layer2" in cam.layers


class ChannelFirstTokens(nn.Module):
    """(N, C, L) channels-first: 16 channels look like a 4 x 4 grid of tokens by count, but
    the patch embedding's grid is 2 x 2, so they are not read as tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 8, stride=8)             # (N, 16, 2, 2) on 16 x 16
        self.flatten = nn.Flatten(2)                           # (N, 16, 4)
        self.attention = nn.MultiheadAttention(4, 1, batch_first=True)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.flatten(self.conv(x))
        return self.fc(self.attention(features, features, features)[0].mean(1))


def test_channels_first_tensors_are_not_read_as_tokens() -> None:
    cam = find_cam_layers(ChannelFirstTokens().eval(), (16, 16))
    assert cam.layers == ("conv",) and cam.default == "conv"


def test_patch_tokens_after_the_last_attention_are_not_offered() -> None:
    from tests.visualizations.models import TinyTransformer

    cam = find_cam_layers(TinyTransformer().eval(), (32, 32))
    assert cam.layers == ("embed", "norm") and cam.default == "norm"


def test_an_attention_module_that_never_runs_changes_nothing() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 8, stride=8)
            self.first, self.second = nn.LayerNorm(8), nn.LayerNorm(8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)   # never called
            self.fc = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            tokens = self.embed(x).flatten(2).transpose(1, 2)
            return self.fc(self.second(self.first(tokens)).mean(1))

    cam = find_cam_layers(Unused().eval(), (32, 32))
    assert cam.layers == ("embed", "first", "second") and cam.default == "second"


@pytest.mark.parametrize("tokens, size, grid", [
    (197, (224, 224), (1, 14, 14)),     # ViT-B/16: class token + 14 x 14
    (50, (224, 224), (1, 7, 7)),        # ViT-B/32
    (198, (224, 224), (2, 14, 14)),     # DeiT distilled: class + distillation token
    (201, (224, 224), (5, 14, 14)),     # class + 4 register tokens
    (196, (224, 224), (0, 14, 14)),     # no prefix
    (1 + 12 * 16, (192, 256), (1, 12, 16)),   # non-square input
    (100, (224, 224), None), (3, (8, 8), None),
])
def test_token_grid(tokens, size, grid) -> None:
    assert token_grid(tokens, size) == grid


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
