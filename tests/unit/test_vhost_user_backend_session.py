"""What the vhost-user back-end refuses from a front-end, and what a closing session gives back
(its mappings of guest memory, the vring eventfds it was sent), checked from outside the
session: /proc/self/maps and /proc/self/fd, not the session's own fields."""

from __future__ import annotations

import asyncio
import fcntl
import mmap
import os
import socket
import struct

import pytest

from pymvm.devices.virtio.queue import VRING_DESC_F_INDIRECT
from pymvm.vhost.user import messages as m
from pymvm.vhost.user.backend import MAX_MEM_SLOTS, VhostUserServer
from pymvm.vhost.user.errors import VhostUserRequestFailed
from pymvm.vhost.user.messages import ProtocolFeature as PF
from tests.unit.test_vhost_user_backend import (
    AVAIL,
    DATA,
    DESC,
    QSIZE,
    USED,
    Frontend,
    GuestRam,
    RecordingDevice,
    run_server,
    until,
)

PAGE = mmap.PAGESIZE


class Ram(GuestRam):
    """A memfd with a name of its own (to find its mappings in /proc/self/maps)."""

    def __init__(self, size: int, gpa: int, uva: int) -> None:
        self.name = f"pymvm-vu-session-{os.getpid()}-{os.urandom(4).hex()}"
        super().__init__(size, gpa, uva, self.name)

    def mappings(self) -> int:
        """How many mappings of this memfd the process has (ours is one of them)."""
        with open("/proc/self/maps") as f:
            return sum(f"/memfd:{self.name} " in line for line in f)


