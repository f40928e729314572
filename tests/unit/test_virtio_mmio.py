"""The virtio-mmio transport's register state machine, driven by a fake Linux-like driver."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import pytest

from pymvm.devices.bus import Bus
from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import ActivationContext, QueueConfig, VirtioDevice
from pymvm.devices.virtio.mmio import VirtioMmioTransport, virtio_mmio_cmdline

ACK = c.VIRTIO_CONFIG_S_ACKNOWLEDGE
DRIVER = c.VIRTIO_CONFIG_S_DRIVER
FEATURES_OK = c.VIRTIO_CONFIG_S_FEATURES_OK
DRIVER_OK = c.VIRTIO_CONFIG_S_DRIVER_OK
FAILED = c.VIRTIO_CONFIG_S_FAILED
NEEDS_RESET = c.VIRTIO_CONFIG_S_NEEDS_RESET
VERSION_1 = 1 << c.VIRTIO_F_VERSION_1
EVENT_IDX = 1 << c.VIRTIO_RING_F_EVENT_IDX


# --- fakes ------------------------------------------------------------------------------------


class FakeDevice(VirtioDevice):
    device_type = 42

    def __init__(self, features: int = VERSION_1 | EVENT_IDX, queues: tuple[int, ...] = (256, 128)):
        self.features = features
        self.queue_max_sizes = queues
        self.activations: list[ActivationContext] = []
        self.config_writes: list[tuple[int, bytes]] = []
        self.resets = 0
        self.fail_activate = False
        self.fail_reset = False

    def avail_features(self) -> int:
        return self.features

    def config_bytes(self) -> bytes:
        return bytes(range(1, 9))

    def write_config(self, offset: int, data: bytes) -> None:
        self.config_writes.append((offset, data))

    def activate(self, ctx: ActivationContext) -> None:
        if self.fail_activate:
            raise RuntimeError("back-end refused the rings")
        self.activations.append(ctx)

    def reset(self) -> None:
        if self.fail_reset:
            raise RuntimeError("back-end would not stop")
        self.resets += 1


class FakeEventfds:
    """In-memory stand-in for the VMM's ioeventfd/irqfd plumbing; makes real eventfds."""

    def __init__(self) -> None:
        self.activated: list[list[QueueConfig]] = []
        self.deactivations = 0
        self.open_fds: list[int] = []

    def activate(self, transport: VirtioMmioTransport, queues: Sequence[QueueConfig]):
        self.activated.append(list(queues))
        kicks = [os.eventfd(0, os.EFD_NONBLOCK) for _ in queues]
        calls = [os.eventfd(0, os.EFD_NONBLOCK) for _ in queues]
        self.open_fds = kicks + calls
        return kicks, calls

    def deactivate(self, transport: VirtioMmioTransport) -> None:
        self.deactivations += 1
        for fd in self.open_fds:
            os.close(fd)
        self.open_fds = []


class FakeInterrupt:
    def __init__(self) -> None:
        self.triggers = 0

    def trigger(self) -> None:
        self.triggers += 1


