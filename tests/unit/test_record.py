"""pymvm.record: the records that replace start-up dataclasses behave as those dataclasses did."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest

from pymvm.record import FrozenRecord, Record


class Point(FrozenRecord):
    """A frozen record."""

    __slots__ = ("x", "y")

    def __init__(self, x: int, y: int = 0) -> None:
        self._init(x, y)


class OtherPoint(FrozenRecord):
    """Same fields, another class."""

    __slots__ = ("x", "y")

    def __init__(self, x: int, y: int = 0) -> None:
        self._init(x, y)


@dataclasses.dataclass(frozen=True)
class DcPoint:
    """The dataclass Point stands for."""

    x: int
    y: int = 0


class Box(Record):
    """A mutable record with a field left out of repr."""

    __slots__ = ("name", "items", "_lock")
    _repr_hidden = frozenset({"_lock"})

    def __init__(self, name: str, items: list[int] | None = None) -> None:
        self.name = name
        self.items = [] if items is None else items
        self._lock = object()


@dataclasses.dataclass
class DcBox:
    """The dataclass Box stands for (its _lock: field(repr=False))."""

    name: str
    items: list[int] = dataclasses.field(default_factory=list)


def test_frozen_record_repr_is_the_dataclass_repr_with_the_class_name() -> None:
    assert repr(Point(1, 2)) == repr(DcPoint(1, 2)).replace("DcPoint", "Point") == "Point(x=1, y=2)"
    assert repr(Point(x="a")) == "Point(x='a', y=0)"


def test_mutable_record_repr_leaves_out_hidden_fields() -> None:
    assert repr(Box("b", [1])) == repr(DcBox("b", [1])).replace("DcBox", "Box") == "Box(name='b', items=[1])"


def test_records_are_equal_by_class_and_fields() -> None:
    assert Point(1, 2) == Point(1, 2)
    assert Point(1, 2) != Point(1, 3)
    assert Point(1, 2) != OtherPoint(1, 2)  # dataclasses compare the class too
    assert Point(1, 2) != (1, 2)
    assert Box("b") != Box("c")


def test_frozen_record_hashes_by_its_fields_and_a_mutable_one_is_unhashable() -> None:
    assert hash(Point(1, 2)) == hash(Point(1, 2))
    assert len({Point(1, 2), Point(1, 2), Point(2, 1)}) == 2
    with pytest.raises(TypeError):
        hash(Box("b"))
    with pytest.raises(TypeError):
        hash(DcBox("b"))


def test_frozen_record_refuses_assignment_and_deletion_like_a_frozen_dataclass() -> None:
    p = Point(1, 2)
    with pytest.raises(AttributeError, match="cannot assign to field 'x'"):
        p.x = 5  # type: ignore[misc]
    with pytest.raises(AttributeError, match="cannot delete field 'y'"):
        del p.y
    with pytest.raises(AttributeError):
        p.z = 1  # type: ignore[attr-defined]
    assert (p.x, p.y) == (1, 2)


def test_mutable_record_takes_assignment_to_its_fields_only() -> None:
    b = Box("b")
    b.name = "c"
    assert b.name == "c"
    with pytest.raises(AttributeError):
        b.other = 1  # type: ignore[attr-defined]


def test_replace_copies_with_changes_and_rejects_unknown_fields() -> None:
    p = Point(1, 2)
    assert p.replace(y=7) == Point(1, 7)
    assert p == Point(1, 2)
    with pytest.raises(TypeError, match="no field 'z'"):
        p.replace(z=1)


def test_frozen_record_init_needs_every_field() -> None:
    class Broken(FrozenRecord):
        __slots__ = ("a", "b")

        def __init__(self, a: int) -> None:
            self._init(a)

    with pytest.raises(ValueError):
        Broken(1)


def test_records_copy_deepcopy_and_pickle_as_dataclasses_do() -> None:
    p = Point(1, [2])  # type: ignore[arg-type]
    for dup in (copy.copy(p), copy.deepcopy(p), pickle.loads(pickle.dumps(p))):
        assert dup == p and type(dup) is Point
    assert copy.copy(p).y is p.y and copy.deepcopy(p).y is not p.y
    b = Box("b", [1])
    assert copy.copy(b) == b and copy.copy(b) is not b
    deep = copy.deepcopy(b)  # its _lock is copied too: compared, as a dataclass field would be
    assert (deep.name, deep.items) == (b.name, b.items) and deep.items is not b.items
