"""A tiny name -> plugin registry (in the spirit of timm's and torchvision's)."""
from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from app.errors import ConvscopeError, NotFound

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to plugins; refuses duplicates; unknown names list the known ones."""

    def __init__(self, kind: str, not_found: type[ConvscopeError] = NotFound) -> None:
        self.kind = kind
        self._not_found = not_found
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            known = ", ".join(self.names())
            raise self._not_found(f"Unknown {self.kind} {str(name)[:80]!r}; known: {known}.",
                                  fields={"name": f"one of: {known}"}) from None

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[T]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)