def eventfds_open() -> int:
    """Eventfds open in this process (the back-end runs in it: its copies count too)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            pass  # closed since listdir
    return count


async def send(fe: Frontend, msg: m.Request) -> None:
    data, fds = fe.conn.send(msg)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(struct.pack(f"{len(fds)}i", *fds)))]
    fe.sock.sendmsg([data], anc if fds else [])


async def assert_dropped(fe: Frontend) -> None:
    """The back-end closes the connection (a protocol error costs the front-end its session)."""
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.sock_recv(fe.sock, 64), 5) == b""


async def set_up_ring(fe: Frontend, ram: Ram, *, index: int = 0, size: int | None = QSIZE,
                      rings: tuple[int, int, int] | None = None,
                      mem: tuple[Ram, ...] | None = None, call: bool = False
                      ) -> tuple[int, int | None]:
    """What a front-end sends before it enables vring ``index``: the memory table (``mem``,
    by default ``ram`` alone; ``()`` sends none), the ring's size (``None`` sends none), the
    addresses of its descriptor table, available and used rings (``rings``, by default at the
    start of ``ram``), a call eventfd when ``call``, and a kick eventfd. Returns (kick, call)
    for the test to use and close."""
    table = (ram,) if mem is None else mem
    if table:
        await fe.request(m.SetMemTable(tuple(r.region() for r in table),
                                       tuple(r.fd for r in table)))
    if size is not None:
        await fe.request(m.SetVringNum(index, size))
    desc, avail, used = rings or (ram.uva + DESC, ram.uva + AVAIL, ram.uva + USED)
    await fe.request(m.SetVringAddr(index, 0, desc, used, avail, 0))
    call_fd = None
    if call:
        call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        await fe.request(m.SetVringCall(index, call_fd))
    kick = os.eventfd(0, os.EFD_NONBLOCK)
    await fe.request(m.SetVringKick(index, kick))
    return kick, call_fd


async def enable(fe: Frontend, index: int = 0) -> None:
    ack = await fe.request(m.SetVringEnable(index, True, need_reply=True))
    assert isinstance(ack, m.Ack) and ack.ok


async def start_ring(fe: Frontend, ram: Ram, ring_uva: int, *, mem: tuple[Ram, ...] = ()
                     ) -> tuple[int, int]:
    """Set the memory table (``mem`` or ``ram``) and start vring 0 with its rings at
    ``ring_uva``; returns the (kick, call) eventfds the test keeps."""
    kick, call = await set_up_ring(fe, ram, mem=mem or (ram,), call=True, rings=(
        ring_uva + DESC, ring_uva + AVAIL, ring_uva + USED))
    assert call is not None
    await enable(fe)
    return kick, call


@pytest.fixture
def ram():
    r = Ram(0x40000, gpa=0x100000, uva=0x7F0000000000)
    yield r
    r.close()


# ---- SET_VRING_BASE --------------------------------------------------------------------------


def test_set_vring_base_of_0xffff_is_kept_and_read_back(tmp_path) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        ack = await fe.request(m.SetVringBase(0, 0xFFFF, need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok
        reply = await fe.request(m.GetVringBase(0))
        assert isinstance(reply, m.VringBaseReply) and reply.num == 0xFFFF

    run_server(tmp_path, RecordingDevice(), body)


@pytest.mark.parametrize("base", [0x1_0000, 0xFFFF_FFFF])
def test_set_vring_base_above_16_bits_drops_the_connection(tmp_path, base: int) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        await send(fe, m.SetVringBase(0, base, need_reply=True))
        await assert_dropped(fe)

    run_server(tmp_path, RecordingDevice(), body)


# ---- front-end address translation ----------------------------------------------------------


def test_ring_addresses_translate_through_the_region_that_contains_them(tmp_path) -> None:
    # Two regions whose front-end (uva) and guest (gpa) layouts differ: a ring in the second
    # region lies above the first region's start but past its end, and must translate
    # through the second one.
    low = Ram(0x40000, gpa=0x100000, uva=0x7F0000000000)
    high = Ram(0x40000, gpa=0x800000, uva=0x7F0000100000)
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        kick, call = await start_ring(fe, high, high.uva, mem=(low, high))
        high.map[DATA:DATA + 4] = b"ring"
        high.desc(0, DATA, 4)
        high.publish(0)
        os.eventfd_write(kick, 1)
        await until(lambda: device.payloads == [b"ring"])
        assert high.used_idx() == 1
        assert low.map[:PAGE] == bytes(PAGE)  # nothing was written through the wrong region
        for fd in (kick, call):
            os.close(fd)

    try:
        run_server(tmp_path, device, body)
    finally:
        low.close()
        high.close()


@pytest.mark.parametrize("past_end", [0, PAGE])
def test_ring_address_at_or_past_the_end_of_the_only_region_drops_the_connection(
        tmp_path, ram: Ram, past_end: int) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        beyond = ram.uva + ram.size + past_end
        kick, _ = await set_up_ring(fe, ram, rings=(beyond, beyond + 0x800, beyond + 0x1000))
        os.close(kick)
        await send(fe, m.SetVringEnable(0, True, need_reply=True))
        await assert_dropped(fe)

    run_server(tmp_path, RecordingDevice(), body)


# ---- a closing session -----------------------------------------------------------------------


def test_closed_session_unmaps_guest_memory_and_closes_the_vring_eventfds(
        tmp_path, ram: Ram) -> None:
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        eventfds_before = eventfds_open()
        assert ram.mappings() == 1  # the test's own
        fe = await connect()
        await fe.negotiate()
        kick, call = await start_ring(fe, ram, ram.uva)
        err = os.eventfd(0, os.EFD_NONBLOCK)
        await fe.request(m.SetVringErr(0, err))
        await fe.request(m.SetVringCall(1, call))  # a vring that never started has fds too
        await fe.request(m.GetFeatures())  # every fd above has arrived
        session = server.session
        assert session is not None
        assert ram.mappings() == 2
        assert eventfds_open() == eventfds_before + 3 + 4  # ours + the back-end's copies

        fe.sock.close()  # the front-end goes away
        await until(lambda: session.closed.done())
        assert ram.mappings() == 1
        assert eventfds_open() == eventfds_before + 3
        for fd in (kick, call, err):
            os.close(fd)

    run_server(tmp_path, device, body)
    assert "reset" in device.events


def test_session_closed_by_a_protocol_error_gives_back_memory_and_eventfds(
        tmp_path, ram: Ram) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        eventfds_before = eventfds_open()
        fe = await connect()
        await fe.negotiate()
        kick, call = await start_ring(fe, ram, ram.uva)
        session = server.session
        assert session is not None and ram.mappings() == 2
        fe.sock.send(b"\xde\xad\xbe\xef" * 8)
        await assert_dropped(fe)
        assert session.closed.done()
        assert ram.mappings() == 1
        assert eventfds_open() == eventfds_before + 2
        for fd in (kick, call):
            os.close(fd)

    run_server(tmp_path, RecordingDevice(), body)


# ---- ADD_MEM_REG ------------------------------------------------------------------------------


def test_add_mem_reg_beyond_the_offered_slots_drops_the_connection(tmp_path) -> None:
    slots = [Ram(PAGE, gpa=0x100000 + i * 0x10000, uva=0x7F0000000000 + i * 0x10000)
             for i in range(MAX_MEM_SLOTS + 1)]

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        reply = await fe.request(m.GetMaxMemSlots())
        assert isinstance(reply, m.MaxMemSlotsReply) and reply.slots == MAX_MEM_SLOTS
        for ram in slots[:MAX_MEM_SLOTS]:
            ack = await fe.request(m.AddMemReg(ram.region(), ram.fd, need_reply=True))
            assert isinstance(ack, m.Ack) and ack.ok
        session = server.session
        assert session is not None and len(session.regions) == MAX_MEM_SLOTS
        await send(fe, m.AddMemReg(slots[-1].region(), slots[-1].fd, need_reply=True))
        await assert_dropped(fe)
        assert slots[-1].mappings() == 1  # never mapped by the back-end
        assert all(ram.mappings() == 1 for ram in slots)  # and the rest were unmapped

    try:
        run_server(tmp_path, RecordingDevice(), body)
    finally:
        for ram in slots:
            ram.close()


# ---- REM_MEM_REG, RESET_OWNER, requests the device does not serve ------------------------------


def test_rem_mem_reg_unmaps_that_region_and_rings_in_the_others_keep_working(
        tmp_path, ram: Ram) -> None:
    extra = Ram(0x10000, gpa=0x800000, uva=0x7F0000800000)
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        for r in (ram, extra):
            ack = await fe.request(m.AddMemReg(r.region(), r.fd, need_reply=True))
            assert isinstance(ack, m.Ack) and ack.ok
        kick, call = await start_ring_in_mapped_memory(fe, ram)
        assert extra.mappings() == 2
        ack = await fe.request(m.RemMemReg(extra.region(), need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok
        assert extra.mappings() == 1 and ram.mappings() == 2
        ram.map[DATA:DATA + 4] = b"kept"
        ram.desc(0, DATA, 4)
        ram.publish(0)
        os.eventfd_write(kick, 1)
        await until(lambda: device.payloads == [b"kept"])
        # A region the back-end never had is a protocol error.
        await send(fe, m.RemMemReg(extra.region(), need_reply=True))
        await assert_dropped(fe)
        for fd in (kick, call):
            os.close(fd)

    try:
        run_server(tmp_path, device, body)
    finally:
        extra.close()


async def start_ring_in_mapped_memory(fe: Frontend, ram: Ram) -> tuple[int, int]:
    """Start vring 0 with its rings at the start of ``ram`` (already in the table)."""
    kick, call = await set_up_ring(fe, ram, mem=(), call=True)
    assert call is not None
    await enable(fe)
    return kick, call


def test_reset_owner_stops_the_rings_closes_their_fds_and_forgets_features(
        tmp_path, ram: Ram) -> None:
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        eventfds_before = eventfds_open()
        fe = await connect()
        await fe.negotiate()
        kick, call = await start_ring(fe, ram, ram.uva)
        assert eventfds_open() == eventfds_before + 4
        await fe.request(m.ResetOwner())
        base = await fe.request(m.GetVringBase(0))  # answered: the session goes on
        assert isinstance(base, m.VringBaseReply) and base.num == 0
        assert ("stopped", 0) in device.events and "reset" in device.events
        assert eventfds_open() == eventfds_before + 2  # only the test's own are left
        session = server.session
        assert session is not None and session.acked_features == 0
        assert all(v.queue is None and v.kick_fd is None for v in session.vrings)
        for fd in (kick, call):
            os.close(fd)

    run_server(tmp_path, device, body)


def test_unserved_request_with_an_fd_is_refused_and_its_fd_closed(tmp_path) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        eventfds_before = eventfds_open()
        log_fd = os.eventfd(0)
        with pytest.raises(VhostUserRequestFailed, match="SET_LOG_FD"):
            await fe.request(m.SetLogFd(log_fd, need_reply=True))
        assert eventfds_open() == eventfds_before + 1  # the back-end's copy is closed
        os.close(log_fd)

    run_server(tmp_path, RecordingDevice(), body)


class DefaultsDevice(RecordingDevice):
    """Offers RARP and CONFIG but keeps VhostUserDevice's default handlers for them."""

    protocol_features = PF.RARP | PF.CONFIG


