"""Class names: from a labels file, or the defaults (ImageNet names for 1000 classes)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from app.errors import ConfigInvalid, LabelsMismatch

IMAGENET_CLASSES = 1000


@lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, from torchvision's bundled metadata (no download)."""
    from torchvision.models import ResNet18_Weights

    return tuple(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """ImageNet names when the model has 1000 outputs, else ``class 0 .. class N-1``."""
    if num_classes == IMAGENET_CLASSES:
        return imagenet_class_names()
    return tuple(f"class {index}" for index in range(num_classes))


def read_labels_file(path: Path) -> tuple[str, ...]:
    """One class name per line; blank trailing lines are ignored, inner blanks are an error."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise ConfigInvalid(f"The labels file {path.name!r} cannot be read as UTF-8 text.",
                            fields={"labels.file": "a readable UTF-8 text file"}) from None
    names = [line.strip() for line in text.rstrip("\n\r ").splitlines()]
    if not names or any(not name for name in names):
        raise ConfigInvalid(f"The labels file {path.name!r} must have one non-empty name per line.",
                            fields={"labels.file": "one class name per line"})
    return tuple(names)


def check_label_count(class_names: tuple[str, ...], num_classes: int, source: str) -> None:
    """Raise LabelsMismatch when ``source`` names a different number of classes than the model."""
    if len(class_names) != num_classes:
        raise LabelsMismatch(f"{source} has {len(class_names)} class names but the model has "
                             f"{num_classes} outputs.",
                             fields={"labels.file": f"{num_classes} class names"})