class FakeDriver:
    """Does what Linux's virtio_mmio.c and virtio.c do, through 32-bit register accesses."""

    def __init__(self, transport: VirtioMmioTransport) -> None:
        self.t = transport

    def r32(self, offset: int) -> int:
        data = bytearray(4)
        self.t.read(offset, data)
        return int.from_bytes(data, "little")

    def w32(self, offset: int, value: int) -> None:
        self.t.write(offset, value.to_bytes(4, "little"))

    def add_status(self, bit: int) -> None:
        self.w32(c.VIRTIO_MMIO_STATUS, self.r32(c.VIRTIO_MMIO_STATUS) | bit)

    def device_features(self) -> int:
        self.w32(c.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
        high = self.r32(c.VIRTIO_MMIO_DEVICE_FEATURES)
        self.w32(c.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
        return high << 32 | self.r32(c.VIRTIO_MMIO_DEVICE_FEATURES)

    def write_features(self, features: int) -> None:
        self.w32(c.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
        self.w32(c.VIRTIO_MMIO_DRIVER_FEATURES, features >> 32)
        self.w32(c.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
        self.w32(c.VIRTIO_MMIO_DRIVER_FEATURES, features & 0xFFFF_FFFF)

    def negotiate(self, accept: int | None = None) -> bool:
        """Reset, ACK, DRIVER, features, FEATURES_OK; True if the device kept FEATURES_OK."""
        self.w32(c.VIRTIO_MMIO_STATUS, 0)
        self.add_status(ACK)
        self.add_status(DRIVER)
        offered = self.device_features()
        self.write_features(offered if accept is None else accept)
        self.add_status(FEATURES_OK)
        return bool(self.r32(c.VIRTIO_MMIO_STATUS) & FEATURES_OK)

    def setup_queue(self, index: int, size: int, base: int) -> None:
        self.w32(c.VIRTIO_MMIO_QUEUE_SEL, index)
        assert self.r32(c.VIRTIO_MMIO_QUEUE_READY) == 0
        assert self.r32(c.VIRTIO_MMIO_QUEUE_NUM_MAX) >= size
        self.w32(c.VIRTIO_MMIO_QUEUE_NUM, size)
        for low, addr in (
            (c.VIRTIO_MMIO_QUEUE_DESC_LOW, base),
            (c.VIRTIO_MMIO_QUEUE_AVAIL_LOW, base + 0x1000),
            (c.VIRTIO_MMIO_QUEUE_USED_LOW, base + 0x2000),
        ):
            self.w32(low, addr & 0xFFFF_FFFF)
            self.w32(low + 4, addr >> 32)
        self.w32(c.VIRTIO_MMIO_QUEUE_READY, 1)

    def probe(self, sizes: Sequence[int] = (256, 128)) -> None:
        assert self.negotiate()
        for index, size in enumerate(sizes):
            self.setup_queue(index, size, queue_base(index))
        self.add_status(DRIVER_OK)


def queue_base(index: int) -> int:
    return 0x1_2000_0000 + index * 0x10000


@pytest.fixture
def device() -> FakeDevice:
    return FakeDevice()


@pytest.fixture
def eventfds():
    plumbing = FakeEventfds()
    yield plumbing
    for fd in plumbing.open_fds:
        os.close(fd)


@pytest.fixture
def interrupt() -> FakeInterrupt:
    return FakeInterrupt()


@pytest.fixture
def transport(device, eventfds, interrupt) -> VirtioMmioTransport:
    return VirtioMmioTransport(
        device, irq=5, interrupt=interrupt, eventfds=eventfds, mmio_base=0xD000_1000,
        mem_regions=("ram0",),
    )


@pytest.fixture
def driver(transport) -> FakeDriver:
    return FakeDriver(transport)


# --- identification and probe -----------------------------------------------------------------


def test_identification_registers_read_magic_version_2_device_id_and_pymvm_vendor(driver):
    assert driver.r32(c.VIRTIO_MMIO_MAGIC_VALUE) == 0x74726976
    assert driver.r32(c.VIRTIO_MMIO_VERSION) == 2
    assert driver.r32(c.VIRTIO_MMIO_DEVICE_ID) == 42
    assert driver.r32(c.VIRTIO_MMIO_VENDOR_ID).to_bytes(4, "little") == b"PYMV"


def test_linux_probe_sequence_activates_eventfds_then_device_with_rings_and_features(
    driver, device, eventfds, transport
):
    driver.probe()

    assert driver.r32(c.VIRTIO_MMIO_STATUS) == ACK | DRIVER | FEATURES_OK | DRIVER_OK
    assert transport.activated
    assert [[q.index for q in qs] for qs in eventfds.activated] == [[0, 1]]
    (ctx,) = device.activations
    assert ctx.acked_features == VERSION_1 | EVENT_IDX
    assert ctx.mem_regions == ("ram0",)
    assert ctx.queues == [
        QueueConfig(0, 256, True, queue_base(0), queue_base(0) + 0x1000, queue_base(0) + 0x2000),
        QueueConfig(1, 128, True, queue_base(1), queue_base(1) + 0x1000, queue_base(1) + 0x2000),
    ]
    assert len(ctx.kick_fds) == len(ctx.call_fds) == 2
    assert ctx.kick_fds == eventfds.open_fds[:2]


def test_only_ready_queues_are_handed_to_the_device(driver, device):
    assert driver.negotiate()
    driver.setup_queue(1, 64, queue_base(1))
    driver.add_status(DRIVER_OK)
    assert [(q.index, q.size) for q in device.activations[0].queues] == [(1, 64)]


def test_device_works_without_eventfd_plumbing(device, interrupt):
    t = VirtioMmioTransport(device, irq=5, interrupt=interrupt, eventfds=None)
    FakeDriver(t).probe()
    assert t.activated
    assert device.activations[0].kick_fds == []


def test_version_1_is_offered_even_if_the_device_forgets_it(interrupt, eventfds):
    t = VirtioMmioTransport(FakeDevice(features=EVENT_IDX), irq=5, interrupt=interrupt,
                            eventfds=eventfds)
    assert FakeDriver(t).device_features() == VERSION_1 | EVENT_IDX


def test_device_features_pages_above_64_bits_read_zero(driver):
    driver.w32(c.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 2)
    assert driver.r32(c.VIRTIO_MMIO_DEVICE_FEATURES) == 0


# --- feature negotiation ----------------------------------------------------------------------


def test_features_ok_refused_when_driver_does_not_accept_version_1(driver, device):
    assert driver.negotiate(accept=EVENT_IDX) is False
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == ACK | DRIVER
    driver.add_status(DRIVER_OK)
    assert device.activations == []


def test_features_ok_refused_when_driver_acks_a_bit_not_offered(driver):
    assert driver.negotiate(accept=VERSION_1 | 1 << c.VIRTIO_F_RING_PACKED) is False
    assert not driver.r32(c.VIRTIO_MMIO_STATUS) & FEATURES_OK


def test_features_ok_refused_when_driver_acks_bits_above_64(driver):
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    driver.add_status(ACK)
    driver.add_status(DRIVER)
    driver.write_features(VERSION_1)
    driver.w32(c.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0xFFFF_FFFF)
    driver.w32(c.VIRTIO_MMIO_DRIVER_FEATURES, 1)
    driver.add_status(FEATURES_OK)
    assert not driver.r32(c.VIRTIO_MMIO_STATUS) & FEATURES_OK


def test_driver_may_accept_a_subset_of_offered_features(driver, device):
    assert driver.negotiate(accept=VERSION_1)
    driver.setup_queue(0, 256, queue_base(0))
    driver.add_status(DRIVER_OK)
    assert device.activations[0].acked_features == VERSION_1


def test_driver_features_written_before_driver_bit_are_ignored(driver, transport):
    driver.add_status(ACK)
    driver.write_features(VERSION_1)
    driver.add_status(DRIVER)
    driver.add_status(FEATURES_OK)
    assert not driver.r32(c.VIRTIO_MMIO_STATUS) & FEATURES_OK


def test_driver_features_written_after_features_ok_are_ignored(driver, transport):
    assert driver.negotiate(accept=VERSION_1)
    driver.write_features(VERSION_1 | EVENT_IDX)
    driver.add_status(DRIVER_OK)
    assert transport.acked_features == VERSION_1


# --- queues -----------------------------------------------------------------------------------


def test_out_of_range_queue_sel_reads_num_max_0_and_ignores_writes(driver, transport):
    assert driver.negotiate()
    driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, 2)
    assert driver.r32(c.VIRTIO_MMIO_QUEUE_NUM_MAX) == 0
    assert driver.r32(c.VIRTIO_MMIO_QUEUE_READY) == 0
    driver.w32(c.VIRTIO_MMIO_QUEUE_NUM, 64)
    driver.w32(c.VIRTIO_MMIO_QUEUE_READY, 1)
    driver.w32(c.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000)
    assert driver.r32(c.VIRTIO_MMIO_QUEUE_READY) == 0
    assert all(not q.ready and q.desc_addr == 0 for q in transport.queue_configs())


def test_queue_num_max_reports_each_queues_maximum(driver):
    driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, 0)
    assert driver.r32(c.VIRTIO_MMIO_QUEUE_NUM_MAX) == 256
    driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, 1)
    assert driver.r32(c.VIRTIO_MMIO_QUEUE_NUM_MAX) == 128


@pytest.mark.parametrize("bad_size", [0, 100, 512])
def test_queue_num_not_a_power_of_2_within_max_is_ignored(driver, transport, bad_size):
    assert driver.negotiate()
    driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, 0)
    driver.w32(c.VIRTIO_MMIO_QUEUE_NUM, 64)
    driver.w32(c.VIRTIO_MMIO_QUEUE_NUM, bad_size)
    assert transport.queue_configs()[0].size == 64


