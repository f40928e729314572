"""The virtio-net device model: offered features, config space, and back-end hand-off."""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import pytest

from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import ActivationContext, VirtioConfigError
from pymvm.devices.virtio.mmio import VirtioMmioTransport
from pymvm.devices.virtio.net import PASSTHROUGH_FEATURES, VirtioNetDevice

MAC = bytes.fromhex("06000ac80002")
CONFIG = c.VIRTIO_MMIO_CONFIG
STATUS_BITS = (
    c.VIRTIO_CONFIG_S_ACKNOWLEDGE,
    c.VIRTIO_CONFIG_S_DRIVER,
    c.VIRTIO_CONFIG_S_FEATURES_OK,
)


def bit(n: int) -> int:
    return 1 << n


class FakeBackend:
    def __init__(self, features: int = 0) -> None:
        self._features = features
        self.activations: list[tuple[ActivationContext, Sequence[Any]]] = []
        self.resets = 0

    def features(self) -> int:
        return self._features

    def activate(self, ctx: ActivationContext, mem_regions: Sequence[Any]) -> None:
        self.activations.append((ctx, mem_regions))

    def reset(self) -> None:
        self.resets += 1


class FakeInterrupt:
    def __init__(self) -> None:
        self.triggers = 0

    def trigger(self) -> None:
        self.triggers += 1


