"""virtio-mmio transport behaviour the mutation run of issue 16 found unchecked
(docs/mutation.md): the kernel command-line fragment's size syntax, and ring alignment checked
for each of the three rings on its own."""

from __future__ import annotations

import pytest

from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import VirtioError
from pymvm.devices.virtio.mmio import VirtioMmioTransport, virtio_mmio_cmdline
from tests.unit import test_virtio_mmio as base
from tests.unit.test_virtio_mmio import DRIVER_OK, NEEDS_RESET, FakeDevice, queue_base

# The transport fixtures of test_virtio_mmio.py, shared.
device, driver, eventfds, interrupt, transport = (
    base.device, base.driver, base.eventfds, base.interrupt, base.transport)


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



# ---- feature pages ---------------------------------------------------------------------------


def _features_ok_with(driver, pages: list[tuple[int, int]]) -> bool:
    """Reset, ACK, DRIVER, then the (page, value) writes, then FEATURES_OK; kept?"""
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    driver.add_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    driver.add_status(c.VIRTIO_CONFIG_S_DRIVER)
    for page, value in pages:
        driver.w32(c.VIRTIO_MMIO_DRIVER_FEATURES_SEL, page)
        driver.w32(c.VIRTIO_MMIO_DRIVER_FEATURES, value)
    driver.add_status(c.VIRTIO_CONFIG_S_FEATURES_OK)
    return bool(driver.r32(c.VIRTIO_MMIO_STATUS) & c.VIRTIO_CONFIG_S_FEATURES_OK)


def test_a_feature_page_written_twice_keeps_only_the_last_value(driver, device) -> None:
    version_1_high = (1 << c.VIRTIO_F_VERSION_1) >> 32
    # Bit 33 is not offered: written first, then taken back by rewriting the page.
    assert _features_ok_with(driver, [(1, version_1_high | 2), (1, version_1_high)])
    assert not _features_ok_with(driver, [(1, version_1_high), (1, version_1_high | 2)])


def test_a_nonzero_ack_above_64_bits_is_not_forgotten_by_a_later_zero_page(driver) -> None:
    version_1_high = (1 << c.VIRTIO_F_VERSION_1) >> 32
    assert not _features_ok_with(driver, [(1, version_1_high), (2, 1), (3, 0)])
    assert _features_ok_with(driver, [(1, version_1_high), (2, 0), (3, 0)])


# ---- queue size and readiness ------------------------------------------------------------------


@pytest.mark.parametrize("sizes, expected", [((1,), 1), ((128, 256), 256), ((2,), 2)])
def test_queue_size_takes_any_power_of_two_up_to_the_maximum(driver, device, sizes, expected):
    assert driver.negotiate()
    base = queue_base(0)
    driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, 0)
    for size in sizes:
        driver.w32(c.VIRTIO_MMIO_QUEUE_NUM, size)
    _setup_addresses_and_ready(driver, base)
    driver.add_status(DRIVER_OK)
    (ctx,) = device.activations
    assert [q.size for q in ctx.queues] == [expected]


def _setup_addresses_and_ready(driver, base: int) -> None:
    for low, addr in ((c.VIRTIO_MMIO_QUEUE_DESC_LOW, base),
                      (c.VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000),
                      (c.VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000)):
        driver.w32(low, addr & 0xFFFF_FFFF)
        driver.w32(low + 4, addr >> 32)
    driver.w32(c.VIRTIO_MMIO_QUEUE_READY, 1)


def test_queue_made_ready_then_unready_before_driver_ok_is_not_handed_over(driver, device):
    assert driver.negotiate()
    driver.setup_queue(0, 256, queue_base(0))
    driver.setup_queue(1, 128, queue_base(1))
    driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, 1)
    driver.w32(c.VIRTIO_MMIO_QUEUE_READY, 0)
    assert driver.r32(c.VIRTIO_MMIO_QUEUE_READY) == 0
    driver.add_status(DRIVER_OK)
    (ctx,) = device.activations
    assert [q.index for q in ctx.queues] == [0]


# ---- activation failures -----------------------------------------------------------------------


def test_driver_ok_while_the_device_needs_reset_is_refused(driver, device) -> None:
    assert driver.negotiate()
    driver.setup_queue(0, 256, queue_base(0))
    device.signal_needs_reset()
    driver.add_status(DRIVER_OK)
    assert device.activations == []
    assert not driver.r32(c.VIRTIO_MMIO_STATUS) & DRIVER_OK


@pytest.mark.parametrize("short", ["kick", "call"])
def test_plumbing_that_returns_too_few_eventfds_fails_activation_with_needs_reset(
        driver, device, eventfds, short: str) -> None:
    real = eventfds.activate

    def activate(transport, queues):
        kicks, calls = real(transport, queues)
        return (kicks[:1], calls) if short == "kick" else (kicks, calls[:1])

    eventfds.activate = activate
    driver.probe()
    assert device.activations == []
    assert driver.r32(c.VIRTIO_MMIO_STATUS) & NEEDS_RESET
    assert eventfds.deactivations == 1  # the eventfds it did make are given back


def test_eventfds_of_a_failed_activation_are_given_back_once(driver, device, eventfds) -> None:
    device.fail_activate = True
    driver.probe()
    assert eventfds.deactivations == 1
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)  # the driver resets the device that needs it
    assert eventfds.deactivations == 1


# ---- what a device may declare, and register reads ---------------------------------------------