def test_queue_registers_written_before_features_ok_are_ignored(driver, transport):
    driver.add_status(ACK)
    driver.add_status(DRIVER)
    driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, 0)
    driver.w32(c.VIRTIO_MMIO_QUEUE_NUM, 64)
    driver.w32(c.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000)
    driver.w32(c.VIRTIO_MMIO_QUEUE_READY, 1)
    assert transport.queue_configs()[0] == QueueConfig(0, 256, False, 0, 0, 0)


def test_queue_registers_written_after_driver_ok_are_ignored(driver, transport, device):
    driver.probe()
    driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, 0)
    driver.w32(c.VIRTIO_MMIO_QUEUE_DESC_LOW, 0xDEAD_0000)
    driver.w32(c.VIRTIO_MMIO_QUEUE_NUM, 16)
    driver.w32(c.VIRTIO_MMIO_QUEUE_READY, 0)
    assert transport.queue_configs()[0] == device.activations[0].queues[0]


def test_misaligned_rings_refuse_activation_with_needs_reset(driver, device):
    assert driver.negotiate()
    driver.setup_queue(0, 256, queue_base(0) + 8)  # descriptors need 16-byte alignment
    driver.add_status(DRIVER_OK)
    assert device.activations == []
    assert driver.r32(c.VIRTIO_MMIO_STATUS) & NEEDS_RESET


