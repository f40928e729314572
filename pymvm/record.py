"""Small value classes that cost nothing to define: ``__slots__`` name the fields.

``@dataclass`` writes each class's methods as source text and compiles them when the class
is defined: six ``exec`` calls for a frozen one, about 0.4 ms of CPU each class, 10 ms for the
23 on `pymvm run`'s path before its first KVM_RUN (issue 15). The records on that path that
need no more than a constructor, ``repr``, equality, hashing and ``replace`` subclass these
instead: their methods are shared, and an explicit ``__init__`` is compiled with the module.

A subclass lists its fields in ``__slots__``, in order, and sets them in ``__init__``
(a ``FrozenRecord`` with ``self._init(every field's value, in order)``); ``_repr_hidden`` names fields left out of
``repr`` (``field(repr=False)``). ``repr``, ``==`` and ``replace`` behave as a dataclass's:
``Name(a=1, b=2)``, equal when of the same class with equal fields, a copy with some fields
changed.
"""

from __future__ import annotations

from typing import Any, TypeVar

_R = TypeVar("_R", bound="Record")


class Record:
    """A mutable record (``@dataclass``): repr and equality over its ``__slots__``."""

    __slots__: tuple[str, ...] = ()
    _repr_hidden: frozenset[str] = frozenset()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__
                          if name not in self._repr_hidden)
        return f"{type(self).__qualname__}({shown})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()  # type: ignore[attr-defined]
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable and compared by value: unhashable

    def replace(self: _R, **changes: Any) -> _R:
        """A copy with ``changes`` (``dataclasses.replace``); unknown names raise TypeError."""
        unknown = changes.keys() - set(self.__slots__)
        if unknown:
            raise TypeError(f"{type(self).__qualname__} has no field {sorted(unknown)[0]!r}")
        values = {name: getattr(self, name) for name in self.__slots__}
        values.update(changes)
        return type(self)(**values)


class FrozenRecord(Record):
    """An immutable record (``@dataclass(frozen=True)``): hashable, no assignment."""

    __slots__ = ()

    def _init(self, *values: Any) -> None:
        """Set every field, in ``__slots__`` order (for ``__init__``)."""
        for name, value in zip(self.__slots__, values, strict=True):
            object.__setattr__(self, name, value)

    def __hash__(self) -> int:
        return hash(self._values())

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a frozen {type(self).__qualname__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a frozen {type(self).__qualname__}")

    def __reduce__(self) -> tuple[Any, ...]:
        # copy, deepcopy and pickle call __init__ with the fields (their default, setattr on
        # each slot, is refused); a frozen dataclass's copies bypass its __setattr__ too.
        return type(self), self._values()
