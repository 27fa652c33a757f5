"""The bundled pretrained demo model recognizes the bundled photos."""
from __future__ import annotations

import pytest
from PIL import Image

from app.catalog import ModelCatalog, demo_directory
from tests.adapters.conftest import CPU

CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def demo_model():  # type: ignore[no-untyped-def]
    return ModelCatalog(demo_directory(), CPU).load("latest")


def _top5(model, name: str) -> list[dict]:  # type: ignore[no-untyped-def]
    image = Image.open(demo_directory() / "images" / f"{name}.jpg")
    return model.top_k(model.predict(model.preprocess([image]))[0], 5)


def test_cat_photo_has_a_cat_class_in_the_top_5(demo_model) -> None:  # type: ignore[no-untyped-def]
    assert any(row["index"] in CAT_CLASSES for row in _top5(demo_model, "chelsea"))


def test_coffee_photo_is_espresso(demo_model) -> None:  # type: ignore[no-untyped-def]
    top = _top5(demo_model, "coffee")[0]
    assert top["label"] == "espresso" and top["index"] == 967


def test_demo_meta_and_images(demo_model) -> None:  # type: ignore[no-untyped-def]
    meta = demo_model.meta
    assert meta.architecture == "efficientnet-lite0" and meta.num_classes == 1000
    assert (meta.input_size, meta.resize, meta.mean, meta.std) == ((224, 224), 256, (0.5,) * 3,
                                                                   (0.5,) * 3)
    assert meta.class_names[281] == "tabby"
    assert meta.default_cam_layer == "@pooled" and "_conv_head" in meta.cam_layers
    images = sorted(path.name for path in (demo_directory() / "images").glob("*.jpg"))
    assert images == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "grace_hopper.jpg",
                      "rocket.jpg"]
    for name in images:
        with Image.open(demo_directory() / "images" / name) as image:
            assert max(image.size) <= 512
    sources = (demo_directory() / "images" / "SOURCES.md").read_text()
    assert all(name in sources for name in images)
