"""The device manager: slot/IRQ allocation, the registry, the command line, owned parts."""

from __future__ import annotations

import pytest

from pymvm import layout
from pymvm.devices.bus import Bus
from pymvm.devices.manager import (
    DeviceManager,
    DeviceManagerError,
    DeviceNotFoundError,
    SlotAllocator,
)
from pymvm.devices.virtio import constants as c
from pymvm.kvm import FastReadTable

from .test_virtio_mmio import FakeDevice, FakeDriver


class FakeVm:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def register_ioeventfd(self, fd, addr, length, datamatch=None) -> None:
        self.calls.append("ioeventfd")

    def unregister_ioeventfd(self, fd, addr, length, datamatch=None) -> None:
        self.calls.append("-ioeventfd")

    def register_irqfd(self, fd, gsi) -> None:
        self.calls.append("irqfd")

    def unregister_irqfd(self, fd, gsi) -> None:
        self.calls.append("-irqfd")


class FakeMemory:
    regions = ()


class FakeMachine:
    """What DeviceManager needs of a Machine, with the real bus and fast-read table."""

    def __init__(self) -> None:
        self.vm = FakeVm()
        self.memory = FakeMemory()
        self.mmio_bus = Bus("mmio")
        self.fast_reads = FastReadTable()
        self.interrupts: list[int] = []

    def irq_eventfd(self, gsi: int):
        return lambda: self.interrupts.append(gsi)

    def add_fast_read(self, addr: int, value: int = 0):
        return self.fast_reads.add(addr, value)


def test_slots_are_consecutive_pages_with_consecutive_irqs():
    alloc = SlotAllocator()
    slots = [alloc.allocate(f"dev{i}") for i in range(3)]

    assert [s.index for s in slots] == [0, 1, 2]
    assert [s.base for s in slots] == [layout.VIRTIO_MMIO_START + i * layout.VIRTIO_MMIO_SIZE
                                       for i in range(3)]
    assert [s.irq for s in slots] == [layout.VIRTIO_IRQ_BASE + i for i in range(3)]
    assert all(s.size == layout.VIRTIO_MMIO_SIZE for s in slots)


def test_running_out_of_irqs_is_a_clear_error_naming_the_device_and_the_fix():
    alloc = SlotAllocator()
    count = layout.VIRTIO_IRQ_MAX - layout.VIRTIO_IRQ_BASE + 1
    for i in range(count):
        alloc.allocate(f"dev{i}")

    with pytest.raises(DeviceManagerError, match=r"net device 'eth9'.*IRQs.*remove a device"):
        alloc.allocate("net device 'eth9'")


def test_running_out_of_mmio_window_is_an_error_before_the_irqs_run_out():
    alloc = SlotAllocator(first_base=0x1000, slot_size=0x1000, window_end=0x3000)
    alloc.allocate("a")
    alloc.allocate("b")

    with pytest.raises(DeviceManagerError, match="window holds only 2 devices"):
        alloc.allocate("c")


def test_manager_keeps_devices_by_id_in_slot_order_and_refuses_a_duplicate_id():
    mgr = DeviceManager(FakeMachine())
    mgr.reserve("b", "net")
    mgr.reserve("a", "net")

    assert [d.id for d in mgr.mmio_devices()] == ["b", "a"]
    assert mgr.get("a").slot.index == 1
    with pytest.raises(DeviceManagerError, match="used twice"):
        mgr.reserve("a", "net")


def test_unknown_device_id_raises_not_found_listing_the_known_ids():
    mgr = DeviceManager(FakeMachine())
    mgr.reserve("net0", "net")

    with pytest.raises(DeviceNotFoundError, match=r"'nope'.*net0"):
        mgr.get("nope")


def test_manager_exhaustion_error_comes_from_reserve():
    mgr = DeviceManager(FakeMachine(), SlotAllocator(irqs=range(5, 6)))
    mgr.reserve("one", "net")

    with pytest.raises(DeviceManagerError, match="no virtio-mmio slot left"):
        mgr.reserve("two", "net")
    assert [d.id for d in mgr.mmio_devices()] == ["one"]


def test_cmdline_lists_each_device_then_its_extras_in_slot_order():
    mgr = DeviceManager(FakeMachine())
    first = mgr.reserve("n0", "net")
    first.cmdline_extra.append("pymvm.net=eth0,10.0.0.2/24")
    mgr.reserve("n1", "net")

    assert mgr.cmdline_fragments() == [
        f"virtio_mmio.device=4K@{layout.VIRTIO_MMIO_START:#x}:{layout.VIRTIO_IRQ_BASE}",
        "pymvm.net=eth0,10.0.0.2/24",
        f"virtio_mmio.device=4K@{layout.VIRTIO_MMIO_START + 0x1000:#x}:{layout.VIRTIO_IRQ_BASE + 1}",
    ]


def test_attach_transport_places_the_device_on_the_bus_at_its_slot():
    m = FakeMachine()
    mgr = DeviceManager(m)
    record = mgr.reserve("n0", "net")
    transport = mgr.attach_transport(record, FakeDevice())

    found = m.mmio_bus.lookup(record.mmio_base + c.VIRTIO_MMIO_MAGIC_VALUE)
    assert found is not None and found[0] is transport
    assert transport.irq == record.irq


def test_manager_publishes_interrupt_status_to_the_vcpu_fast_read_table():
    # The vCPUs answer InterruptStatus reads from the fast-read table without asking the
    # transport: the manager must wire the transport to keep that entry current.
    m = FakeMachine()
    mgr = DeviceManager(m)
    record = mgr.reserve("n0", "net")
    transport = mgr.attach_transport(record, FakeDevice())
    driver = FakeDriver(transport)
    entry_addr = record.mmio_base + c.VIRTIO_MMIO_INTERRUPT_STATUS

    driver.probe()  # DRIVER_OK: the used-buffer bit is reported from now on
    transport.signal_config_change()  # and the config bit too

    fast = record.fast_read
    assert fast.addr == entry_addr
    expected = driver.r32(c.VIRTIO_MMIO_INTERRUPT_STATUS)
    assert expected == c.VIRTIO_MMIO_INT_VRING | c.VIRTIO_MMIO_INT_CONFIG
    assert fast.value == expected  # what a guest read in C returns
    driver.w32(c.VIRTIO_MMIO_INTERRUPT_ACK, c.VIRTIO_MMIO_INT_CONFIG)
    assert fast.value == c.VIRTIO_MMIO_INT_VRING
    mgr.close()


def test_closing_a_device_closes_backend_then_host_then_plumbing_even_if_one_fails():
    mgr = DeviceManager(FakeMachine())
    record = mgr.reserve("n0", "net")
    order: list[str] = []

    def fail_host() -> None:
        order.append("host")
        raise OSError("TAP already gone")

    record.plumbing.stack.callback(order.append, "plumbing")
    record.host.stack.callback(fail_host)
    record.backend.stack.callback(order.append, "backend")

    mgr.close()

    assert order == ["backend", "host", "plumbing"]
    assert len(mgr) == 0


def test_replace_backend_hands_back_the_old_part_unclosed():
    mgr = DeviceManager(FakeMachine())
    record = mgr.reserve("n0", "net")
    closed: list[str] = []
    record.backend.obj = "old"
    record.backend.stack.callback(closed.append, "old")

    old = record.replace_backend("new", lambda: closed.append("new"))

    assert old.obj == "old" and closed == []
    assert record.backend.obj == "new"
    old.close()
    record.close()
    assert closed == ["old", "new"]
