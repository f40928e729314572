"""The asyncio vhost-user back-end server, driven by a sans-IO front-end over a real socket,
and the net back-end's queue <-> TAP paths against a real TAP (root, /dev/net/tun)."""

from __future__ import annotations

import array
import asyncio
import mmap
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pyroute2 import IPRoute

from pymvm.devices.virtio.constants import (
    VIRTIO_F_VERSION_1,
    VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_RING_F_INDIRECT_DESC,
    feature_mask,
)
from pymvm.devices.virtio.queue import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE, GuestMemoryMap, VirtQueue
from pymvm.net.tap import Tap
from pymvm.vhost.backends import net as net_backend
from pymvm.vhost.backends.net import HDR_LEN, NetBackend, rarp_frame
from pymvm.vhost.user import messages as m
from pymvm.vhost.user.backend import VhostUserDevice, VhostUserServer, Vring
from pymvm.vhost.user.messages import ProtocolFeature as PF
from pymvm.vhost.user.protocol import NEED_DATA, FrontendConnection

MEM_GPA = 0x100000
MEM_UVA = 0x7F0000000000  # the front-end's address for the same memory: must be translated
MEM_SIZE = 0x40000
QSIZE = 8
DESC, AVAIL, USED = 0x0, 0x1000, 0x2000  # offsets in guest memory of queue 0
DATA = 0x10000
DEVICE_FEATURES = feature_mask(VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC)


class RecordingDevice(VhostUserDevice):
    """Consumes TX-style chains on every kick and records what the framework told it."""

    num_queues = 2

    def __init__(self) -> None:
        self.events: list[tuple[str, int] | str] = []
        self.payloads: list[bytes] = []

    def features(self) -> int:
        return DEVICE_FEATURES

    def queue_started(self, vring: Vring) -> None:
        self.events.append(("started", vring.index))

    def queue_stopped(self, vring: Vring) -> None:
        self.events.append(("stopped", vring.index))

    def queue_kicked(self, vring: Vring) -> None:
        assert vring.queue is not None
        while (chain := vring.queue.pop_avail()) is not None:
            self.payloads.append(b"".join(bytes(v) for v in chain.readable))
            vring.queue.add_used(chain.head, 0)
        vring.signal_used()

    def reset(self) -> None:
        self.events.append("reset")


