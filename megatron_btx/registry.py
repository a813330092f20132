"""The registries' common part: entries by name, registered by a class decorator, plugins loaded
on the first lookup (:mod:`megatron_btx.plugins`). Router types, router initialisations,
baselines and HF families each keep one :class:`Registry`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from megatron_btx.errors import BTXError

T = TypeVar("T")


class Registry(Generic[T]):
    """Instances of registered classes, by the class attribute `key` (``name``, ``model_type``).
    `what` names an entry in errors ("router type"); `valid` checks a key (default: an
    identifier); `check` says what else a class lacks (None: nothing)."""

    def __init__(
        self,
        what: str,
        key: str = "name",
        valid: Callable[[str], bool] | None = None,
        check: Callable[[type], str | None] | None = None,
    ):
        self.what, self.key = what, key
        self.valid = valid or (lambda name: bool(name) and name.isidentifier())
        self.check = check or (lambda cls: None)
        self._entries: dict[str, T] = {}

    def register(self, cls: type) -> type:
        """Class decorator: make an instance of `cls` the entry named by its `key` attribute."""
        name = getattr(cls, self.key, "")
        if not isinstance(name, str) or not self.valid(name):
            raise ValueError(f"{self.what} {cls.__name__}: {self.key} {name!r} is not usable")
        problem = self.check(cls)
        if problem:
            raise ValueError(f"{self.what} {cls.__name__}: {problem}")
        self._entries[name] = cls()
        return cls

    def names(self) -> tuple[str, ...]:
        from megatron_btx import plugins

        plugins.load()
        return tuple(self._entries)

    def get(self, name: Any) -> T:
        """The entry called `name`; an unknown one is a BTXError listing the known ones."""
        known = self.names()
        if name not in known:
            raise BTXError(f"{self.what} {name!r} is unknown (known: {', '.join(known)})")
        return self._entries[name]

    def values(self) -> list[T]:
        return [self._entries[n] for n in self.names()]
