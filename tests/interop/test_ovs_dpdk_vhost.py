"""pymvm's vhost-user front-end in server mode against OVS-DPDK's ``dpdkvhostuserclient`` port.

No guest: the test plays the virtio driver in a memfd-backed GuestMemory (as
test_dpdk_net_vhost does with testpmd). OVS-DPDK connects to the socket pymvm listens on;
pymvm hands it the rings with the features a Linux guest acks; a frame the "guest" queues on
its TX ring comes out of the bridge's internal port on the host, and a frame the host sends
into the bridge lands in a buffer of the RX ring. This is the path of a VM that sits on an
OVS-DPDK port from its boot (the e2e swap test's VM A).
"""

from __future__ import annotations

import os
import socket
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymvm.devices.virtio import constants as c
from pymvm.devices.virtio.device import ActivationContext
from pymvm.devices.virtio.net import PASSTHROUGH_FEATURES
from pymvm.memory import GuestMemory
from pymvm.testing import ovs as ovs_mod
from pymvm.vhost.kernel import VIRTIO_F_VERSION_1
from pymvm.vhost.user.frontend import VhostUserNetBackend
from tests.interop.test_dpdk_net_vhost import (
    RING_GPA,
    RX,
    TX,
    VNET_HDR_SIZE,
    post_tx_packet,
    queue,
    used_idx,
)

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not ovs_mod.available(), reason="OVS-DPDK is not installed: "
                       "apt-get install openvswitch-switch-dpdk"),
]

RX_BUFFERS_GPA = 0x400000
RX_BUFFER_SIZE = 2048
RX_BUFFERS = 32
VRING_DESC_F_WRITE = 2
ETH_P_TEST = 0x88B5  # IEEE 802 local experimental ethertype: nothing else on the bridge sends it
GUEST_MAC = bytes.fromhex("525400a1b2c3")


def frame(src: bytes, marker: bytes) -> bytes:
    return b"\xff" * 6 + src + struct.pack("!H", ETH_P_TEST) + marker.ljust(46, b"\0")


def post_rx_buffers(memory: GuestMemory) -> None:
    """Be the driver: RX_BUFFERS device-writable buffers made available on the rx ring."""
    q = queue(RX)
    for i in range(RX_BUFFERS):
        memory.write(q.desc_addr + 16 * i, struct.pack(
            "<QIHH", RX_BUFFERS_GPA + i * RX_BUFFER_SIZE, RX_BUFFER_SIZE, VRING_DESC_F_WRITE, 0))
        memory.write(q.driver_addr + 4 + 2 * i, struct.pack("<H", i))
    memory.write(q.driver_addr + 2, struct.pack("<H", RX_BUFFERS))  # avail->idx


def used_elem(memory: GuestMemory, index: int, n: int) -> tuple[int, int]:
    return struct.unpack("<II", memory.read(queue(index).device_addr + 4 + 8 * n, 8))


def wait(predicate, timeout: float, what: str, ovs: ovs_mod.OvsDpdk) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout:.0f} s\n{ovs.logs()}")
        time.sleep(0.05)


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pymvm-ovs-"))  # short: unix socket path limit
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# What a Linux guest's virtio-net driver acks of what pymvm offers for a NIC on OVS-DPDK (not
# swappable: every pass-through feature OVS offers), and the bare minimum.
@pytest.mark.parametrize("acked", ["linux-guest", "version-1-only"])
def test_ovs_dpdk_client_port_runs_the_rings_pymvm_hands_it_in_server_mode(
        workdir: Path, acked: str) -> None:
    tag = uuid.uuid4().hex[:6]
    bridge = f"pmoi{tag}"
    sock = workdir / "vm.sock"
    ovs = ovs_mod.OvsDpdk(workdir / "ovs", f"pmoi-{tag}")
    kicks = [os.eventfd(0, os.EFD_CLOEXEC) for _ in RING_GPA]
    calls = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in RING_GPA]
    memory = GuestMemory(64 << 20)
    frontend: VhostUserNetBackend | None = None
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_TEST))
    try:
        ovs.start()
        ovs.add_bridge(bridge)
        ovs.add_vhost_user_port(bridge, "vm0", sock)
        raw.bind((bridge, ETH_P_TEST))
        raw.settimeout(0.2)
        # pymvm listens; OVS (reconnecting every second) connects.
        frontend = VhostUserNetBackend(sock, "server", connect_timeout=60)
        offered = frontend.features()
        assert offered & VIRTIO_F_VERSION_1
        features = VIRTIO_F_VERSION_1
        if acked == "linux-guest":
            features |= offered & PASSTHROUGH_FEATURES
            assert features & c.feature_mask(c.VIRTIO_NET_F_MRG_RXBUF), hex(offered)
        ctx = ActivationContext(acked_features=features, queues=[queue(RX), queue(TX)],
                                kick_fds=kicks, call_fds=calls, mem_regions=memory.regions)
        post_rx_buffers(memory)
        frontend.activate(ctx, memory.regions)
        wait(lambda: "vHost Device" in ovs.logs() and "has been added" in ovs.logs(), 30,
             "OVS never reported the vhost device added", ovs)

        # guest -> host: the TX frame leaves the bridge's internal port.
        out = frame(GUEST_MAC, b"from-the-guest " + tag.encode())
        post_tx_packet(memory, out)
        os.eventfd_write(kicks[TX], 1)
        wait(lambda: used_idx(memory, TX) == 1, 20, "OVS never consumed the tx descriptor", ovs)
        deadline, seen = time.monotonic() + 20, b""
        while seen != out and time.monotonic() < deadline:
            try:
                seen = raw.recv(2048)[:len(out)]
            except TimeoutError:
                pass
        assert seen == out, f"the guest's frame never reached the bridge\n{ovs.logs()}"

        # host -> guest: a broadcast into the bridge is flooded to the port, into an RX buffer
        # (among whatever else the host sends there: IPv6 neighbour discovery, for one).
        back = frame(bytes.fromhex("02aabbccddee"), b"from-the-host " + tag.encode())

        def received() -> list[bytes]:
            frames = []
            for n in range(min(used_idx(memory, RX), RX_BUFFERS)):
                desc, length = used_elem(memory, RX, n)
                assert desc < RX_BUFFERS and VNET_HDR_SIZE <= length <= RX_BUFFER_SIZE
                buf = memory.read(RX_BUFFERS_GPA + desc * RX_BUFFER_SIZE, length)
                if features & c.feature_mask(c.VIRTIO_NET_F_MRG_RXBUF):
                    assert buf[10:12] == b"\x01\x00"  # num_buffers: a small frame fits one
                frames.append(buf[VNET_HDR_SIZE:])
            return frames

        deadline = time.monotonic() + 20
        while not any(f[:len(back)] == back for f in received()) and time.monotonic() < deadline:
            raw.send(back)
            time.sleep(0.2)
        assert any(f[:len(back)] == back for f in received()), \
            f"the host's frame never reached the rx ring: {received()}\n{ovs.logs()}"

        bases = frontend.reset()
        assert bases[TX] == 1 and bases[RX] == used_idx(memory, RX)
    finally:
        raw.close()
        if frontend is not None:
            frontend.close()
        ovs.close()
        memory.close()
        for fd in kicks + calls:
            os.close(fd)
    assert not sock.exists()
    assert not os.path.exists(f"/sys/class/net/{bridge}")