class Frontend:
    """A minimal vhost-user front-end: FrontendConnection over a non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.conn = FrontendConnection()

    async def request(self, msg: m.Request) -> m.Message | None:
        data, fds = self.conn.send(msg)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([data], anc)
        if self.conn.awaiting_reply is None:
            return None
        loop = asyncio.get_running_loop()
        while (event := self.conn.next_event()) is NEED_DATA:
            chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), 5)
            self.conn.receive_data(chunk)
        return event

    async def negotiate(self) -> None:
        reply = await self.request(m.GetFeatures())
        assert isinstance(reply, m.FeaturesReply)
        await self.request(m.SetFeatures(self.conn.negotiate_features(-1)))
        await self.request(m.GetProtocolFeatures())
        await self.request(m.SetProtocolFeatures(
            int(self.conn.negotiate_protocol_features(PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS))))
        await self.request(m.SetOwner())


class GuestRam:
    """A memfd the test (as the driver) writes rings into, shared with the back-end."""

    def __init__(self, size: int = MEM_SIZE, gpa: int = MEM_GPA, uva: int = MEM_UVA,
                 name: str = "vhost-user-test") -> None:
        # Sealable: the back-end seals it against shrinking (a truncated mapping is a SIGBUS).
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.size, self.gpa, self.uva = size, gpa, uva
        self.avail_idx = 0

    def region(self) -> m.MemoryRegion:
        return m.MemoryRegion(self.gpa, self.size, self.uva, 0)

    def desc(self, i: int, offset: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        """Descriptor ``i`` points at ``offset`` bytes into this memory."""
        struct.pack_into("<QIHH", self.map, DESC + 16 * i, self.gpa + offset, length, flags, nxt)

    def publish(self, head: int) -> None:
        struct.pack_into("<H", self.map, AVAIL + 4 + 2 * (self.avail_idx % QSIZE), head)
        self.avail_idx += 1
        struct.pack_into("<H", self.map, AVAIL + 2, self.avail_idx)

    def used_idx(self) -> int:
        return struct.unpack_from("<H", self.map, USED + 2)[0]

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


def run_server(tmp_path: Path, device: VhostUserDevice,
               body: Callable[[VhostUserServer, Callable[[], Awaitable[Frontend]]], Awaitable[None]],
               **server_args: Any) -> None:
    """Run ``body(server, connect)`` against a back-end server (``server_args``: more
    arguments of VhostUserServer) on a socket in ``tmp_path``."""
    path = str(tmp_path / "vu.sock")

    async def main() -> None:
        server = VhostUserServer(path, device, **server_args)
        server.listen()
        task = asyncio.create_task(server.serve_forever())
        frontends: list[Frontend] = []

        async def connect() -> Frontend:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, path)
            frontends.append(Frontend(sock))
            return frontends[-1]

        try:
            await body(server, connect)
        finally:
            for fe in frontends:
                fe.sock.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert not os.path.exists(path)  # the socket file is removed on shutdown


async def start_queue0(fe: Frontend, ram: GuestRam, *, uva: int = MEM_UVA) -> tuple[int, int]:
    """Map memory and start vring 0; returns (kick, call) eventfds (the test's ends)."""
    dup = os.dup(ram.fd)
    await fe.request(m.SetMemTable((ram.region(),), (dup,)))
    os.close(dup)  # sendmsg gave the back-end its own copy
    await fe.request(m.SetVringNum(0, QSIZE))
    await fe.request(m.SetVringAddr(0, 0, uva + DESC, uva + USED, uva + AVAIL, 0))
    await fe.request(m.SetVringBase(0, 0))
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    await fe.request(m.SetVringCall(0, call))
    await fe.request(m.SetVringKick(0, kick))
    ack = await fe.request(m.SetVringEnable(0, True, need_reply=True))
    assert isinstance(ack, m.Ack) and ack.ok
    return kick, call


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# The framework


def test_features_offer_protocol_features_reply_ack_and_mem_slots(tmp_path: Path) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        reply = await fe.request(m.GetFeatures())
        assert isinstance(reply, m.FeaturesReply)
        assert reply.features == DEVICE_FEATURES | m.PROTOCOL_FEATURES_FLAG
        await fe.request(m.SetFeatures(reply.features))
        proto = await fe.request(m.GetProtocolFeatures())
        assert isinstance(proto, m.ProtocolFeaturesReply)
        assert proto.features & PF.REPLY_ACK and proto.features & PF.CONFIGURE_MEM_SLOTS
        assert not proto.features & PF.MQ  # one queue pair: no multiqueue

    run_server(tmp_path, RecordingDevice(), body)


def test_kicked_ring_delivers_chains_to_the_device_and_signals_call(tmp_path: Path) -> None:
    device = RecordingDevice()
    ram = GuestRam()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        kick, call = await start_queue0(fe, ram)
        assert ("started", 0) in device.events
        ram.map[DATA : DATA + 5] = b"hello"
        ram.desc(0, DATA, 5)
        ram.publish(0)
        os.eventfd_write(kick, 1)
        await until(lambda: device.payloads == [b"hello"])
        assert ram.used_idx() == 1
        assert os.eventfd_read(call) == 1
        base = await fe.request(m.GetVringBase(0))
        assert isinstance(base, m.VringBaseReply) and base.num == 1
        assert ("stopped", 0) in device.events
        for fd in (kick, call):
            os.close(fd)

    try:
        run_server(tmp_path, device, body)
    finally:
        ram.close()


def test_ring_address_outside_the_memory_table_drops_the_connection(tmp_path: Path) -> None:
    ram = GuestRam()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        # The back-end hangs up: the awaited reply never comes (a timeout would be a hang).
        with pytest.raises((m.VhostUserRemoteError, ConnectionError)):
            await start_queue0(fe, ram, uva=0x1000)
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(fe.sock, 64), 5) == b""

    try:
        run_server(tmp_path, RecordingDevice(), body)
    finally:
        ram.close()


def test_garbage_client_is_disconnected_and_the_next_client_is_served(tmp_path: Path) -> None:
    device = RecordingDevice()
    ram = GuestRam()

    async def body(server: VhostUserServer, connect) -> None:
        loop = asyncio.get_running_loop()
        bad = await connect()
        await bad.negotiate()
        await start_queue0(bad, ram)
        bad.sock.send(b"\xde\xad\xbe\xef" * 8)  # version bits wrong: a remote protocol error
        assert await asyncio.wait_for(loop.sock_recv(bad.sock, 64), 5) == b""
        assert "reset" in device.events and ("stopped", 0) in device.events
        good = await connect()
        reply = await good.request(m.GetFeatures())
        assert isinstance(reply, m.FeaturesReply)
        assert server.sessions_served == 2
        assert server.session is not None and server.session.regions == []

    try:
        run_server(tmp_path, device, body)
    finally:
        ram.close()