def test_queue_notify_write_reaching_the_vmm_is_forwarded_to_the_kick_eventfd(driver, device):
    driver.probe()
    driver.w32(c.VIRTIO_MMIO_QUEUE_NOTIFY, 1)
    kick = device.activations[0].kick_fds[1]
    assert os.eventfd_read(kick) == 1
    with pytest.raises(BlockingIOError):
        os.eventfd_read(device.activations[0].kick_fds[0])


# --- status state machine ---------------------------------------------------------------------


def test_driver_ok_before_features_ok_is_ignored(driver, device, eventfds):
    driver.add_status(ACK)
    driver.add_status(DRIVER)
    driver.add_status(DRIVER_OK)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == ACK | DRIVER
    assert device.activations == [] and eventfds.activated == []


def test_status_write_skipping_acknowledge_is_ignored(driver):
    driver.w32(c.VIRTIO_MMIO_STATUS, DRIVER)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == 0
    driver.w32(c.VIRTIO_MMIO_STATUS, ACK | DRIVER)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == 0


def test_status_write_clearing_a_bit_is_ignored(driver):
    driver.add_status(ACK)
    driver.add_status(DRIVER)
    driver.w32(c.VIRTIO_MMIO_STATUS, ACK)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == ACK | DRIVER


def test_failed_status_blocks_progress_until_reset(driver):
    driver.add_status(ACK)
    driver.add_status(FAILED)
    driver.add_status(DRIVER)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == ACK | FAILED
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == 0


def test_after_failed_status_writes_without_failed_are_ignored_and_driver_ok_is_unreachable(
    driver, device, eventfds
):
    # A driver that set FAILED and then carries on without writing FAILED back (not what
    # add_status does) must not make progress: only a reset (0) clears FAILED.
    driver.add_status(ACK)
    driver.add_status(FAILED)
    for value in (ACK | DRIVER, ACK | DRIVER | FEATURES_OK,
                  ACK | DRIVER | FEATURES_OK | DRIVER_OK):
        driver.w32(c.VIRTIO_MMIO_STATUS, value)
        assert driver.r32(c.VIRTIO_MMIO_STATUS) == ACK | FAILED
    assert device.activations == [] and eventfds.activated == []


def test_failed_set_after_features_ok_keeps_the_device_from_activating(driver, device):
    assert driver.negotiate()
    driver.setup_queue(0, 256, queue_base(0))
    driver.add_status(FAILED)
    driver.w32(c.VIRTIO_MMIO_STATUS, ACK | DRIVER | FEATURES_OK | DRIVER_OK)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == ACK | DRIVER | FEATURES_OK | FAILED
    assert device.activations == []


def test_config_space_write_reaches_the_device_once_the_driver_is_there(driver, device):
    driver.add_status(ACK)
    driver.t.write(c.VIRTIO_MMIO_CONFIG + 2, b"\x01\x02")
    assert device.config_writes == []  # no DRIVER yet: ignored
    driver.add_status(DRIVER)
    driver.t.write(c.VIRTIO_MMIO_CONFIG + 2, b"\x01\x02")
    assert device.config_writes == [(2, b"\x01\x02")]


