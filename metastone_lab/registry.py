"""A tiny named registry used for every pluggable strategy (segmenters,
aggregators, selectors, losses, tasks, trainer modes).

>>> AGGREGATORS = Registry("aggregator")
>>> @AGGREGATORS.register("mean")
... def mean(x): ...
>>> AGGREGATORS.get("mean")
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

from .errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            valid = ", ".join(sorted(self._items))
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; choose one of: {valid}"
            ) from None

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it named (e.g. a mode a test registered)."""
        self.get(name)  # unknown -> UnknownNameError listing the valid names
        return self._items.pop(name)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