def test_stale_socket_file_is_replaced_but_a_live_one_is_refused(tmp_path: Path) -> None:
    from pymvm.vhost.user.backend import VhostUserBackendError

    path = str(tmp_path / "vu.sock")
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    server = VhostUserServer(path, RecordingDevice())
    server.listen()
    try:
        with pytest.raises(VhostUserBackendError, match="in use"):
            VhostUserServer(path, RecordingDevice()).listen()
    finally:
        server.close()
    assert not os.path.exists(path)


def test_a_bound_server_refuses_front_ends_until_it_listens(tmp_path: Path) -> None:
    """bind() makes the socket file while the back-end may still write there; front-ends
    that come before listen() (a back-end still starting threads and its seccomp filter)
    are refused, so they retry, instead of waiting on a request nobody reads."""
    path = str(tmp_path / "vu.sock")
    server = VhostUserServer(path, RecordingDevice())
    server.bind()
    try:
        assert os.path.exists(path)
        early = socket.socket(socket.AF_UNIX)
        with pytest.raises(ConnectionRefusedError):
            early.connect(path)
        early.close()
        server.listen()
        on_time = socket.socket(socket.AF_UNIX)
        on_time.connect(path)
        on_time.close()
    finally:
        server.close()
    assert not os.path.exists(path)


# ---------------------------------------------------------------------------------------------
# The net back-end against a real TAP

needs_tun = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)
ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5  # IEEE local experimental: nothing else on the TAP uses it


def frame(payload: bytes) -> bytes:
    return b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + struct.pack("!H", ETHERTYPE) + payload


class Rings:
    """RX (0) and TX (1) queues in a bytearray, with the driver's helpers."""

    def __init__(self, qsize: int = QSIZE) -> None:
        self.ram = bytearray(MEM_SIZE)
        self.memory = GuestMemoryMap([(MEM_GPA, memoryview(self.ram))])
        self.qsize = qsize
        self.avail = [0, 0]
        self.vrings = []
        for i in range(2):
            vring = Vring(i)
            vring.queue = VirtQueue(self.memory, qsize, *(MEM_GPA + self.base(i) + o for o in (DESC, AVAIL, USED)))
            self.vrings.append(vring)

    @staticmethod
    def base(q: int) -> int:
        return q * 0x4000

    def desc(self, q: int, i: int, offset: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        struct.pack_into("<QIHH", self.ram, self.base(q) + DESC + 16 * i, MEM_GPA + offset, length, flags, nxt)

    def publish(self, q: int, head: int) -> None:
        struct.pack_into("<H", self.ram, self.base(q) + AVAIL + 4 + 2 * (self.avail[q] % self.qsize), head)
        self.avail[q] += 1
        struct.pack_into("<H", self.ram, self.base(q) + AVAIL + 2, self.avail[q])

    def used(self, q: int, slot: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.ram, self.base(q) + USED + 4 + 8 * slot)

    def post_rx(self, count: int, size: int) -> None:
        """Post ``count`` RX buffers of ``size`` bytes, descriptor i at DATA + size * i."""
        for i in range(count):
            self.desc(0, i, DATA + size * i, size, VRING_DESC_F_WRITE)
            self.publish(0, i)

    def used_idx(self, q: int) -> int:
        return struct.unpack_from("<H", self.ram, self.base(q) + USED + 2)[0]


@pytest.fixture
def tap() -> Tap:
    t = Tap.open("pvmvut%d")
    try:
        with open(f"/proc/sys/net/ipv6/conf/{t.name}/disable_ipv6", "w") as f:
            f.write("1")  # no router solicitations on our RX queue
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=t.name)[0], state="up", mtu=9000)
        yield t
    finally:
        t.close()


