import threading

import pytest

from pymvm.devices.bus import Bus, BusError


class Recorder:
    def __init__(self, fill: int = 0xAB) -> None:
        self.fill = fill
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, data: bytearray) -> None:
        self.reads.append((offset, len(data)))
        data[:] = bytes([self.fill]) * len(data)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


@pytest.fixture
def bus() -> Bus:
    return Bus("mmio")


def test_lookup_finds_device_and_range(bus: Bus) -> None:
    dev = Recorder()
    rng = bus.insert(dev, 0x1000, 0x100, "a")
    found = bus.lookup(0x1010)
    assert found == (dev, rng)
    assert rng.end == 0x1100


def test_range_edges_are_half_open(bus: Bus) -> None:
    bus.insert(Recorder(), 0x1000, 0x100, "a")
    assert bus.lookup(0x1000) is not None
    assert bus.lookup(0x10FF) is not None
    assert bus.lookup(0x1100) is None
    assert bus.lookup(0x0FFF) is None


def test_empty_bus_and_address_zero_find_nothing(bus: Bus) -> None:
    assert bus.lookup(0) is None
    bus.insert(Recorder(), 0x10, 1, "a")
    assert bus.lookup(0) is None


def test_read_and_write_pass_offsets_relative_to_base(bus: Bus) -> None:
    dev = Recorder(fill=0x5A)
    bus.insert(dev, 0x3F8, 8, "com1")
    data = bytearray(2)
    assert bus.read(0x3FD, data)
    assert data == b"\x5a\x5a"
    assert bus.write(0x3F8, b"x")
    assert dev.reads == [(5, 2)]
    assert dev.writes == [(0, b"x")]


def test_unmapped_access_returns_false_and_leaves_data(bus: Bus) -> None:
    data = bytearray(b"\x11")
    assert not bus.read(0x80, data)
    assert data == b"\x11"
    assert not bus.write(0x80, b"\x00")


def test_adjacent_ranges_do_not_overlap(bus: Bus) -> None:
    a, b = Recorder(1), Recorder(2)
    bus.insert(a, 0x1000, 0x1000, "a")
    bus.insert(b, 0x2000, 0x1000, "b")
    assert bus.lookup(0x1FFF)[0] is a
    assert bus.lookup(0x2000)[0] is b


@pytest.mark.parametrize(
    ("base", "length"),
    [
        (0x1000, 0x100),  # identical
        (0x0F00, 0x101),  # overlaps the start
        (0x10FF, 0x10),  # overlaps the end
        (0x1010, 0x10),  # inside
        (0x0F00, 0x1000),  # covers
    ],
)
def test_overlapping_insert_is_rejected_with_both_names(bus: Bus, base: int, length: int) -> None:
    bus.insert(Recorder(), 0x1000, 0x100, "existing")
    with pytest.raises(BusError, match="new.*overlaps existing"):
        bus.insert(Recorder(), base, length, "new")
    assert [r.name for r in bus.ranges()] == ["existing"]


def test_empty_range_is_rejected(bus: Bus) -> None:
    with pytest.raises(BusError, match="empty range"):
        bus.insert(Recorder(), 0x1000, 0, "zero")


def test_ranges_stay_sorted_whatever_the_insert_order(bus: Bus) -> None:
    for base in (0x3000, 0x1000, 0x2000):
        bus.insert(Recorder(), base, 0x10, f"d{base:x}")
    assert [r.base for r in bus.ranges()] == [0x1000, 0x2000, 0x3000]


def test_remove_unmaps_and_frees_the_range(bus: Bus) -> None:
    bus.insert(Recorder(), 0x1000, 0x100, "a")
    bus.remove(0x1000)
    assert bus.lookup(0x1000) is None
    bus.insert(Recorder(), 0x1000, 0x100, "again")  # no overlap with the removed one


def test_remove_of_unknown_base_raises(bus: Bus) -> None:
    bus.insert(Recorder(), 0x1000, 0x100, "a")
    with pytest.raises(BusError, match="nothing registered at 0x1010"):
        bus.remove(0x1010)


def test_concurrent_inserts_keep_ranges_consistent(bus: Bus) -> None:
    def insert_many(start: int) -> None:
        for i in range(200):
            bus.insert(Recorder(), start + i * 0x20, 0x10, f"d{start}-{i}")

    threads = [threading.Thread(target=insert_many, args=(n * 0x10,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    bases = [r.base for r in bus.ranges()]
    assert bases == sorted(bases) and len(bases) == 400


def test_errors_name_the_bus_they_come_from() -> None:
    pio = Bus("pio")
    assert pio.name == "pio"
    with pytest.raises(BusError, match=r"^pio bus: nothing registered at 0x60$"):
        pio.remove(0x60)
    with pytest.raises(BusError, match=r"^pio bus: kbd has an empty range at 0x60$"):
        pio.insert(Recorder(), 0x60, 0, "kbd")
