"""``ModelMeta.class_index`` and ``LoadedModel``'s preprocessing and prediction helpers."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from app.errors import ModelOutputInvalid, UnknownClass
from model_adapters.loading import loaded_model_from_module
from tests.adapters.conftest import TinyNet


def _loaded(**overrides: object):  # type: ignore[no-untyped-def]
    options = dict(architecture="tiny", input_size=(8, 12), mean=[0.5], std=[0.25],
                   class_names=["cat", "Dog", "7"], resize=0)
    options.update(overrides)
    return loaded_model_from_module(TinyNet(num_classes=3), **options)  # type: ignore[arg-type]


@pytest.mark.parametrize(("target", "index"), [
    (0, 0), (2, 2), ("1", 1), (" 2 ", 2), ("002", 2), ("cat", 0), ("dog", 1), ("Dog", 1),
])
def test_class_index_accepts_indices_and_labels(target: int | str, index: int) -> None:
    assert _loaded().meta.class_index(target) == index


@pytest.mark.parametrize("target", [
    3, -1, "3", "cow", "", True, 1.0, "²", "١", "9" * 5000, "0" * 30 + "1" * 30, 10 ** 5000,
], ids=lambda target: repr(target)[:12] if not isinstance(target, int) else f"int{len(bin(target))}")
def test_class_index_refuses_everything_else_with_unknown_class(target: object) -> None:
    # Unicode digits ("²" passes str.isdigit) and over-long digit strings once escaped as a
    # bare ValueError, which became a 500 for a request's target.
    with pytest.raises(UnknownClass) as raised:
        _loaded().meta.class_index(target)  # type: ignore[arg-type]
    assert raised.value.code == "E_UNKNOWN_CLASS" and len(raised.value.message) < 200


def test_model_view_resizes_the_shorter_side_then_center_crops() -> None:
    loaded = _loaded(resize=10)
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (18, 0, 22, 20))     # a white stripe in the middle
    view = loaded.model_view(image)
    assert view.size == (12, 8) and view.mode == "RGB"
    # 40x20 -> 20x10, cropped to the central 12x8: the stripe stays centered.
    row = [view.getpixel((x, 4))[0] for x in range(12)]
    assert row[5] > 200 and row[6] > 200 and row[0] < 30 and row[11] < 30
    assert _loaded(resize=0).model_view(image).size == (12, 8)      # plain resize
    gray = _loaded()
    gray.meta = dataclasses.replace(gray.meta, channels=1, mean=(0.5,), std=(0.25,))
    assert gray.model_view(image).mode == "L"
    assert gray.preprocess([image]).shape == (1, 1, 8, 12)


def test_preprocess_normalizes_with_mean_and_std() -> None:
    loaded = _loaded()
    batch = loaded.preprocess([Image.new("RGB", (5, 5), (255, 0, 128))] * 2)
    assert batch.shape == (2, 3, 8, 12) and batch.dtype == torch.float32
    assert batch.device == loaded.device
    torch.testing.assert_close(batch[1, :, 3, 3],
                               torch.tensor([(1 - 0.5) / 0.25, -0.5 / 0.25,
                                             (128 / 255 - 0.5) / 0.25]))


def test_predict_gives_probabilities_and_refuses_non_finite_logits() -> None:
    loaded = _loaded()
    probabilities = loaded.predict(torch.zeros(2, 3, 8, 12))
    assert probabilities.shape == (2, 3)
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(2))
    top = loaded.top_k(probabilities[0], k=5)
    assert [row["index"] for row in top] == sorted(range(3), key=lambda i: -float(
        probabilities[0, i]))
    assert {row["label"] for row in top} == {"cat", "Dog", "7"}
    with torch.no_grad():
        loaded.module.head.bias.fill_(float("nan"))
    with pytest.raises(ModelOutputInvalid):
        loaded.predict(torch.zeros(1, 3, 8, 12))