def sniffer(name: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.bind((name, 0))
    s.settimeout(5)
    return s


def mergeable_net(tap: Tap) -> NetBackend:
    """A net back-end on ``tap`` whose guest acked VERSION_1 and MRG_RXBUF."""
    net = NetBackend(tap)
    net.set_features(feature_mask(VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF))
    return net


def run_with_sniffer(tap: Tap, main: Callable[[socket.socket], Awaitable[None]]) -> None:
    """asyncio.run(main(sniff)) with a packet socket on ``tap``'s host side."""
    sniff = sniffer(tap.name)
    try:
        asyncio.run(main(sniff))
    finally:
        sniff.close()


@needs_tun
def test_net_tx_chain_is_written_to_the_tap_with_its_vnet_header(tap: Tap) -> None:
    rings = Rings()
    net = mergeable_net(tap)
    sniff = sniffer(tap.name)
    pkt = frame(b"guest says hi".ljust(50, b"."))
    rings.ram[DATA : DATA + HDR_LEN] = bytes(HDR_LEN)  # header and frame in separate buffers
    rings.ram[DATA + 0x100 : DATA + 0x100 + len(pkt)] = pkt
    rings.desc(1, 0, DATA, HDR_LEN, VRING_DESC_F_NEXT, 1)
    rings.desc(1, 1, DATA + 0x100, len(pkt))
    rings.publish(1, 0)
    try:
        net.queue_started(rings.vrings[1])
        net.queue_kicked(rings.vrings[1])
        while (got := sniff.recv(65536))[12:14] != struct.pack("!H", ETHERTYPE):
            pass
        assert got == pkt
        assert rings.used_idx(1) == 1 and net.stats["tx_packets"] == 1
    finally:
        sniff.close()


@needs_tun
def test_net_rx_merges_buffers_and_waits_for_a_kick_when_the_guest_has_none(tap: Tap) -> None:
    rings = Rings()
    net = mergeable_net(tap)
    pkt = frame(bytes(range(256)) * 12)  # 3086 bytes: needs 4 buffers of 1024 with the header

    async def main(sniff: socket.socket) -> None:
        net.queue_started(rings.vrings[0])
        sniff.send(pkt)  # out of the host side of the TAP: into the guest's RX queue
        await until(lambda: net._pending is not None and not net._tap_reading)
        assert rings.used_idx(0) == 0  # no buffers yet: nothing delivered, nothing dropped
        rings.post_rx(QSIZE, 1024)
        net.queue_kicked(rings.vrings[0])
        await until(lambda: net.stats["rx_packets"] >= 1)
        used = [rings.used(0, s) for s in range(rings.used_idx(0))]
        assert [head for head, _ in used] == [0, 1, 2, 3]
        assert sum(length for _, length in used) == HDR_LEN + len(pkt)
        data = bytes(rings.ram[DATA : DATA + HDR_LEN + len(pkt)])
        assert struct.unpack_from("<H", data, 10)[0] == 4  # num_buffers
        assert data[HDR_LEN:] == pkt
        net.reset()

    run_with_sniffer(tap, main)


@needs_tun
def test_net_rx_reads_the_tap_straight_into_held_guest_buffers(tap: Tap) -> None:
    # 64 buffers of 2 KiB: enough to hold the largest packet, so every read goes into the
    # guest's buffers directly; the back-end's own scratch buffer is never written.
    rings = Rings(qsize=64)
    net = mergeable_net(tap)
    rings.post_rx(64, 2048)
    pkts = [frame(bytes([n]) * size) for n, size in enumerate((8000, 50, 4096 - HDR_LEN - 14, 8986))]

    async def main(sniff: socket.socket) -> None:
        net.queue_started(rings.vrings[0])
        for pkt in pkts:
            sniff.send(pkt)
        await until(lambda: net.stats["rx_packets"] >= len(pkts))
        used = [rings.used(0, s) for s in range(rings.used_idx(0))]
        slot = 0
        for pkt in pkts:  # each packet starts in the next buffer, in ring order
            buffers = -(-(HDR_LEN + len(pkt)) // 2048)
            heads = [head for head, _ in used[slot : slot + buffers]]
            assert heads == list(range(slot, slot + buffers))
            assert [length for _, length in used[slot : slot + buffers]] == \
                [2048] * (buffers - 1) + [HDR_LEN + len(pkt) - 2048 * (buffers - 1)]
            start = DATA + 2048 * slot
            data = bytes(rings.ram[start : start + HDR_LEN + len(pkt)])
            assert struct.unpack_from("<H", data, 10)[0] == buffers  # num_buffers
            assert data[HDR_LEN:] == pkt
            slot += buffers
        assert not any(net._scratch) and net.stats["rx_direct"] == len(pkts)
        # The buffers still held go back uncompleted when the ring stops: the next available
        # entry moves back to the first of them, nothing is added to the used ring.
        queue = rings.vrings[0].queue
        assert queue is not None and queue.last_avail_idx > slot
        net.queue_stopped(rings.vrings[0])
        assert rings.used_idx(0) == slot
        assert queue.last_avail_idx == slot
        assert not net._rx_used and net._rx_room == 0

    run_with_sniffer(tap, main)


@needs_tun
def test_net_rx_copies_when_the_held_buffers_are_more_than_readv_takes(
        tap: Tap, monkeypatch: pytest.MonkeyPatch) -> None:
    # readv refuses more than IOV_MAX buffers: with that many needed, packets are read into
    # the scratch buffer and copied, and still arrive whole.
    monkeypatch.setattr(net_backend, "IOV_MAX", 8)
    rings = Rings(qsize=64)
    net = mergeable_net(tap)
    rings.post_rx(64, 2048)
    pkt = frame(b"\x5a" * 5000)

    async def main(sniff: socket.socket) -> None:
        net.queue_started(rings.vrings[0])
        sniff.send(pkt)
        await until(lambda: net.stats["rx_packets"] >= 1)
        assert [rings.used(0, s) for s in range(rings.used_idx(0))] == \
            [(0, 2048), (1, 2048), (2, HDR_LEN + len(pkt) - 4096)]
        data = bytes(rings.ram[DATA : DATA + HDR_LEN + len(pkt)])
        assert struct.unpack_from("<H", data, 10)[0] == 3 and data[HDR_LEN:] == pkt
        assert net._scratch[HDR_LEN : HDR_LEN + len(pkt)] == pkt  # it went through scratch
        net.reset()

    run_with_sniffer(tap, main)


@needs_tun
def test_net_rx_copy_path_writes_num_buffers_across_a_split_header(tap: Tap) -> None:
    # Chains of an 8-byte buffer then a 1 KiB one: num_buffers (bytes 10-11 of the header)
    # lands in the second buffer of the first chain.
    rings = Rings()
    net = mergeable_net(tap)
    for c in range(4):
        rings.desc(0, 2 * c, DATA + 0x1000 * c, 8, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2 * c + 1)
        rings.desc(0, 2 * c + 1, DATA + 0x1000 * c + 0x100, 1024, VRING_DESC_F_WRITE)
        rings.publish(0, 2 * c)
    pkt = frame(bytes(range(256)) * 6)  # 1550 bytes: two chains

    async def main(sniff: socket.socket) -> None:
        net.queue_started(rings.vrings[0])
        sniff.send(pkt)
        await until(lambda: net.stats["rx_packets"] >= 1)
        assert [rings.used(0, s) for s in range(rings.used_idx(0))] == \
            [(0, 1032), (2, HDR_LEN + len(pkt) - 1032)]
        first = bytes(rings.ram[DATA : DATA + 8]) + bytes(rings.ram[DATA + 0x100 : DATA + 0x100 + 1024])
        second = bytes(rings.ram[DATA + 0x1000 : DATA + 0x1008]) + \
            bytes(rings.ram[DATA + 0x1100 : DATA + 0x1100 + 1024])
        data = (first + second)[: HDR_LEN + len(pkt)]
        assert struct.unpack_from("<H", data, 10)[0] == 2 and data[HDR_LEN:] == pkt
        net.reset()

    run_with_sniffer(tap, main)


def test_rarp_frame_announces_the_mac() -> None:
    mac = bytes.fromhex("020000abcdef")
    f = rarp_frame(mac)
    assert len(f) == 60 and f[6:12] == mac and f[12:14] == b"\x80\x35"


def test_replacing_a_call_fd_waits_for_a_device_thread_holding_the_vring_lock() -> None:
    """A device thread that signals under ``Vring.lock`` never writes to a closed call fd
    (whose number something else may have taken): the server swaps and closes it only once
    the lock is free."""
    import threading

    from pymvm.vhost.user.backend import Vring

    vring = Vring(0)
    old, new = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    vring.call_fd = old
    swapped = threading.Event()
    with vring.lock:
        t = threading.Thread(target=lambda: (vring._replace_fd("call_fd", new), swapped.set()))
        t.start()
        assert not swapped.wait(0.2)  # held: the old fd is still ours to write to
        os.eventfd_write(vring.call_fd, 1)
        assert vring.call_fd == old
    t.join(5)
    assert swapped.is_set() and vring.call_fd == new
    with pytest.raises(OSError):
        os.fstat(old)  # closed once swapped out
    vring._close_fds()
    assert vring.call_fd is None
    with pytest.raises(OSError):
        os.fstat(new)