class Driver:
    """Just enough of Linux's virtio-mmio driver to bring a net device up."""

    def __init__(self, transport: VirtioMmioTransport) -> None:
        self.t = transport

    def r(self, offset: int, length: int = 4) -> int:
        data = bytearray(length)
        self.t.read(offset, data)
        return int.from_bytes(data, "little")

    def w32(self, offset: int, value: int) -> None:
        self.t.write(offset, value.to_bytes(4, "little"))

    def features(self) -> int:
        self.w32(c.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
        high = self.r(c.VIRTIO_MMIO_DEVICE_FEATURES)
        self.w32(c.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
        return high << 32 | self.r(c.VIRTIO_MMIO_DEVICE_FEATURES)

    def bring_up(self, queues: Sequence[int] = (0, 1)) -> None:
        self.w32(c.VIRTIO_MMIO_STATUS, 0)
        status = 0
        for step in STATUS_BITS:
            if step == c.VIRTIO_CONFIG_S_FEATURES_OK:
                offered = self.features()
                for page in (0, 1):
                    self.w32(c.VIRTIO_MMIO_DRIVER_FEATURES_SEL, page)
                    self.w32(c.VIRTIO_MMIO_DRIVER_FEATURES, offered >> (32 * page) & 0xFFFF_FFFF)
            status |= step
            self.w32(c.VIRTIO_MMIO_STATUS, status)
        for q in queues:
            self.w32(c.VIRTIO_MMIO_QUEUE_SEL, q)
            self.w32(c.VIRTIO_MMIO_QUEUE_NUM, 256)
            self.w32(c.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x10_0000 + q * 0x1_0000)
            self.w32(c.VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x10_1000 + q * 0x1_0000)
            self.w32(c.VIRTIO_MMIO_QUEUE_USED_LOW, 0x10_2000 + q * 0x1_0000)
            self.w32(c.VIRTIO_MMIO_QUEUE_READY, 1)
        self.w32(c.VIRTIO_MMIO_STATUS, status | c.VIRTIO_CONFIG_S_DRIVER_OK)


def make(mtu: int | None = 1500, backend_features: int = 0):
    backend = FakeBackend(backend_features)
    net = VirtioNetDevice(MAC, mtu, backend)
    interrupt = FakeInterrupt()
    transport = VirtioMmioTransport(net, irq=5, interrupt=interrupt, eventfds=None,
                                    mem_regions=("ram",))
    return net, backend, transport, Driver(transport), interrupt


# --- features ---------------------------------------------------------------------------------


def test_net_offers_version_1_mac_status_and_mtu_when_mtu_is_set():
    net, *_ = make(mtu=9000)
    assert net.avail_features() == bit(c.VIRTIO_F_VERSION_1) | bit(c.VIRTIO_NET_F_MAC) | bit(
        c.VIRTIO_NET_F_STATUS
    ) | bit(c.VIRTIO_NET_F_MTU)


def test_net_does_not_offer_mtu_without_one():
    net, *_ = make(mtu=None)
    assert not net.avail_features() & bit(c.VIRTIO_NET_F_MTU)


def test_net_offers_backend_offloads_it_knows_but_never_ctrl_vq_mq_or_packed_rings():
    offloads = bit(c.VIRTIO_NET_F_CSUM) | bit(c.VIRTIO_NET_F_GUEST_TSO4) | bit(
        c.VIRTIO_NET_F_MRG_RXBUF
    ) | bit(c.VIRTIO_RING_F_EVENT_IDX) | bit(c.VIRTIO_RING_F_INDIRECT_DESC)
    unknown = bit(c.VIRTIO_NET_F_CTRL_VQ) | bit(c.VIRTIO_NET_F_MQ) | bit(
        c.VIRTIO_F_RING_PACKED
    ) | bit(30)  # 30: VHOST_F_LOG_ALL, a vhost-only bit
    _, _, _, driver, _ = make(backend_features=offloads | unknown)
    offered = driver.features()
    assert offered & offloads == offloads
    assert offered & unknown == 0


def test_passthrough_set_holds_the_offloads_named_in_the_design():
    expected = [
        c.VIRTIO_NET_F_CSUM, c.VIRTIO_NET_F_GUEST_CSUM, c.VIRTIO_NET_F_GUEST_TSO4,
        c.VIRTIO_NET_F_GUEST_TSO6, c.VIRTIO_NET_F_GUEST_ECN, c.VIRTIO_NET_F_GUEST_UFO,
        c.VIRTIO_NET_F_HOST_TSO4, c.VIRTIO_NET_F_HOST_TSO6, c.VIRTIO_NET_F_HOST_ECN,
        c.VIRTIO_NET_F_HOST_UFO, c.VIRTIO_NET_F_MRG_RXBUF, c.VIRTIO_RING_F_EVENT_IDX,
        c.VIRTIO_RING_F_INDIRECT_DESC,
    ]
    assert PASSTHROUGH_FEATURES == c.feature_mask(*expected)


def test_net_is_device_type_1_with_rx_and_tx_queues_of_256():
    _, _, _, driver, _ = make()
    assert driver.r(c.VIRTIO_MMIO_DEVICE_ID) == 1
    sizes = []
    for q in (0, 1, 2):
        driver.w32(c.VIRTIO_MMIO_QUEUE_SEL, q)
        sizes.append(driver.r(c.VIRTIO_MMIO_QUEUE_NUM_MAX))
    assert sizes == [256, 256, 0]


# --- config space -----------------------------------------------------------------------------


def test_config_space_mac_reads_byte_by_byte_like_linux():
    _, _, _, driver, _ = make()
    assert bytes(driver.r(CONFIG + i, 1) for i in range(6)) == MAC


def test_config_space_holds_link_up_one_queue_pair_and_mtu():
    _, _, t, _, _ = make(mtu=1400)
    data = bytearray(c.VIRTIO_NET_CONFIG_SIZE)
    t.read(CONFIG, data)
    assert bytes(data[:6]) == MAC
    assert struct.unpack("<HHH", data[6:]) == (c.VIRTIO_NET_S_LINK_UP, 1, 1400)


def test_config_space_writes_are_ignored():
    _, _, t, driver, _ = make()
    driver.bring_up()
    t.write(CONFIG, b"\x02\x11\x22\x33\x44\x55")
    assert bytes(driver.r(CONFIG + i, 1) for i in range(6)) == MAC


def test_link_down_clears_status_bumps_generation_and_interrupts():
    net, _, _, driver, interrupt = make()
    driver.bring_up()
    generation = driver.r(c.VIRTIO_MMIO_CONFIG_GENERATION)
    net.set_link_up(False)
    assert driver.r(CONFIG + 6, 2) == 0
    assert driver.r(c.VIRTIO_MMIO_CONFIG_GENERATION) == generation + 1
    assert driver.r(c.VIRTIO_MMIO_INTERRUPT_STATUS) & c.VIRTIO_MMIO_INT_CONFIG
    assert interrupt.triggers == 1


# --- activation and reset ---------------------------------------------------------------------


def test_driver_ok_activates_backend_with_rings_features_and_memory():
    net, backend, _, driver, _ = make(backend_features=bit(c.VIRTIO_RING_F_EVENT_IDX))
    driver.bring_up()
    ((ctx, mem),) = backend.activations
    assert mem == ("ram",)
    assert [(q.index, q.desc_addr, q.driver_addr, q.device_addr) for q in ctx.queues] == [
        (0, 0x10_0000, 0x10_1000, 0x10_2000),
        (1, 0x11_0000, 0x11_1000, 0x11_2000),
    ]
    assert ctx.has_feature(c.VIRTIO_RING_F_EVENT_IDX)
    assert ctx.has_feature(c.VIRTIO_NET_F_MAC)
    assert net.active


def test_reset_forwards_to_backend():
    net, backend, _, driver, _ = make()
    driver.bring_up()
    driver.w32(c.VIRTIO_MMIO_STATUS, 0)
    assert backend.resets == 1
    assert not net.active


def test_activation_without_tx_queue_is_refused_with_needs_reset():
    _, backend, t, driver, interrupt = make()
    driver.bring_up(queues=(0,))
    assert backend.activations == []
    assert t.status & c.VIRTIO_CONFIG_S_NEEDS_RESET
    assert interrupt.triggers == 1


# --- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mac, mtu, pairs",
    [
        (b"\x06\x00\x00", 1500, 1),  # short MAC
        (bytes.fromhex("010203040506"), 1500, 1),  # multicast MAC
        (MAC, 10, 1),  # MTU below 68
        (MAC, 70000, 1),  # MTU above 65535
        (MAC, 1500, 2),  # multiqueue needs the control queue pymvm lacks
    ],
)
def test_bad_parameters_raise_config_error(mac, mtu, pairs):
    with pytest.raises(VirtioConfigError):
        VirtioNetDevice(mac, mtu, FakeBackend(), queue_pairs=pairs)


def test_a_device_cannot_be_wrapped_by_two_transports():
    net, *_ = make()
    with pytest.raises(Exception, match="already attached"):
        VirtioMmioTransport(net, irq=6, interrupt=FakeInterrupt(), eventfds=None)


@pytest.mark.parametrize(("mac", "mtu", "pairs", "message"), [
    (b"\x06\x00\x00", 1500, 1, "virtio-net MAC must be 6 bytes, got 3: 06:00:00"),
    (bytes.fromhex("010203040506"), 1500, 1,
     "virtio-net MAC 01:02:03:04:05:06 is multicast; clear the low bit of the first byte"),
    (MAC, 67, 1, "virtio-net MTU 67 is outside 68..65535"),
    (MAC, 65536, 1, "virtio-net MTU 65536 is outside 68..65535"),
    (MAC, 1500, 2, ("virtio-net with 2 queue pairs needs VIRTIO_NET_F_MQ and a control queue, "
                   "which pymvm does not offer; use queue_pairs=1")),
])
def test_bad_parameters_are_refused_naming_the_problem_and_the_fix(mac, mtu, pairs, message):
    with pytest.raises(VirtioConfigError) as e:
        VirtioNetDevice(mac, mtu, FakeBackend(), queue_pairs=pairs)
    assert str(e.value) == message


@pytest.mark.parametrize("mtu", [68, 65535])
def test_the_smallest_and_largest_mtu_are_accepted_and_read_back_from_config_space(mtu: int):
    _, _, t, _, _ = make(mtu=mtu)
    data = bytearray(c.VIRTIO_NET_CONFIG_SIZE)
    t.read(CONFIG, data)
    assert struct.unpack("<HHH", data[6:]) == (c.VIRTIO_NET_S_LINK_UP, 1, mtu)


def test_without_an_mtu_the_config_space_mtu_field_is_zero():
    _, _, t, _, _ = make(mtu=None)
    data = bytearray(c.VIRTIO_NET_CONFIG_SIZE)
    t.read(CONFIG, data)
    assert bytes(data) == MAC + struct.pack("<HHH", c.VIRTIO_NET_S_LINK_UP, 1, 0)


def test_link_down_then_up_shows_the_link_up_again_with_one_interrupt_each():
    net, _, _, driver, interrupt = make()
    driver.bring_up()
    net.set_link_up(False)
    net.set_link_up(True)
    assert driver.r(CONFIG + 6, 2) == c.VIRTIO_NET_S_LINK_UP
    net.set_link_up(True)  # no change: no interrupt
    assert interrupt.triggers == 2


def test_activation_without_a_queue_is_refused_naming_the_queues_missing():
    net, backend, *_ = make()
    from pymvm.devices.virtio.device import QueueConfig, VirtioActivationError

    rx = QueueConfig(index=0, size=256, ready=True, desc_addr=0, driver_addr=0x1000,
                     device_addr=0x2000)
    with pytest.raises(VirtioActivationError) as e:
        net.activate(ActivationContext(acked_features=0, queues=[rx]))
    assert str(e.value) == ("virtio-net: the driver did not make queues [1] ready; the guest "
                            "driver must set up both rx and tx")
    assert backend.activations == [] and not net.active


def test_the_activation_log_line_names_the_device_and_its_mac():
    from structlog.testing import capture_logs

    _net, _, _, driver, _ = make()
    with capture_logs() as logs:
        driver.bring_up()
    (line,) = [e for e in logs if e["event"] == "virtio-net activated"]
    assert line["device"] == "virtio-net" and line["mac"] == "06:00:0a:c8:00:02"