@pytest.mark.parametrize("sizes, problem", [
    ((), "virtio device type 42 declares no queues"),
    ((0,), "virtio device type 42: queue max size 0 is not a power of 2 in 1..32768 (spec 2.7)"),
    ((3,), "virtio device type 42: queue max size 3 is not a power of 2 in 1..32768 (spec 2.7)"),
    ((256, 0x10000), ("virtio device type 42: queue max size 65536 is not a power of 2 in "
                      "1..32768 (spec 2.7)")),
])
def test_device_with_bad_queue_sizes_is_refused_by_the_transport(interrupt, sizes, problem):
    with pytest.raises(VirtioError) as refused:
        VirtioMmioTransport(FakeDevice(queues=sizes), irq=5, interrupt=interrupt, eventfds=None)
    assert str(refused.value) == problem


@pytest.mark.parametrize("sizes", [(1,), (0x8000,), (2, 4)])
def test_device_with_power_of_two_queue_sizes_up_to_32768_is_accepted(interrupt, sizes):
    t = VirtioMmioTransport(FakeDevice(queues=sizes), irq=5, interrupt=interrupt, eventfds=None)
    data = bytearray(4)
    t.write(c.VIRTIO_MMIO_QUEUE_SEL, (len(sizes) - 1).to_bytes(4, "little"))
    t.read(c.VIRTIO_MMIO_QUEUE_NUM_MAX, data)
    assert int.from_bytes(data, "little") == sizes[-1]


def test_register_read_fills_the_4_byte_mmio_buffer_in_place(transport) -> None:
    buf = bytearray(8)
    window = memoryview(buf)[2:6]  # KVM's run struct: a fixed buffer, not a growable one
    transport.read(c.VIRTIO_MMIO_MAGIC_VALUE, window)
    assert bytes(buf) == b"\x00\x00virt\x00\x00"


@pytest.mark.parametrize("register", [
    c.VIRTIO_MMIO_SHM_LEN_LOW, c.VIRTIO_MMIO_SHM_LEN_HIGH,
    c.VIRTIO_MMIO_SHM_BASE_LOW, c.VIRTIO_MMIO_SHM_BASE_HIGH,
])
def test_shared_memory_registers_read_all_ones_as_no_region_exists(driver, register) -> None:
    assert driver.r32(register) == 0xFFFF_FFFF


def test_queue_ready_reads_back_what_the_driver_wrote(driver) -> None:
    assert driver.negotiate()
    driver.setup_queue(0, 256, queue_base(0))
    assert driver.r32(c.VIRTIO_MMIO_QUEUE_READY) == 1
    driver.w32(c.VIRTIO_MMIO_QUEUE_READY, 0)
    assert driver.r32(c.VIRTIO_MMIO_QUEUE_READY) == 0


def test_reset_puts_the_queue_and_feature_page_selectors_back_to_zero(driver, device) -> None:
    assert driver.negotiate()
    driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, 1)
    driver.w32(c.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
    driver.w32(c.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    assert driver.r32(c.VIRTIO_MMIO_QUEUE_NUM_MAX) == 256  # queue 0's, not queue 1's 128
    assert driver.r32(c.VIRTIO_MMIO_DEVICE_FEATURES) == device.features & 0xFFFF_FFFF
    driver.add_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    driver.add_status(c.VIRTIO_CONFIG_S_DRIVER)
    driver.w32(c.VIRTIO_MMIO_DRIVER_FEATURES, 1)  # lands in page 0: bit 0 is not offered
    driver.w32(c.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
    driver.w32(c.VIRTIO_MMIO_DRIVER_FEATURES, (1 << c.VIRTIO_F_VERSION_1) >> 32)
    driver.add_status(c.VIRTIO_CONFIG_S_FEATURES_OK)
    assert not driver.r32(c.VIRTIO_MMIO_STATUS) & c.VIRTIO_CONFIG_S_FEATURES_OK


@pytest.mark.parametrize("when", ["before-driver-ok", "after-reset"])
def test_queue_notify_without_live_rings_is_ignored(driver, device, when: str) -> None:
    if when == "after-reset":
        driver.probe()
        driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    driver.w32(c.VIRTIO_MMIO_QUEUE_NOTIFY, 0)
    assert driver.r32(c.VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976  # still answering


def test_ring_address_halves_may_be_written_high_first(driver, device) -> None:
    assert driver.negotiate()
    base = queue_base(0)  # above 4 GiB: both halves matter
    driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, 0)
    for low, addr in ((c.VIRTIO_MMIO_QUEUE_DESC_LOW, base), (c.VIRTIO_MMIO_QUEUE_AVAIL_LOW,
                      base + 0x1000), (c.VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000)):
        driver.w32(low + 4, addr >> 32)
        driver.w32(low, addr & 0xFFFF_FFFF)
    driver.w32(c.VIRTIO_MMIO_QUEUE_READY, 1)
    driver.add_status(DRIVER_OK)
    (ctx,) = device.activations
    (q,) = ctx.queues
    assert (q.desc_addr, q.driver_addr, q.device_addr) == (base, base + 0x1000, base + 0x2000)


def test_status_skipping_features_ok_is_ignored(driver, device) -> None:
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    driver.add_status(c.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    driver.w32(c.VIRTIO_MMIO_STATUS, c.VIRTIO_CONFIG_S_ACKNOWLEDGE | c.VIRTIO_CONFIG_S_DRIVER
               | DRIVER_OK)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == c.VIRTIO_CONFIG_S_ACKNOWLEDGE
    assert device.activations == []


def test_feature_bits_a_device_declares_above_64_are_never_offered(interrupt) -> None:
    declared = (1 << c.VIRTIO_F_VERSION_1) | 1 << 64 | 1 << 65
    t = VirtioMmioTransport(FakeDevice(features=declared), irq=5, interrupt=interrupt,
                            eventfds=None)
    assert t.offered_features() == 1 << c.VIRTIO_F_VERSION_1