def test_device_requests_and_config_of_a_device_without_them(tmp_path) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        reply = await fe.request(m.GetFeatures())
        await fe.request(m.SetFeatures(fe.conn.negotiate_features(-1)))
        await fe.request(m.GetProtocolFeatures())
        await fe.request(m.SetProtocolFeatures(int(fe.conn.negotiate_protocol_features(
            PF.REPLY_ACK | PF.RARP | PF.CONFIG))))
        assert isinstance(reply, m.FeaturesReply)
        ack = await fe.request(m.SendRarp(b"\x52\x54\x00\x00\x00\x01", need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok  # ignored, not refused
        # An empty reply payload is the spec's failure: the front-end reports it.
        with pytest.raises(VhostUserRequestFailed, match="GET_CONFIG"):
            await fe.request(m.GetConfig(0, 8))
        with pytest.raises(VhostUserRequestFailed, match="SET_CONFIG"):
            await fe.request(m.SetConfig(0, b"\x01", need_reply=True))

    run_server(tmp_path, DefaultsDevice(), body)


class FailingDevice(RecordingDevice):
    def queue_kicked(self, vring) -> None:
        raise RuntimeError("device bug")


def test_device_failing_on_a_kick_signals_the_error_eventfd_once(tmp_path, ram: Ram) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        err = os.eventfd(0, os.EFD_NONBLOCK)
        await fe.request(m.SetVringErr(0, err))
        kick, call = await start_ring(fe, ram, ram.uva)
        os.eventfd_write(kick, 1)
        await until(lambda: _readable(err))
        assert os.eventfd_read(err) == 1
        os.eventfd_write(kick, 1)
        await asyncio.sleep(0.2)  # a second failure on the same broken ring...
        assert not _readable(err)  # ...is not signalled again
        for fd in (kick, call, err):
            os.close(fd)

    run_server(tmp_path, FailingDevice(), body)


def _readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [], 0)[0])


