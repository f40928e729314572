"""MMIO and port-I/O dispatch.

A bus is a sorted list of non-overlapping ranges; lookups bisect on the range start.
Devices see offsets relative to the start of their range, never absolute addresses.
"""

from __future__ import annotations

import bisect
import threading
from typing import Protocol

from ..record import FrozenRecord, Record


class BusError(Exception):
    """A device range could not be placed on a bus."""


class BusDevice(Protocol):
    def read(self, offset: int, data: bytearray) -> None:
        """Fill ``data`` (len 1, 2, 4 or 8) with the value at ``offset``."""

    def write(self, offset: int, data: bytes) -> None:
        """Handle a guest write of ``data`` at ``offset``."""


class BusRange(FrozenRecord):
    """A device's address range on a bus."""

    __slots__ = ("base", "length", "name")
    base: int
    length: int
    name: str

    def __init__(self, base: int, length: int, name: str) -> None:
        self._init(base, length, name)

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus(Record):
    """One address space (MMIO or PIO) of a VM."""

    __slots__ = ("name", "_starts", "_ranges", "_devices", "_lock")
    _repr_hidden = frozenset({"_lock"})
    name: str
    _starts: list[int]
    _ranges: list[BusRange]
    _devices: list[BusDevice]
    _lock: threading.Lock

    def __init__(self, name: str) -> None:
        self.name = name
        self._starts = []
        self._ranges = []
        self._devices = []
        self._lock = threading.Lock()

    def insert(self, device: BusDevice, base: int, length: int, name: str) -> BusRange:
        if length <= 0:
            raise BusError(f"{self.name} bus: {name} has an empty range at {base:#x}")
        new = BusRange(base, length, name)
        with self._lock:
            i = bisect.bisect_right(self._starts, base)
            if i > 0 and self._ranges[i - 1].end > base:
                old = self._ranges[i - 1]
                raise BusError(
                    f"{self.name} bus: {name} [{base:#x}, {new.end:#x}) overlaps "
                    f"{old.name} [{old.base:#x}, {old.end:#x})"
                )
            if i < len(self._ranges) and self._ranges[i].base < new.end:
                old = self._ranges[i]
                raise BusError(
                    f"{self.name} bus: {name} [{base:#x}, {new.end:#x}) overlaps "
                    f"{old.name} [{old.base:#x}, {old.end:#x})"
                )
            self._starts.insert(i, base)
            self._ranges.insert(i, new)
            self._devices.insert(i, device)
        return new

    def remove(self, base: int) -> None:
        with self._lock:
            i = bisect.bisect_left(self._starts, base)
            if i == len(self._starts) or self._starts[i] != base:
                raise BusError(f"{self.name} bus: nothing registered at {base:#x}")
            del self._starts[i], self._ranges[i], self._devices[i]

    def lookup(self, addr: int) -> tuple[BusDevice, BusRange] | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i < 0:
            return None
        rng = self._ranges[i]
        if addr >= rng.end:
            return None
        return self._devices[i], rng

    def read(self, addr: int, data: bytearray) -> bool:
        """Dispatch a read; returns False (data untouched) when nothing is mapped."""
        found = self.lookup(addr)
        if found is None:
            return False
        device, rng = found
        device.read(addr - rng.base, data)
        return True

    def write(self, addr: int, data: bytes) -> bool:
        found = self.lookup(addr)
        if found is None:
            return False
        device, rng = found
        device.write(addr - rng.base, data)
        return True

    def ranges(self) -> list[BusRange]:
        return list(self._ranges)