def test_config_space_write_after_failed_is_ignored(driver, device):
    driver.add_status(ACK)
    driver.add_status(DRIVER)
    driver.add_status(FAILED)
    driver.t.write(c.VIRTIO_MMIO_CONFIG, b"\xaa")
    assert device.config_writes == []


def test_config_space_write_while_the_device_needs_reset_is_ignored(driver, device):
    driver.probe()
    device.signal_needs_reset()
    driver.t.write(c.VIRTIO_MMIO_CONFIG, b"\xaa")
    assert device.config_writes == []
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)  # the reset clears NEEDS_RESET: writes work again
    driver.add_status(ACK)
    driver.add_status(DRIVER)
    driver.t.write(c.VIRTIO_MMIO_CONFIG, b"\xbb")
    assert device.config_writes == [(0, b"\xbb")]


def test_reset_after_driver_ok_resets_device_and_eventfds_and_renegotiation_reactivates(
    driver, device, eventfds, transport
):
    driver.probe()
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)

    assert device.resets == 1 and eventfds.deactivations == 1
    assert eventfds.open_fds == []
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == 0
    assert not transport.activated and transport.acked_features == 0
    assert driver.r32(c.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    assert all(q == QueueConfig(q.index, [256, 128][q.index], False, 0, 0, 0)
               for q in transport.queue_configs())
    # Linux clears QueueReady after the reset while deleting its vqs: harmless.
    driver.w32(c.VIRTIO_MMIO_QUEUE_READY, 0)

    driver.probe(sizes=(64, 32))
    assert len(device.activations) == 2 and len(eventfds.activated) == 2
    assert [q.size for q in device.activations[1].queues] == [64, 32]
    assert transport.activated


def test_reset_before_activation_does_not_call_device_reset(driver, device, eventfds):
    assert driver.negotiate()
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    assert device.resets == 0 and eventfds.deactivations == 0


def test_failed_device_reset_leaves_status_failed_until_a_later_reset_succeeds(
    driver, device, eventfds
):
    driver.probe()
    device.fail_reset = True
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == FAILED
    assert eventfds.deactivations == 0
    driver.add_status(ACK)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == FAILED

    device.fail_reset = False
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == 0
    assert device.resets == 1 and eventfds.deactivations == 1


# --- access width and unknown registers -------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 8])
def test_non_32_bit_register_reads_return_zero(transport, length):
    data = bytearray(b"\xff" * length)
    transport.read(c.VIRTIO_MMIO_MAGIC_VALUE, data)
    assert data == bytes(length)


@pytest.mark.parametrize("length", [1, 2, 8])
def test_non_32_bit_register_writes_are_ignored(driver, transport, length):
    transport.write(c.VIRTIO_MMIO_STATUS, ACK.to_bytes(length, "little"))
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == 0


def test_unaligned_32_bit_register_read_returns_zero(transport):
    data = bytearray(b"\xff" * 4)
    transport.read(c.VIRTIO_MMIO_MAGIC_VALUE + 2, data)
    assert data == bytes(4)


@pytest.mark.parametrize("offset", [0x028, 0x040, 0x0F0])  # legacy GuestPageSize, QueuePFN
def test_unknown_register_reads_zero_and_writes_do_nothing(driver, offset):
    driver.w32(offset, 0x1234)
    assert driver.r32(offset) == 0
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == 0


def test_shared_memory_region_length_reads_minus_one(driver):
    driver.w32(c.VIRTIO_MMIO_SHM_SEL, 0)
    assert driver.r32(c.VIRTIO_MMIO_SHM_LEN_LOW) == 0xFFFF_FFFF
    assert driver.r32(c.VIRTIO_MMIO_SHM_LEN_HIGH) == 0xFFFF_FFFF


def test_config_space_reads_any_width_from_the_device(transport):
    data = bytearray(2)
    transport.read(c.VIRTIO_MMIO_CONFIG + 3, data)
    assert data == bytes([4, 5])
    data = bytearray(4)
    transport.read(c.VIRTIO_MMIO_CONFIG + 6, data)
    assert data == bytes([7, 8, 0, 0])


def test_transport_answers_at_its_bus_address(transport):
    bus = Bus("mmio")
    bus.insert(transport, 0xD000_1000, c.VIRTIO_MMIO_PAGE_SIZE, "virtio-mmio@0xd0001000")
    data = bytearray(4)
    assert bus.read(0xD000_1000 + c.VIRTIO_MMIO_VERSION, data)
    assert int.from_bytes(data, "little") == 2


# --- interrupts, needs-reset, config generation -----------------------------------------------


def test_interrupt_status_reports_used_buffer_only_while_activated(driver):
    assert driver.r32(c.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    driver.probe()
    assert driver.r32(c.VIRTIO_MMIO_INTERRUPT_STATUS) == c.VIRTIO_MMIO_INT_VRING
    # Acking cannot clear it: the next irqfd interrupt must still make Linux walk the vrings.
    driver.w32(c.VIRTIO_MMIO_INTERRUPT_ACK, c.VIRTIO_MMIO_INT_VRING)
    assert driver.r32(c.VIRTIO_MMIO_INTERRUPT_STATUS) == c.VIRTIO_MMIO_INT_VRING


class PublishedStatus:
    """What the VMM's fast path would answer for InterruptStatus (its last published value)."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def __call__(self, value: int) -> None:
        self.values.append(value)

    @property
    def now(self) -> int:
        return self.values[-1]


def test_published_interrupt_status_always_matches_the_register(driver, device, transport):
    published = PublishedStatus()
    transport.serve_interrupt_status_from(published)

    def check() -> None:
        assert published.now == driver.r32(c.VIRTIO_MMIO_INTERRUPT_STATUS)

    check()
    driver.probe()
    check()
    assert published.now == c.VIRTIO_MMIO_INT_VRING
    device.signal_config_change()
    check()
    assert published.now == c.VIRTIO_MMIO_INT_VRING | c.VIRTIO_MMIO_INT_CONFIG
    driver.w32(c.VIRTIO_MMIO_INTERRUPT_ACK, c.VIRTIO_MMIO_INT_CONFIG)
    check()
    device.signal_needs_reset()
    check()
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    check()
    assert published.now == 0
    device.fail_activate = True
    driver.probe()
    check()
    assert published.now == c.VIRTIO_MMIO_INT_CONFIG


def test_published_status_leads_the_interrupts_and_the_back_end_start(device, eventfds):
    published = PublishedStatus()
    seen_at: dict[str, int] = {}

    class Interrupt:
        def trigger(self) -> None:
            seen_at["interrupt"] = published.now

    original_activate = device.activate

    def activate(ctx: ActivationContext) -> None:
        # The back-end may interrupt at once; a fast-path read must already see bit 0.
        seen_at["activate"] = published.now
        original_activate(ctx)

    device.activate = activate
    t = VirtioMmioTransport(device, irq=5, interrupt=Interrupt(), eventfds=eventfds)
    t.serve_interrupt_status_from(published)
    driver = FakeDriver(t)
    driver.probe()
    assert seen_at["activate"] == c.VIRTIO_MMIO_INT_VRING
    device.signal_config_change()
    assert seen_at["interrupt"] == c.VIRTIO_MMIO_INT_VRING | c.VIRTIO_MMIO_INT_CONFIG


def test_device_activation_failure_sets_needs_reset_and_raises_config_interrupt(
    driver, device, eventfds, interrupt, transport
):
    device.fail_activate = True
    driver.probe()  # must not raise into the vCPU thread

    assert not transport.activated
    assert driver.r32(c.VIRTIO_MMIO_STATUS) & NEEDS_RESET
    assert driver.r32(c.VIRTIO_MMIO_INTERRUPT_STATUS) == c.VIRTIO_MMIO_INT_CONFIG
    assert interrupt.triggers == 1
    assert eventfds.deactivations == 1 and eventfds.open_fds == []

    device.fail_activate = False
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    assert device.resets == 0  # never activated, nothing to stop
    driver.probe()
    assert transport.activated
    assert not driver.r32(c.VIRTIO_MMIO_STATUS) & NEEDS_RESET


def test_eventfd_plumbing_failure_sets_needs_reset_without_activating_device(
    device, interrupt
):
    class BrokenEventfds(FakeEventfds):
        def activate(self, transport, queues):
            raise OSError(22, "KVM_IOEVENTFD failed")

    plumbing = BrokenEventfds()
    t = VirtioMmioTransport(device, irq=5, interrupt=interrupt, eventfds=plumbing)
    FakeDriver(t).probe()
    assert t.status & NEEDS_RESET
    assert device.activations == [] and plumbing.deactivations == 0


def test_device_signal_needs_reset_sets_status_bit_and_config_interrupt(
    driver, device, interrupt
):
    driver.probe()
    device.signal_needs_reset()
    status = driver.r32(c.VIRTIO_MMIO_STATUS)
    assert status == ACK | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    assert driver.r32(c.VIRTIO_MMIO_INTERRUPT_STATUS) & c.VIRTIO_MMIO_INT_CONFIG
    assert interrupt.triggers == 1
    # Linux acks what it read; the config bit then clears.
    driver.w32(c.VIRTIO_MMIO_INTERRUPT_ACK, c.VIRTIO_MMIO_INT_CONFIG | c.VIRTIO_MMIO_INT_VRING)
    assert driver.r32(c.VIRTIO_MMIO_INTERRUPT_STATUS) == c.VIRTIO_MMIO_INT_VRING
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == 0 and device.resets == 1


def test_needs_reset_before_driver_ok_sets_bit_without_interrupt(driver, device, interrupt):
    driver.add_status(ACK)
    device.signal_needs_reset()
    assert driver.r32(c.VIRTIO_MMIO_STATUS) == ACK | NEEDS_RESET
    assert interrupt.triggers == 0


def test_config_change_increments_generation_and_interrupts_only_once_live(
    driver, device, interrupt
):
    before = driver.r32(c.VIRTIO_MMIO_CONFIG_GENERATION)
    device.signal_config_change()
    assert driver.r32(c.VIRTIO_MMIO_CONFIG_GENERATION) == before + 1
    assert interrupt.triggers == 0
    driver.probe()
    device.signal_config_change()
    assert driver.r32(c.VIRTIO_MMIO_CONFIG_GENERATION) == before + 2
    assert interrupt.triggers == 1
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)  # generation survives a reset
    assert driver.r32(c.VIRTIO_MMIO_CONFIG_GENERATION) == before + 2


# --- command line -----------------------------------------------------------------------------


def test_cmdline_fragment_uses_linux_size_at_base_colon_irq_format(transport):
    assert transport.cmdline_fragment() == "virtio_mmio.device=4K@0xd0001000:5"
    assert transport.cmdline_fragment(0xD0002000) == "virtio_mmio.device=4K@0xd0002000:5"
    assert virtio_mmio_cmdline(0xD0000000, 7, size=0x200) == "virtio_mmio.device=512@0xd0000000:7"


# --- constants against Linux's uapi headers ---------------------------------------------------

UAPI_DIR = Path("/usr/include/linux")
_DEFINE = re.compile(r"^\s*#\s*define\s+(\w+)\s+([^/\n]+?)\s*(?:/\*.*)?$", re.MULTILINE)
_NUMERIC = re.compile(r"^[0-9a-fA-FxX()<<\s]+$")


def _uapi_defines() -> dict[str, int]:
    raw: dict[str, str] = {}
    for header in sorted(UAPI_DIR.glob("virtio_*.h")):
        for name, value in _DEFINE.findall(header.read_text()):
            raw.setdefault(name, value.strip())
    values: dict[str, int] = {}
    for name, value in raw.items():
        while value in raw and value != raw[value]:  # aliases such as VIRTIO_F_IOMMU_PLATFORM
            value = raw[value]
        if _NUMERIC.match(value):
            values[name] = eval(value, {"__builtins__": {}})  # digits, hex, <<, parens only
    return values


@pytest.mark.skipif(not (UAPI_DIR / "virtio_mmio.h").exists(),
                    reason="Linux uapi headers not installed (Debian: linux-libc-dev)")
def test_constants_match_linux_uapi_headers():
    header = _uapi_defines()
    ours = {n: v for n, v in vars(c).items() if n.isupper() and isinstance(v, int)}
    checked = {n for n in ours if n not in c.PYMVM_ONLY}
    missing = sorted(n for n in checked if n not in header)
    assert missing == [], "not in <linux/virtio_*.h>; fix the name or add it to PYMVM_ONLY"
    assert {n: ours[n] for n in checked} == {n: header[n] for n in checked}
    assert len(checked) > 50
