"""Every checkpoint shape real training scripts write loads to the same weights (same logits)."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from app.errors import CheckpointMismatch
from model_adapters import load_checkpoint
from model_adapters.config import read_config
from tests.adapters.conftest import (CPU, SMALL_ARCHITECTURE, SMALL_CLASSES, logits, probe_batch,
                                     small_torchvision_model, tiny_net)


def _optimizer_state(model: nn.Module) -> dict[str, Any]:
    model = copy.deepcopy(model)  # the step must not change the weights being saved
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(probe_batch(32)).sum().backward()
    optimizer.step()  # fills momentum buffers, as a real training loop would
    return optimizer.state_dict()


def _prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


SHAPES: dict[str, Callable[[nn.Module], Any]] = {
    "bare.pt": lambda m: m.state_dict(),
    "state_dict_wrapper.pth": lambda m: {"state_dict": m.state_dict(), "epoch": 7,
                                         "best_acc1": torch.tensor(0.71), "arch": "squeezenet"},
    "model_wrapper.ckpt": lambda m: {"model": m.state_dict(), "epoch": 3,
                                     "optimizer": _optimizer_state(m)},
    "model_state_dict_wrapper.bin": lambda m: {"model_state_dict": m.state_dict(),
                                               "optimizer_state_dict": _optimizer_state(m),
                                               "hyper_parameters": {"lr": 0.1, "batch": 64}},
    "net_wrapper.pt": lambda m: {"net": m.state_dict(), "acc": 93.1, "epoch": 200},
    "dataparallel.pt": lambda m: nn.DataParallel(m).state_dict(),
    "compiled.pt": lambda m: _prefixed(m.state_dict(), "_orig_mod."),
    "lightning.ckpt": lambda m: {"state_dict": _prefixed(m.state_dict(), "model."),
                                 "epoch": 4, "global_step": 1000,
                                 "pytorch-lightning_version": "2.4.0",
                                 "optimizer_states": [_optimizer_state(m)],
                                 "hyper_parameters": {"lr": 0.01}},
    "ddp_compiled.pt": lambda m: _prefixed(m.state_dict(), "module._orig_mod."),
    # Plain data that scripts save beside the weights: numpy scalars/arrays, argparse args.
    "numpy_and_args.pth": lambda m: {"state_dict": m.state_dict(),
                                     "best_acc": np.float64(0.93), "epoch": np.int64(12),
                                     "confusion": np.eye(3, dtype=np.float32),
                                     "args": argparse.Namespace(lr=0.1, arch="squeezenet1_1")},
}


@pytest.mark.parametrize("file_name", sorted(SHAPES))
def test_torchvision_shapes_round_trip_without_config(tmp_path: Path, file_name: str) -> None:
    model = small_torchvision_model(seed=3)
    expected = logits(model, probe_batch())
    torch.save(SHAPES[file_name](model), tmp_path / file_name)

    loaded = load_checkpoint(tmp_path / file_name, read_config(tmp_path), CPU)

    assert loaded.meta.architecture == SMALL_ARCHITECTURE
    assert loaded.meta.num_classes == SMALL_CLASSES
    assert loaded.meta.class_names[0] == "class 0"
    assert not loaded.module.training
    torch.testing.assert_close(logits(loaded.module, probe_batch()), expected)


def test_safetensors_and_legacy_format_round_trip(tmp_path: Path) -> None:
    model = small_torchvision_model(seed=4)
    expected = logits(model, probe_batch())
    save_file({key: value.contiguous() for key, value in model.state_dict().items()},
              str(tmp_path / "weights.safetensors"))
    torch.save(_prefixed(model.state_dict(), "module."), tmp_path / "legacy.pth",
               _use_new_zipfile_serialization=False)
    config = read_config(tmp_path)
    for name in ("weights.safetensors", "legacy.pth"):
        loaded = load_checkpoint(tmp_path / name, config, CPU)
        torch.testing.assert_close(logits(loaded.module, probe_batch()), expected)


def test_half_precision_checkpoint_runs_in_float32(tmp_path: Path) -> None:
    model = small_torchvision_model(seed=5)
    torch.save(model.half().state_dict(), tmp_path / "half.pt")
    loaded = load_checkpoint(tmp_path / "half.pt", read_config(tmp_path), CPU)
    assert next(loaded.module.parameters()).dtype == torch.float32
    torch.testing.assert_close(logits(loaded.module, probe_batch()),
                               logits(model.float(), probe_batch()))


def test_named_architecture_with_prefix_and_preprocess_override(tmp_path: Path) -> None:
    model = small_torchvision_model(seed=6)
    torch.save({"model": _prefixed(model.state_dict(), "backbone.")}, tmp_path / "run.pt")
    (tmp_path / "convscope.toml").write_text(
        f'[model]\narchitecture = "{SMALL_ARCHITECTURE}"\nnum_classes = {SMALL_CLASSES}\n'
        "[preprocess]\ninput_size = [96, 96]\nresize = 0\nmean = 0.5\nstd = 0.25\n")
    (tmp_path / "labels.txt").write_text("".join(f"thing {i}\n" for i in range(SMALL_CLASSES)))

    loaded = load_checkpoint(tmp_path / "run.pt", read_config(tmp_path), CPU)

    torch.testing.assert_close(logits(loaded.module, probe_batch()), logits(model, probe_batch()))
    meta = loaded.meta
    assert (meta.input_size, meta.resize, meta.mean, meta.std) == ((96, 96), 0, (0.5,) * 3,
                                                                   (0.25,) * 3)
    assert meta.class_names[3] == "thing 3"


def test_named_architecture_mismatch_names_the_first_keys(tmp_path: Path) -> None:
    state = small_torchvision_model().state_dict()
    state.pop("features.0.weight")
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, tmp_path / "broken.pt")
    (tmp_path / "convscope.toml").write_text(f'[model]\narchitecture = "{SMALL_ARCHITECTURE}"\n')
    with pytest.raises(CheckpointMismatch) as raised:
        load_checkpoint(tmp_path / "broken.pt", read_config(tmp_path), CPU)
    assert "features.0.weight" in raised.value.message
    assert "extra.weight" in raised.value.message
    assert str(tmp_path) not in raised.value.message


def test_num_classes_in_config_must_agree(tmp_path: Path) -> None:
    torch.save(small_torchvision_model().state_dict(), tmp_path / "m.pt")
    (tmp_path / "convscope.toml").write_text("[model]\nnum_classes = 7\n")
    with pytest.raises(CheckpointMismatch, match="num_classes = 7"):
        load_checkpoint(tmp_path / "m.pt", read_config(tmp_path), CPU)


def test_default_preprocessing_follows_torchvision_metadata(tmp_path: Path) -> None:
    torch.save(small_torchvision_model().state_dict(), tmp_path / "m.pt")
    meta = load_checkpoint(tmp_path / "m.pt", read_config(tmp_path), CPU).meta
    assert (meta.input_size, meta.resize, meta.channels) == ((224, 224), 256, 3)
    assert meta.mean == pytest.approx((0.485, 0.456, 0.406))


def test_factory_config_round_trips_with_kwargs_and_prefix(tmp_path: Path) -> None:
    model = tiny_net(seed=2, num_classes=5, width=6)
    torch.save({"state_dict": _prefixed(model.state_dict(), "module."), "epoch": 2},
               tmp_path / "tiny.pt")
    (tmp_path / "convscope.toml").write_text(
        '[model]\nfactory = "tests.adapters.conftest:TinyNet"\nkwargs = { num_classes = 5, '
        "width = 6 }\n[preprocess]\ninput_size = [32, 32]\n")

    loaded = load_checkpoint(tmp_path / "tiny.pt", read_config(tmp_path), CPU)

    assert loaded.meta.adapter == "factory"
    assert loaded.meta.architecture == "TinyNet"
    assert loaded.meta.default_cam_layer == "features"
    torch.testing.assert_close(logits(loaded.module, probe_batch(32)),
                               logits(model, probe_batch(32)))


@pytest.mark.slow
def test_every_torchvision_architecture_is_recognized_by_its_keys() -> None:
    # Shapes only (meta tensors): recognition never reads values, so this covers all ~80
    # architectures at any class count without allocating their weights.
    from model_adapters.torchvision_builds import build, classification_architectures, recognize

    for name in classification_architectures():
        state = build(name, num_classes=7).state_dict()
        match = recognize(state)
        assert match is not None, name
        fingerprint, kwargs = match
        assert fingerprint.architecture == name and kwargs == {"num_classes": 7}, (name, kwargs)


def test_vit_fine_tuned_at_another_resolution_is_recognized() -> None:
    from model_adapters.torchvision_builds import build, default_preprocess, recognize

    state = build("vit_b_16", num_classes=5, image_size=384).state_dict()
    fingerprint, kwargs = recognize(_prefixed(state, "")) or (None, None)
    assert fingerprint is not None and fingerprint.architecture == "vit_b_16"
    assert kwargs == {"num_classes": 5, "image_size": 384}
    assert default_preprocess("vit_b_16", build("vit_b_16", image_size=384)).input_size == \
        (384, 384)


def test_googlenet_without_aux_heads_is_recognized() -> None:
    from model_adapters.torchvision_builds import build, recognize

    state = build("googlenet", num_classes=3, aux_logits=False, init_weights=False).state_dict()
    match = recognize(state)
    assert match is not None and match[0].architecture == "googlenet"
    assert dict(match[0].build_kwargs)["aux_logits"] is False


@pytest.mark.parametrize("factory", ["tests.adapters.conftest:TinyNet",
                                     "efficientnet_lite_pytorch:EfficientNet.from_name"])
def test_factory_num_classes_is_inferred_from_a_fine_tuned_checkpoint(tmp_path: Path,
                                                                      factory: str) -> None:
    # The factory builds its default class count (3 for TinyNet, 1000 for EfficientNet);
    # the checkpoint was fine-tuned on 5 classes, and convscope.toml does not say so.
    from efficientnet_lite_pytorch import EfficientNet

    if factory.startswith("efficientnet"):
        torch.manual_seed(0)
        model = EfficientNet.from_name("efficientnet-lite0", num_classes=5).eval()
        args, size = 'args = ["efficientnet-lite0"]\n', 64
    else:
        model, args, size = tiny_net(seed=3, num_classes=5), "", 32
    torch.save({"model": model.state_dict(), "epoch": 9}, tmp_path / "finetuned.pt")
    (tmp_path / "convscope.toml").write_text(
        f'[model]\nfactory = "{factory}"\n{args}[preprocess]\ninput_size = [{size}, {size}]\n')

    loaded = load_checkpoint(tmp_path / "finetuned.pt", read_config(tmp_path), CPU)

    assert loaded.meta.num_classes == 5
    torch.testing.assert_close(logits(loaded.module, probe_batch(size)),
                               logits(model, probe_batch(size)))


def test_factory_class_count_disagreeing_with_the_config_is_a_mismatch(tmp_path: Path) -> None:
    torch.save(tiny_net(num_classes=5).state_dict(), tmp_path / "m.pt")
    (tmp_path / "convscope.toml").write_text(
        '[model]\nfactory = "tests.adapters.conftest:TinyNet"\nnum_classes = 4\n'
        "[preprocess]\ninput_size = [16, 16]\n")
    with pytest.raises(CheckpointMismatch, match="num_classes = 4"):
        load_checkpoint(tmp_path / "m.pt", read_config(tmp_path), CPU)