def test_rem_mem_reg_must_match_address_size_and_front_end_address(tmp_path, ram: Ram) -> None:
    region = ram.region()
    near_misses = [
        m.MemoryRegion(region.guest_phys_addr, region.memory_size // 2, region.userspace_addr, 0),
        m.MemoryRegion(region.guest_phys_addr, region.memory_size, region.userspace_addr + PAGE, 0),
        m.MemoryRegion(region.guest_phys_addr + PAGE, region.memory_size, region.userspace_addr, 0),
    ]
    for wrong in near_misses:
        async def body(server: VhostUserServer, connect, wrong=wrong) -> None:
            fe = await connect()
            await fe.negotiate()
            ack = await fe.request(m.AddMemReg(region, ram.fd, need_reply=True))
            assert isinstance(ack, m.Ack) and ack.ok
            await send(fe, m.RemMemReg(wrong, need_reply=True))
            await assert_dropped(fe)  # not the region it has: a protocol error

        run_server(tmp_path, RecordingDevice(), body)


def test_rings_restart_after_reset_owner(tmp_path, ram: Ram) -> None:
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        kick, call = await start_ring(fe, ram, ram.uva)
        await fe.request(m.ResetOwner())
        await fe.negotiate()
        device.events.clear()
        kick2, call2 = await start_ring(fe, ram, ram.uva)
        assert device.events == [("started", 0)]
        ram.desc(0, DATA, 2)
        ram.map[DATA:DATA + 2] = b"ok"
        ram.publish(0)
        os.eventfd_write(kick2, 1)
        await until(lambda: device.payloads == [b"ok"])
        for fd in (kick, call, kick2, call2):
            os.close(fd)

    run_server(tmp_path, device, body)


def test_get_config_success_echoes_offset_and_flags(tmp_path) -> None:
    class ConfigDevice(RecordingDevice):
        protocol_features = PF.CONFIG

        def config(self, offset: int, size: int) -> bytes:
            return bytes(range(offset, offset + size))

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.request(m.GetFeatures())
        await fe.request(m.SetFeatures(fe.conn.negotiate_features(-1)))
        await fe.request(m.GetProtocolFeatures())
        await fe.request(m.SetProtocolFeatures(int(fe.conn.negotiate_protocol_features(
            PF.REPLY_ACK | PF.CONFIG))))
        reply = await fe.request(m.GetConfig(4, 4, flags=1))
        assert isinstance(reply, m.ConfigReply)
        assert (reply.offset, reply.data, reply.flags) == (4, bytes([4, 5, 6, 7]), 1)

    run_server(tmp_path, ConfigDevice(), body)


def test_default_device_config_of_any_size_fails(tmp_path) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.request(m.GetFeatures())
        await fe.request(m.SetFeatures(fe.conn.negotiate_features(-1)))
        await fe.request(m.GetProtocolFeatures())
        await fe.request(m.SetProtocolFeatures(int(fe.conn.negotiate_protocol_features(
            PF.REPLY_ACK | PF.CONFIG))))
        for size in (1, 4, 8):
            with pytest.raises(VhostUserRequestFailed, match="GET_CONFIG"):
                await fe.request(m.GetConfig(0, size))

    run_server(tmp_path, DefaultsDevice(), body)


# ---- GET_INFLIGHT_FD -------------------------------------------------------------------------


class InflightDevice(RecordingDevice):
    protocol_features = PF.INFLIGHT_SHMFD


async def inflight_session(fe: Frontend) -> None:
    await fe.request(m.GetFeatures())
    await fe.request(m.SetFeatures(fe.conn.negotiate_features(-1)))
    await fe.request(m.GetProtocolFeatures())
    await fe.request(m.SetProtocolFeatures(int(fe.conn.negotiate_protocol_features(
        PF.REPLY_ACK | PF.INFLIGHT_SHMFD))))
    await fe.request(m.SetOwner())


@pytest.mark.parametrize("queues, size", [(1, 1), (2, 32768)])
def test_inflight_region_is_sealed_and_sized_for_the_queues_asked(
        tmp_path, queues: int, size: int) -> None:
    from pymvm.vhost.user.inflight import queue_region_size
    from tests.unit.test_vhost_user_blk import request_with_fds

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await inflight_session(fe)
        reply = await request_with_fds(fe, m.GetInflightFd(num_queues=queues, queue_size=size))
        assert isinstance(reply, m.InflightFdReply)
        try:
            assert reply.mmap_size == queues * queue_region_size(size)
            assert os.fstat(reply.fd).st_size == reply.mmap_size
            seals = fcntl.fcntl(reply.fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_SEAL
        finally:
            os.close(reply.fd)

    run_server(tmp_path, InflightDevice(), body)


@pytest.mark.parametrize("queues, size", [(0, 8), (3, 8), (1, 0), (1, 32769)])
def test_inflight_request_outside_the_device_drops_the_connection(
        tmp_path, queues: int, size: int) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await inflight_session(fe)
        await send(fe, m.GetInflightFd(num_queues=queues, queue_size=size))
        await assert_dropped(fe)

    run_server(tmp_path, InflightDevice(), body)


def test_descriptor_table_starting_exactly_at_the_region_end_drops_the_connection(
        tmp_path, ram: Ram) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        end = ram.uva + ram.size  # the first address past the region
        kick, _ = await set_up_ring(fe, ram, rings=(end, ram.uva + AVAIL, ram.uva + USED))
        os.close(kick)
        await send(fe, m.SetVringEnable(0, True, need_reply=True))
        await assert_dropped(fe)

    run_server(tmp_path, RecordingDevice(), body)


def test_buffers_published_before_the_ring_starts_are_processed_without_a_kick(
        tmp_path, ram: Ram) -> None:
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        ram.map[DATA:DATA + 5] = b"early"
        ram.desc(0, DATA, 5)
        ram.publish(0)
        kick, call = await start_ring(fe, ram, ram.uva)  # no eventfd_write(kick)
        await until(lambda: device.payloads == [b"early"])
        for fd in (kick, call):
            os.close(fd)

    run_server(tmp_path, device, body)


@pytest.mark.parametrize("acked_indirect", [True, False])
def test_indirect_descriptors_are_followed_only_when_indirect_was_acked(
        tmp_path, ram: Ram, acked_indirect: bool) -> None:
    from pymvm.devices.virtio.constants import VIRTIO_F_VERSION_1, VIRTIO_RING_F_INDIRECT_DESC

    device = RecordingDevice()
    table = DATA + 0x1000  # the indirect table: one descriptor pointing at the payload

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.request(m.GetFeatures())
        features = 1 << VIRTIO_F_VERSION_1 | m.PROTOCOL_FEATURES_FLAG
        if acked_indirect:
            features |= 1 << VIRTIO_RING_F_INDIRECT_DESC
        await fe.request(m.SetFeatures(features))
        await fe.request(m.GetProtocolFeatures())
        await fe.request(m.SetProtocolFeatures(int(fe.conn.negotiate_protocol_features(
            PF.REPLY_ACK))))
        await fe.request(m.SetOwner())
        kick, call = await start_ring(fe, ram, ram.uva)
        ram.map[DATA:DATA + 8] = b"indirect"
        struct.pack_into("<QIHH", ram.map, table, ram.gpa + DATA, 8, 0, 0)
        struct.pack_into("<QIHH", ram.map, DESC, ram.gpa + table, 16, VRING_DESC_F_INDIRECT, 0)
        ram.publish(0)
        os.eventfd_write(kick, 1)
        if acked_indirect:
            await until(lambda: device.payloads == [b"indirect"])
        else:
            await asyncio.sleep(0.3)
            assert device.payloads == []  # the device never saw the buffer behind the table
        for fd in (kick, call):
            os.close(fd)

    run_server(tmp_path, device, body)
