"""Things chosen by name: one registry type, one way to register, list and refuse a name.

>>> SELECTORS = Registry("selector")
>>> @SELECTORS.register("greedy")
... class GreedySelector: ...
>>> SELECTORS.get("best")
Traceback (most recent call last):
pat.errors.PatError: unknown selector 'best'; choose one of: greedy.

Models, datasets, selectors, corruptions and the training recipe's optimizers, schedules
and step rules are each one :class:`Registry`. The recipe's three live here, at the bottom
of the layers: a config validates ``schedule="cosine"`` against them, and the engine, which
lies above config, fills them. They name the engine modules that register their built-in
entries (``builtins``), which are imported on the first lookup, not when this module is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from importlib import import_module
from typing import Any, Generic, TypeVar

from pat.errors import PatError

__all__ = ["Registry", "OPTIMIZERS", "SCHEDULES", "STEPS"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names mapped to objects of one kind (factories, classes, functions).

    Args:
        kind: what a name names, for messages (``"schedule"``, ``"step rule"``).
        builtins: modules that register the built-in entries when imported; imported on the
            first lookup (:meth:`get`, :meth:`names`, ``in``), so a registry low in the layers
            can hold entries registered from above without importing them.
        sort: list names sorted; otherwise in registration order.
        also: what else is accepted besides the names, appended to the choices in a refusal
            (``"tv:<torchvision name>"``).
    """

    def __init__(self, kind: str, *, builtins: Sequence[str] = (), sort: bool = False, also: str = "") -> None:
        self.kind, self.sort, self.also = kind, sort, also
        self._builtins = tuple(builtins)
        self._entries: dict[str, T] = {}

    def _load(self) -> None:
        builtins, self._builtins = self._builtins, ()  # emptied first: those modules register here
        for module in builtins:
            import_module(module)

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name`` (replacing what was there) and return it."""
        self._entries[name] = obj
        return obj

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`: ``@REGISTRY.register("name")``."""
        return lambda obj: self.add(name, obj)

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests register temporary entries)."""
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        """The registered names, sorted if the registry sorts, else in registration order."""
        self._load()
        return sorted(self._entries) if self.sort else list(self._entries)

    def unknown(self, name: object, *, argument: str | None = None) -> PatError:
        """The one refusal of a name, as a :class:`PatError` to raise.

        It reads ``unknown <kind> 'x'; choose one of: a, b.``; ``argument`` names the option
        that held the value when it is not the kind itself (``"policy"`` for a schedule given
        in ``policies``).
        """
        choices = ", ".join(self.names()) + (f" or {self.also}" if self.also else "")
        return PatError(f"unknown {argument or self.kind} {name!r}; choose one of: {choices}.")

    def get(self, name: str, *, argument: str | None = None) -> T:
        """The object registered under ``name``; :meth:`unknown`'s :class:`PatError` if none."""
        self._load()
        if not isinstance(name, str) or name not in self._entries:
            raise self.unknown(name, argument=argument)
        return self._entries[name]

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


# -- the training recipe: config validates these names, the engine registers them --------------
OPTIMIZERS: Registry[Callable[..., Any]] = Registry("optimizer", builtins=("pat.engine.optim",))
SCHEDULES: Registry[Callable[..., Any]] = Registry("schedule", builtins=("pat.engine.schedules",), sort=True)
STEPS: Registry[Callable[..., Any]] = Registry(
    "step rule", builtins=("pat.engine.steps", "pat.engine.sam"), sort=True)
