"""One source of truth: the device registry feeds both the command line and the DSDT."""

from __future__ import annotations

from pymvm import layout
from pymvm.boot import acpi
from pymvm.devices.manager import DeviceManager


def registry_with_two_nets() -> DeviceManager:
    mgr = DeviceManager(machine=None)  # reserve() only allocates slots
    first = mgr.reserve("n0", "net")
    first.cmdline_extra.append("pymvm.net=eth0,10.0.0.2/24")
    mgr.reserve("n1", "net")
    return mgr


def test_without_discovery_the_cmdline_keeps_only_the_device_extras():
    mgr = registry_with_two_nets()
    assert mgr.cmdline_fragments(discovery=False) == ["pymvm.net=eth0,10.0.0.2/24"]
    assert sum(f.startswith("virtio_mmio.device=") for f in mgr.cmdline_fragments()) == 2


def test_dsdt_from_the_registry_has_each_slot_window_and_irq_in_slot_order():
    mgr = registry_with_two_nets()
    dsdt = acpi.build_dsdt(mgr.mmio_devices())
    for slot, dev in enumerate(mgr.mmio_devices()):
        assert dev.mmio_base == layout.VIRTIO_MMIO_START + slot * layout.VIRTIO_MMIO_SIZE
        assert dev.irq == layout.VIRTIO_IRQ_BASE + slot
        assert acpi.memory32_fixed(dev.mmio_base, dev.mmio_size) + acpi.extended_interrupt(dev.irq) in dsdt
    assert dsdt.count(b"LNRO0005") == 2
    assert dsdt.index(b"V000") < dsdt.index(b"V001")
