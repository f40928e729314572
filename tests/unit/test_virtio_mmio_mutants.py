"""virtio-mmio transport behaviour the mutation run of issue 16 found unchecked
(docs/mutation.md): the kernel command-line fragment's size syntax, and ring alignment checked
for each of the three rings on its own."""

from __future__ import annotations

import pytest

from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import VirtioError
from pymvm.devices.virtio.mmio import VirtioMmioTransport, virtio_mmio_cmdline
from tests.unit.test_virtio_mmio import (  # noqa: F401 (fixtures)
    DRIVER_OK,
    FakeDevice,
    NEEDS_RESET,
    device,
    driver,
    eventfds,
    interrupt,
    queue_base,
    transport,
)


@pytest.mark.parametrize("size, text", [
    (1 << 20, "1M"), (3 << 20, "3M"), (2 << 20, "2M"), (0x400, "1K"), (0x3000, "12K"),
    (0xC00, "3K"), (0x1800, "6K"), (0x200, "512"), (0x100400, "1025K"),
])
def test_cmdline_size_uses_the_largest_whole_memparse_unit(size: int, text: str) -> None:
    assert virtio_mmio_cmdline(0xD0000000, 5, size) == f"virtio_mmio.device={text}@0xd0000000:5"


def test_cmdline_fragment_passes_its_size_and_needs_a_base(transport, interrupt) -> None:
    assert transport.cmdline_fragment(size=0x2000) == "virtio_mmio.device=8K@0xd0001000:5"
    baseless = VirtioMmioTransport(FakeDevice(), irq=5, interrupt=interrupt, eventfds=None)
    with pytest.raises(VirtioError) as refused:
        baseless.cmdline_fragment()
    assert str(refused.value) == ("virtio-mmio transport has no MMIO base; pass base= or build "
                                  "it with mmio_base=")


def _setup(driver, desc: int, avail: int, used: int) -> None:
    driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, 0)
    driver.w32(c.VIRTIO_MMIO_QUEUE_NUM, 256)
    for low, addr in ((c.VIRTIO_MMIO_QUEUE_DESC_LOW, desc), (c.VIRTIO_MMIO_QUEUE_AVAIL_LOW, avail),
                      (c.VIRTIO_MMIO_QUEUE_USED_LOW, used)):
        driver.w32(low, addr & 0xFFFF_FFFF)
        driver.w32(low + 4, addr >> 32)
    driver.w32(c.VIRTIO_MMIO_QUEUE_READY, 1)


@pytest.mark.parametrize("ring", ["avail", "used"])
def test_one_misaligned_ring_alone_refuses_activation_with_needs_reset(
        driver, device, ring: str) -> None:
    base = queue_base(0)
    addrs = {"desc": base, "avail": base + 0x1000, "used": base + 0x2000}
    addrs[ring] += 1 if ring == "avail" else 2  # avail needs 2-byte, used 4-byte alignment
    assert driver.negotiate()
    _setup(driver, addrs["desc"], addrs["avail"], addrs["used"])
    driver.add_status(DRIVER_OK)
    assert device.activations == []
    assert driver.r32(c.VIRTIO_MMIO_STATUS) & NEEDS_RESET


def test_rings_at_their_minimum_alignment_are_activated(driver, device) -> None:
    base = queue_base(0)
    assert driver.negotiate()
    _setup(driver, base + 16, base + 0x1000 + 2, base + 0x2000 + 4)
    driver.add_status(DRIVER_OK)
    assert len(device.activations) == 1

