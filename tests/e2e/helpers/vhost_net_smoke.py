"""Real vhost-net through pymvm's own pieces, as a guest driver would use it.

GuestMemory regions, HostNetwork (new netns + bridge + TAP), VhostNetBackend activated with
the transport's ActivationContext and every offered feature acked; one TX frame must reach
the host side and one host frame must land in the guest's RX ring, then the device is reset
and activated again. Needs root, /dev/vhost-net and /dev/net/tun (the nested host has them):

    python -m pymvm.nested -- python tests/e2e/helpers/vhost_net_smoke.py
"""

import os
import socket
import struct
import time

from pyroute2 import netns as pyroute2_netns

from pymvm.devices.virtio.device import ActivationContext, QueueConfig
from pymvm.memory import GuestMemory
from pymvm.net.host import HostNetwork
from pymvm.net.tap import run_in_netns
from pymvm.vhost.kernel import VhostNetBackend, vnet_hdr_size

QSIZE = 256
mem = GuestMemory(4 << 20)
SFX = os.urandom(3).hex()
net = HostNetwork.create(
    netns=f"pmvh{SFX}", bridge=f"pmbr{SFX}", bridge_address="10.77.0.1/24", mtu=1500
)
backend = VhostNetBackend(net.tap)
offered = backend.features()
acked = offered  # a driver that takes everything
hdr = vnet_hdr_size(acked)
print(f"offered/acked {offered:#x}, hdr {hdr}, tap {net.tap.name} in netns {net.tap.netns}")

rx = QueueConfig(0, QSIZE, True, 0x10000, 0x11000, 0x12000)
tx = QueueConfig(1, QSIZE, True, 0x20000, 0x21000, 0x22000)
RXBUF, TXBUF = 0x40000, 0x80000


def view(gpa: int, n: int) -> memoryview:
    return mem.view(gpa, n)


def put_desc(q, i, addr, length, flags):
    struct.pack_into("<QIHH", view(q.desc_addr + 16 * i, 16), 0, addr, length, flags, 0)


def publish(q, heads):
    for n, h in enumerate(heads):
        struct.pack_into("<H", view(q.driver_addr + 4 + 2 * n, 2), 0, h)
    struct.pack_into("<HH", view(q.driver_addr, 4), 0, 0, len(heads))


def used_idx(q):
    return struct.unpack_from("<H", view(q.device_addr + 2, 2))[0]


def used_elem(q, n):
    return struct.unpack_from("<II", view(q.device_addr + 4 + 8 * n, 8))


def wait_used(q, want, timeout=20.0):
    end = time.monotonic() + timeout
    while used_idx(q) < want:
        assert time.monotonic() < end, f"queue {q.index}: used idx {used_idx(q)} < {want}"
        time.sleep(0.01)


def make_sniffer():
    # ETH_P_ALL: a bridge port's rx_handler consumes frames before protocol-specific
    # packet sockets would see them; ETH_P_ALL taps run first.
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    s.bind((net.tap.name, 0))
    s.settimeout(20)
    return s


sniff = run_in_netns(net.netns, make_sniffer)
try:
    for round_ in range(2):
        view(0x10000, 0x20000)[:] = bytes(0x20000)
        kicks = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        calls = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        for i in range(16):
            put_desc(rx, i, RXBUF + i * 2048, 2048, 2)
        publish(rx, list(range(16)))
        ctx = ActivationContext(acked, [rx, tx], kicks, calls, mem.regions)
        backend.activate(ctx, ctx.mem_regions)

        payload = f"pymvm-tx-{round_}".encode().ljust(50, b".")
        frame = b"\xff" * 6 + b"\x02\0\0\0\0\x01\x88\xb5" + payload
        view(TXBUF, hdr)[:] = bytes(hdr)
        view(TXBUF + hdr, len(frame))[:] = frame
        put_desc(tx, 0, TXBUF, hdr + len(frame), 0)
        publish(tx, [0])
        os.eventfd_write(kicks[1], 1)
        wait_used(tx, 1)
        while True:
            got, addr = sniff.recvfrom(2048)
            if addr[2] != socket.PACKET_OUTGOING and got[12:14] == b"\x88\xb5":
                break
        assert got[: len(frame)] == frame, got
        print(f"round {round_}: TX ok, host netns saw {got[14:25]!r}")

        payload = f"pymvm-rx-{round_}".encode().ljust(50, b".")
        inject = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x88\xb5" + payload
        sniff.send(inject)
        end = time.monotonic() + 20
        found = None
        while found is None:
            assert time.monotonic() < end, "RX frame never reached the guest ring"
            for n in range(used_idx(rx)):
                head, length = used_elem(rx, n)
                data = bytes(view(RXBUF + head * 2048, length))
                if data[hdr:] == inject:
                    found = (n, length)
            time.sleep(0.01)
        print(f"round {round_}: RX ok at used entry {found[0]} (len {found[1]}); "
              f"call eventfds rx={os.eventfd_read(calls[0])} tx={os.eventfd_read(calls[1])}")
        backend.reset()
        print(f"round {round_}: reset")
        for fd in kicks + calls:
            os.close(fd)
finally:
    sniff.close()
    backend.close()
    net.close()
    mem.close()
assert net.netns not in pyroute2_netns.listnetns(), "HostNetwork left its netns behind"
print("VHOST BACKEND SMOKE PASSED")
