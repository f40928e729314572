"""vhost-user back-end behaviour the mutation run of issue 16 found unchecked (docs/mutation.md):
how a guest memory region's fd is vetted (sealing, size, --allow-unsealed-memory), what a
protocol error tells the operator in the disconnect reason, when a ring (re)starts, EVENT_IDX,
eventfds a front-end replaces, and the inflight record of chains a device holds."""

from __future__ import annotations

import asyncio
import mmap
import os
import socket
import struct
from pathlib import Path

import pytest
import structlog

from pymvm.devices.virtio.constants import VIRTIO_RING_F_EVENT_IDX
from pymvm.vhost.user import messages as m
from pymvm.vhost.user.backend import (
    MAX_MEM_SLOTS,
    VhostUserBackendError,
    VhostUserServer,
    _map_region,
)
from pymvm.vhost.user.errors import VhostUserRemoteError
from pymvm.vhost.user.inflight import InflightQueue, queue_region_size
from pymvm.vhost.user.messages import ProtocolFeature as PF
from tests.unit.test_vhost_user_backend import (
    AVAIL,
    DATA,
    DESC,
    DEVICE_FEATURES,
    QSIZE,
    USED,
    Frontend,
    RecordingDevice,
    run_server,
    until,
)
from tests.unit.test_vhost_user_backend_session import (
    PAGE,
    InflightDevice,
    Ram,
    _readable,
    assert_dropped,
    enable,
    eventfds_open,
    inflight_session,
    send,
    set_up_ring,
    start_ring,
)
from tests.unit.test_vhost_user_blk import request_with_fds

GPA = 0x100000
UVA = 0x7F0000000000
UNSEALED_FIX = "start the back-end with --allow-unsealed-memory if the front-end is trusted"


def region(size: int = 0x10000, offset: int = 0) -> m.MemoryRegion:
    return m.MemoryRegion(GPA, size, UVA, offset)


def memfd(size: int, *, sealable: bool = True) -> int:
    fd = os.memfd_create("vu-mutants", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0))
    os.ftruncate(fd, size)
    return fd


def serve(tmp_path: Path, device, body, **server_args) -> list[str]:
    """Run ``body(server, connect)`` against a back-end server; returns the reasons of the
    sessions it closed (what the operator reads in the log)."""
    with structlog.testing.capture_logs() as logs:
        run_server(tmp_path, device, body, **server_args)
    return [e["reason"] for e in logs if e["event"] == "vhost_user.disconnected"]


# ---- a region's fd ---------------------------------------------------------------------------


def test_sealable_memfd_is_sealed_against_shrinking_when_mapped() -> None:
    fd = memfd(0x10000)
    try:
        mapped = _map_region(region(), fd)
        try:
            with pytest.raises(PermissionError):
                os.ftruncate(fd, 0)  # the front-end can no longer take the pages away
            mapped.view[:4] = b"ring"
            assert os.pread(fd, 4, 0) == b"ring"  # shared with the front-end, not a copy
        finally:
            mapped.close()
    finally:
        os.close(fd)


def test_memfd_that_cannot_be_sealed_is_refused_naming_the_region_and_the_fix() -> None:
    fd = memfd(0x10000, sealable=False)
    try:
        with pytest.raises(VhostUserRemoteError) as refused:
            _map_region(region(), fd)
    finally:
        os.close(fd)
    text = str(refused.value)
    assert text.startswith("memory region gpa=0x100000 size=0x10000: its fd is a memfd that "
                           "cannot be sealed, so the front-end could shrink it")
    assert "pass a memfd with F_SEAL_SHRINK (or MFD_ALLOW_SEALING)" in text
    assert UNSEALED_FIX in text


def test_file_that_is_no_memfd_is_refused_as_such(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 0x10000)
    try:
        with pytest.raises(VhostUserRemoteError) as refused:
            _map_region(region(), fd)
    finally:
        os.close(fd)
    text = str(refused.value)
    assert text.startswith("memory region gpa=0x100000 size=0x10000: its fd is not a memfd")
    assert UNSEALED_FIX in text


def test_allow_unsealed_maps_a_plain_file_and_an_unsealable_memfd(tmp_path: Path) -> None:
    plain = os.open(tmp_path / "ram", os.O_RDWR | os.O_CREAT)
    os.ftruncate(plain, 0x10000)
    for fd in (plain, memfd(0x10000, sealable=False)):
        try:
            mapped = _map_region(region(), fd, allow_unsealed=True)
            mapped.view[:2] = b"ok"
            assert os.pread(fd, 2, 0) == b"ok"
            mapped.close()
        finally:
            os.close(fd)


@pytest.mark.parametrize("allow_unsealed", [False, True])
def test_region_past_the_end_of_its_fd_is_refused_with_both_sizes(allow_unsealed: bool) -> None:
    fd = memfd(0x1000)
    try:
        with pytest.raises(VhostUserRemoteError) as refused:
            _map_region(region(0x10000, offset=0x800), fd, allow_unsealed=allow_unsealed)
    finally:
        os.close(fd)
    assert str(refused.value) == (
        "memory region gpa=0x100000 size=0x10000: needs 0x10800 bytes of its fd "
        "(mmap_offset + size), the file has 0x1000")


def test_region_whose_fd_is_closed_is_refused_as_unstattable() -> None:
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)  # a number that names no open file
    with pytest.raises(VhostUserRemoteError) as refused:
        _map_region(region(), fd, allow_unsealed=True)
    assert str(refused.value) == ("memory region gpa=0x100000 size=0x10000: cannot stat its fd: "
                                  "Bad file descriptor")


def test_region_whose_fd_cannot_be_mapped_is_refused_naming_region_and_offset() -> None:
    r, w = os.pipe()  # no memfd, no size to check, and mmap says ENODEV
    try:
        with pytest.raises(VhostUserRemoteError) as refused:
            _map_region(region(0x1000, offset=0x10), r, allow_unsealed=True)
    finally:
        os.close(r)
        os.close(w)
    assert str(refused.value).startswith(
        "cannot mmap memory region gpa=0x100000 size=0x1000 offset=0x10: ")


def test_region_of_size_zero_is_refused_and_one_byte_is_mapped() -> None:
    fd = memfd(0x1000)
    try:
        with pytest.raises(VhostUserRemoteError) as refused:
            _map_region(region(0), fd)
        assert str(refused.value) == "memory region of size 0"
        mapped = _map_region(region(1), fd)
        assert len(mapped.view) == 1
        mapped.close()
    finally:
        os.close(fd)


def test_server_with_allow_unsealed_memory_takes_unsealable_guest_memory_and_inflight_region(
        tmp_path: Path) -> None:
    ram, inflight = memfd(0x40000, sealable=False), memfd(queue_region_size(QSIZE), sealable=False)

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await inflight_session(fe)
        ack = await fe.request(m.SetMemTable((region(0x40000),), (ram,), need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok
        ack = await fe.request(m.SetInflightFd(queue_region_size(QSIZE), 0, 1, QSIZE,
                                               inflight, need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok

    try:
        serve(tmp_path, InflightDevice(), body, allow_unsealed_memory=True)
    finally:
        os.close(ram)
        os.close(inflight)


# ---- what a protocol error tells the operator -------------------------------------------------


@pytest.mark.parametrize("which", ["descriptor table", "available ring", "used ring"])
def test_ring_part_outside_guest_memory_is_named_in_the_disconnect_reason(
        tmp_path: Path, ram: Ram, which: str) -> None:
    outside = ram.uva + ram.size + 0x1000
    addr = {"descriptor table": ram.uva + DESC, "available ring": ram.uva + AVAIL,
            "used ring": ram.uva + USED} | {which: outside}

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        kick, _ = await set_up_ring(fe, ram, rings=(
            addr["descriptor table"], addr["available ring"], addr["used ring"]))
        os.close(kick)
        await send(fe, m.SetVringEnable(0, True, need_reply=True))
        await assert_dropped(fe)

    reasons = serve(tmp_path, RecordingDevice(), body)
    assert reasons == [f"protocol error: {which} address {outside:#x} is in no memory region"]


async def inflight_region(fe: Frontend) -> m.InflightFdReply:
    """GET_INFLIGHT_FD for the one test queue (after inflight_session); the caller owns the
    reply's fd."""
    reply = await request_with_fds(fe, m.GetInflightFd(num_queues=1, queue_size=QSIZE))
    assert isinstance(reply, m.InflightFdReply)
    return reply


async def own_with_reply_ack(fe: Frontend, features: int) -> None:
    """The handshake these tests share: ``features`` set, REPLY_ACK negotiated, SET_OWNER."""
    await fe.request(m.GetFeatures())
    await fe.request(m.SetFeatures(features))
    await fe.request(m.GetProtocolFeatures())
    await fe.request(m.SetProtocolFeatures(int(fe.conn.negotiate_protocol_features(PF.REPLY_ACK))))
    await fe.request(m.SetOwner())


async def _vring_base_too_big(fe: Frontend, ram: Ram) -> None:
    await send(fe, m.SetVringBase(0, 0x1_0000, need_reply=True))


async def _rem_unknown_region(fe: Frontend, ram: Ram) -> None:
    await send(fe, m.RemMemReg(m.MemoryRegion(0x800000, PAGE, UVA + 0x800000, 0), need_reply=True))


async def _overlapping_regions(fe: Frontend, ram: Ram) -> None:
    other = m.MemoryRegion(ram.gpa + PAGE, PAGE, ram.uva + ram.size, 0)
    await send(fe, m.SetMemTable((ram.region(), other), (ram.fd, ram.fd), need_reply=True))


async def _queue_size_not_a_power_of_two(fe: Frontend, ram: Ram) -> None:
    kick, _ = await set_up_ring(fe, ram, size=3)
    os.close(kick)
    await send(fe, m.SetVringEnable(0, True, need_reply=True))


async def _one_region_beyond_the_slots(fe: Frontend, ram: Ram) -> None:
    regions = [m.MemoryRegion(GPA + i * PAGE, PAGE, UVA + i * PAGE, i * PAGE)
               for i in range(MAX_MEM_SLOTS + 1)]
    for r in regions[:-1]:
        ack = await fe.request(m.AddMemReg(r, ram.fd, need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok
    await send(fe, m.AddMemReg(regions[-1], ram.fd, need_reply=True))


@pytest.mark.parametrize("misbehave, reason", [
    (_vring_base_too_big, "SET_VRING_BASE 0x10000 does not fit a split ring's u16"),
    (_rem_unknown_region, "REM_MEM_REG of unknown region at 0x800000"),
    (_overlapping_regions, ("bad memory table: guest memory region at 0x101000 overlaps the "
                            "region ending at 0x140000; regions must be disjoint")),
    (_queue_size_not_a_power_of_two, "vring0: queue size 3 is not a power of two"),
    (_one_region_beyond_the_slots, f"ADD_MEM_REG beyond the {MAX_MEM_SLOTS} slots we offered"),
], ids=["vring-base", "rem-mem-reg", "overlap", "queue-size", "mem-slots"])
def test_protocol_error_names_the_problem_in_the_disconnect_reason(
        tmp_path: Path, ram: Ram, misbehave, reason: str) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        await misbehave(fe, ram)
        await assert_dropped(fe)

    reasons = serve(tmp_path, RecordingDevice(), body)
    assert len(reasons) == 1 and reasons[0].startswith(f"protocol error: {reason}"), reasons


@pytest.mark.parametrize("queues, size, accepted", [
    (1, 1, True), (2, 32768, True), (0, 8, False), (3, 8, False), (1, 0, False), (1, 32769, False),
])
def test_set_inflight_fd_takes_only_queues_the_device_has(
        tmp_path: Path, queues: int, size: int, accepted: bool) -> None:
    need = max(queues, 1) * queue_region_size(max(size, 1))
    fd = memfd(need)

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await inflight_session(fe)
        msg = m.SetInflightFd(need, 0, queues, size, fd, need_reply=True)
        if accepted:
            ack = await fe.request(msg)
            assert isinstance(ack, m.Ack) and ack.ok
        else:
            await send(fe, msg)
            await assert_dropped(fe)

    try:
        reasons = serve(tmp_path, InflightDevice(), body)
    finally:
        os.close(fd)
    if not accepted:
        assert reasons == [(f"protocol error: SET_INFLIGHT_FD for {queues} queues of {size}: "
                            f"this device has 2 queues of at most 32768 entries")]


def test_set_inflight_fd_smaller_than_its_queues_need_is_refused(tmp_path: Path) -> None:
    need = 2 * queue_region_size(QSIZE)
    fd = memfd(need)

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await inflight_session(fe)
        await send(fe, m.SetInflightFd(need - 1, 0, 2, QSIZE, fd, need_reply=True))
        await assert_dropped(fe)

    try:
        reasons = serve(tmp_path, InflightDevice(), body)
    finally:
        os.close(fd)
    assert reasons == [(f"protocol error: SET_INFLIGHT_FD region of {need - 1} bytes; 2 queues "
                        f"of {QSIZE} need {need}")]


# ---- when a ring runs ------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["size", "memory"])
def test_ring_enabled_before_its_size_or_memory_is_set_is_not_started(
        tmp_path: Path, ram: Ram, missing: str) -> None:
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        kick, _ = await set_up_ring(fe, ram, mem=() if missing == "memory" else None,
                                    size=None if missing == "size" else QSIZE)
        ack = await fe.request(m.SetVringEnable(0, True, need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok
        assert isinstance(await fe.request(m.GetFeatures()), m.FeaturesReply)  # still served
        os.close(kick)

    serve(tmp_path, device, body)
    assert ("started", 0) not in device.events


def test_without_protocol_features_a_ring_runs_from_its_kick_without_set_vring_enable(
        tmp_path: Path, ram: Ram) -> None:
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.request(m.GetFeatures())
        await fe.request(m.SetFeatures(fe.conn.negotiate_features(DEVICE_FEATURES)))
        await fe.request(m.SetOwner())
        kick, _ = await set_up_ring(fe, ram)
        ram.map[DATA:DATA + 5] = b"early"
        ram.desc(0, DATA, 5)
        ram.publish(0)
        os.eventfd_write(kick, 1)
        await until(lambda: device.payloads == [b"early"])
        os.close(kick)

    serve(tmp_path, device, body)


def _publish_at(ram: Ram, base: int, head: int, payload: bytes) -> None:
    """A one-descriptor chain in rings at ``base`` (offset in ``ram``), its avail index 1."""
    ram.map[DATA:DATA + len(payload)] = payload
    struct.pack_into("<QIHH", ram.map, base + DESC + 16 * head, ram.gpa + DATA, len(payload), 0, 0)
    struct.pack_into("<H", ram.map, base + AVAIL + 4, head)
    struct.pack_into("<H", ram.map, base + AVAIL + 2, 1)


def test_moving_a_running_ring_restarts_it_at_the_new_address(tmp_path: Path, ram: Ram) -> None:
    device = RecordingDevice()
    moved = 0x20000

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        kick, call = await start_ring(fe, ram, ram.uva)
        uva = ram.uva + moved
        await fe.request(m.SetVringAddr(0, 0, uva + DESC, uva + USED, uva + AVAIL, 0))
        _publish_at(ram, moved, 0, b"moved")
        os.eventfd_write(kick, 1)
        await until(lambda: device.payloads == [b"moved"])
        assert struct.unpack_from("<H", ram.map, moved + USED + 2)[0] == 1
        for fd in (kick, call):
            os.close(fd)

    serve(tmp_path, device, body)
    assert device.events[:3] == [("started", 0), ("stopped", 0), ("started", 0)]


def test_resizing_a_running_ring_restarts_it_with_the_new_size(tmp_path: Path, ram: Ram) -> None:
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        kick, call = await start_ring(fe, ram, ram.uva)
        assert isinstance(await fe.request(m.SetVringNum(0, 4, need_reply=True)), m.Ack)
        session = server.session
        assert session is not None and session.vrings[0].queue is not None
        assert session.vrings[0].queue.size == 4
        for fd in (kick, call):
            os.close(fd)

    serve(tmp_path, device, body)
    assert device.events[:3] == [("started", 0), ("stopped", 0), ("started", 0)]


def test_ring_stopped_by_get_vring_base_runs_again_only_after_a_new_kick(
        tmp_path: Path, ram: Ram) -> None:
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        kick, call = await start_ring(fe, ram, ram.uva)
        assert isinstance(await fe.request(m.GetVringBase(0)), m.VringBaseReply)
        ack = await fe.request(m.SetVringEnable(0, True, need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok
        ram.map[DATA:DATA + 4] = b"late"
        ram.desc(0, DATA, 4)
        ram.publish(0)
        await asyncio.sleep(0.1)
        assert device.payloads == [] and device.events.count(("started", 0)) == 1
        new_kick = os.eventfd(0, os.EFD_NONBLOCK)
        await fe.request(m.SetVringKick(0, new_kick))  # started again: takes what is waiting
        await until(lambda: device.payloads == [b"late"])
        for fd in (kick, call, new_kick):
            os.close(fd)

    serve(tmp_path, device, body)


class EventIdxDevice(RecordingDevice):
    def features(self) -> int:
        return DEVICE_FEATURES | 1 << VIRTIO_RING_F_EVENT_IDX


@pytest.mark.parametrize("acked", [True, False], ids=["event-idx", "no-event-idx"])
def test_used_event_holds_back_the_call_only_when_event_idx_was_acked(
        tmp_path: Path, ram: Ram, acked: bool) -> None:
    device = EventIdxDevice()
    wanted = device.features() & ~(0 if acked else 1 << VIRTIO_RING_F_EVENT_IDX)

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.request(m.GetFeatures())
        await fe.request(m.SetFeatures(fe.conn.negotiate_features(wanted | m.PROTOCOL_FEATURES_FLAG)))
        await fe.request(m.GetProtocolFeatures())
        await fe.request(m.SetProtocolFeatures(int(fe.conn.negotiate_protocol_features(
            PF.REPLY_ACK))))
        await fe.request(m.SetOwner())
        err = os.eventfd(0, os.EFD_NONBLOCK)
        await fe.request(m.SetVringErr(0, err))
        kick, call = await start_ring(fe, ram, ram.uva)
        struct.pack_into("<H", ram.map, AVAIL + 4 + 2 * QSIZE, 5)  # used_event: call me at 6
        for n, payload in enumerate((b"one", b"two"), 1):
            ram.map[DATA:DATA + 3] = payload
            ram.desc(n - 1, DATA, 3)
            ram.publish(n - 1)
            os.eventfd_write(kick, 1)
            await until(lambda n=n: len(device.payloads) == n)
            assert ram.used_idx() == n
            if n == 1:  # the first batch is always signalled (nothing told yet)
                assert _readable(call)
                os.eventfd_read(call)
        assert _readable(call) is not acked  # the second one only without EVENT_IDX
        assert not _readable(err)  # a healthy ring reports no error
        for fd in (kick, call, err):
            os.close(fd)

    serve(tmp_path, device, body)


class FeatureRecordingDevice(EventIdxDevice):
    def __init__(self) -> None:
        super().__init__()
        self.acked: list[int] = []

    def set_features(self, acked: int) -> None:
        self.acked.append(acked)


def test_features_set_while_a_ring_runs_reach_the_device_and_the_running_ring(
        tmp_path: Path, ram: Ram) -> None:
    from pymvm.devices.virtio.constants import (
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
    )
    from pymvm.devices.virtio.queue import VRING_DESC_F_INDIRECT

    device = FeatureRecordingDevice()
    plain = 1 << VIRTIO_F_VERSION_1 | m.PROTOCOL_FEATURES_FLAG
    more = plain | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC
    table = DATA + 0x1000  # an indirect table: one descriptor pointing at the payload

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await own_with_reply_ack(fe, plain)
        kick, call = await start_ring(fe, ram, ram.uva)
        ack = await fe.request(m.SetFeatures(more, need_reply=True))  # the ring keeps running
        assert isinstance(ack, m.Ack) and ack.ok
        struct.pack_into("<H", ram.map, AVAIL + 4 + 2 * QSIZE, 5)  # used_event: call me at 6
        for n, head in enumerate((0, 1), 1):
            ram.map[DATA:DATA + 8] = b"indirect"
            struct.pack_into("<QIHH", ram.map, table, ram.gpa + DATA, 8, 0, 0)
            struct.pack_into("<QIHH", ram.map, DESC + 16 * head, ram.gpa + table, 16,
                             VRING_DESC_F_INDIRECT, 0)
            ram.publish(head)
            os.eventfd_write(kick, 1)
            await until(lambda n=n: len(device.payloads) == n)  # INDIRECT_DESC is followed
            if n == 1:
                assert _readable(call)  # the first batch is always signalled
                os.eventfd_read(call)
        assert not _readable(call)  # EVENT_IDX: used_event holds the second call back
        for fd in (kick, call):
            os.close(fd)

    serve(tmp_path, device, body)
    assert device.acked == [plain, more]
    assert device.payloads == [b"indirect", b"indirect"]


def test_features_withdrawn_while_a_ring_runs_stop_applying_to_it(tmp_path: Path, ram: Ram) -> None:
    from pymvm.devices.virtio.constants import (
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
    )
    from pymvm.devices.virtio.queue import VRING_DESC_F_INDIRECT

    device = FeatureRecordingDevice()
    plain = 1 << VIRTIO_F_VERSION_1 | m.PROTOCOL_FEATURES_FLAG
    more = plain | 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await own_with_reply_ack(fe, more)
        kick, call = await start_ring(fe, ram, ram.uva)
        ack = await fe.request(m.SetFeatures(plain, need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok
        struct.pack_into("<H", ram.map, AVAIL + 4 + 2 * QSIZE, 5)  # ignored without EVENT_IDX
        for n in (1, 2):
            ram.map[DATA:DATA + 5] = b"plain"
            ram.desc(n - 1, DATA, 5)
            ram.publish(n - 1)
            os.eventfd_write(kick, 1)
            await until(lambda n=n: len(device.payloads) == n)
            assert _readable(call)  # every batch is signalled
            os.eventfd_read(call)
        table = DATA + 0x1000
        struct.pack_into("<QIHH", ram.map, table, ram.gpa + DATA, 5, 0, 0)
        struct.pack_into("<QIHH", ram.map, DESC + 16 * 2, ram.gpa + table, 16,
                         VRING_DESC_F_INDIRECT, 0)
        ram.publish(2)
        os.eventfd_write(kick, 1)
        await asyncio.sleep(0.2)
        assert len(device.payloads) == 2  # an indirect table is no longer followed
        for fd in (kick, call):
            os.close(fd)

    serve(tmp_path, device, body)


class FailingOnceDevice(RecordingDevice):
    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    def queue_kicked(self, vring) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("device bug")
        super().queue_kicked(vring)


def test_ring_whose_device_failed_on_a_kick_takes_no_more_buffers(tmp_path: Path, ram: Ram) -> None:
    device = FailingOnceDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        err = os.eventfd(0, os.EFD_NONBLOCK)
        await fe.request(m.SetVringErr(0, err))
        kick, call = await start_ring(fe, ram, ram.uva)
        os.eventfd_write(kick, 1)
        await until(lambda: _readable(err))
        ram.map[DATA:DATA + 5] = b"after"
        ram.desc(0, DATA, 5)
        ram.publish(0)
        os.eventfd_write(kick, 1)
        await asyncio.sleep(0.2)
        assert device.payloads == [] and ram.used_idx() == 0  # broken until the ring restarts
        for fd in (kick, call, err):
            os.close(fd)

    serve(tmp_path, device, body)


# ---- eventfds the front-end replaces -----------------------------------------------------------


def test_replaced_kick_call_and_err_eventfds_are_closed_and_the_new_ones_used(
        tmp_path: Path, ram: Ram) -> None:
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        before = eventfds_open()
        fe = await connect()
        await fe.negotiate()
        err = os.eventfd(0, os.EFD_NONBLOCK)
        await fe.request(m.SetVringErr(0, err))
        kick, call = await start_ring(fe, ram, ram.uva)
        new = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(3)]
        await fe.request(m.SetVringKick(0, new[0]))
        await fe.request(m.SetVringCall(0, new[1]))
        await fe.request(m.SetVringErr(0, new[2]))
        await fe.request(m.GetFeatures())  # every fd above has arrived
        assert eventfds_open() == before + 6 + 3  # ours, and the back-end's copies of the new
        ram.map[DATA:DATA + 3] = b"new"
        ram.desc(0, DATA, 3)
        ram.publish(0)
        os.eventfd_write(new[0], 1)
        await until(lambda: device.payloads == [b"new"])
        await until(lambda: _readable(new[1]))
        assert not _readable(call)
        for fd in (kick, call, err, *new):
            os.close(fd)

    serve(tmp_path, device, body)


def test_kick_fd_that_cannot_be_read_is_dropped_once_and_the_session_goes_on(
        tmp_path: Path, ram: Ram) -> None:
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        kick, _ = await set_up_ring(fe, ram)
        os.close(kick)
        read_end, write_end = os.pipe()
        os.close(read_end)  # the write end now polls as an error and cannot be read
        await fe.request(m.SetVringKick(0, write_end))
        os.close(write_end)
        await enable(fe)
        await asyncio.sleep(0.3)  # a reader left behind would be called again and again
        assert isinstance(await fe.request(m.GetFeatures()), m.FeaturesReply)

    with structlog.testing.capture_logs() as logs:
        run_server(tmp_path, device, body)
    failed = [e for e in logs if e["event"] == "vhost_user.kick_read_failed"]
    assert len(failed) == 1 and failed[0]["vring"] == 0


@pytest.mark.parametrize("with_fd", [True, False])
def test_kick_without_an_fd_is_logged_as_polling_the_back_end_does_not_do(
        tmp_path: Path, ram: Ram, with_fd: bool) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        kick = os.eventfd(0, os.EFD_NONBLOCK) if with_fd else None
        await fe.request(m.SetVringKick(0, kick))
        if kick is not None:
            os.close(kick)
        assert isinstance(await fe.request(m.GetFeatures()), m.FeaturesReply)

    with structlog.testing.capture_logs() as logs:
        run_server(tmp_path, RecordingDevice(), body)
    warned = [e for e in logs if e["event"] == "vhost_user.kick_polling_unsupported"]
    assert len(warned) == (0 if with_fd else 1)


# ---- inflight record -------------------------------------------------------------------------


class HoldingDevice(InflightDevice):
    """Takes chains off the ring and keeps them (a request still being served)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[int] = []

    def queue_kicked(self, vring) -> None:
        while (chain := vring.pop()) is not None:
            self.held.append(chain.head)


def test_chain_a_device_holds_is_recorded_in_flight_for_the_next_back_end(
        tmp_path: Path, ram: Ram) -> None:
    device = HoldingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await inflight_session(fe)
        reply = await inflight_region(fe)
        record = mmap.mmap(reply.fd, reply.mmap_size)
        os.close(reply.fd)
        kick, call = await start_ring(fe, ram, ram.uva)
        ram.desc(3, DATA, 16)
        ram.publish(3)
        os.eventfd_write(kick, 1)
        await until(lambda: device.held == [3])
        view = memoryview(record)
        # What a restarted back-end would read: head 3 is to be run again.
        assert InflightQueue(view, QSIZE).recover(ram.used_idx()).heads == (3,)
        view.release()
        record.close()
        for fd in (kick, call):
            os.close(fd)

    serve(tmp_path, device, body)


def test_malformed_chain_handed_back_moves_the_inflight_used_index_and_the_ring_goes_on(
        tmp_path: Path, ram: Ram) -> None:
    device = HoldingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await inflight_session(fe)
        reply = await inflight_region(fe)
        record = mmap.mmap(reply.fd, reply.mmap_size)
        os.close(reply.fd)
        kick, call = await start_ring(fe, ram, ram.uva)
        ram.desc(1, ram.size + PAGE, 16)  # outside guest memory: dropped as used
        ram.publish(1)
        ram.desc(2, DATA, 16)
        ram.publish(2)
        os.eventfd_write(kick, 1)
        await until(lambda: device.held == [2])
        assert ram.used_idx() == 1
        view = memoryview(record)
        assert InflightQueue(view, QSIZE).used_idx == 1
        view.release()
        record.close()
        for fd in (kick, call):
            os.close(fd)

    serve(tmp_path, device, body)


@pytest.mark.parametrize("ring, region_queues, region_size", [(1, 1, QSIZE), (0, 1, 2 * QSIZE)],
                         ids=["ring-past-the-region's-queues", "ring-of-another-size"])
def test_ring_the_inflight_region_does_not_fit_runs_untracked(
        tmp_path: Path, ram: Ram, ring: int, region_queues: int, region_size: int) -> None:
    device = HoldingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await inflight_session(fe)
        reply = await request_with_fds(fe, m.GetInflightFd(num_queues=region_queues,
                                                           queue_size=region_size))
        assert isinstance(reply, m.InflightFdReply)
        record = mmap.mmap(reply.fd, reply.mmap_size)
        os.close(reply.fd)
        kick, call = await set_up_ring(fe, ram, index=ring, call=True)
        await enable(fe, ring)
        ram.desc(3, DATA, 16)
        ram.publish(3)
        os.eventfd_write(kick, 1)
        await until(lambda: device.held == [3])
        view = memoryview(record)
        assert InflightQueue(view, region_size).pending() == []  # not recorded anywhere
        view.release()
        record.close()
        for fd in (kick, call):
            os.close(fd)

    serve(tmp_path, device, body)


class ThreeQueueDevice(RecordingDevice):
    num_queues = 3


class FourQueueDevice(RecordingDevice):
    num_queues = 4


@pytest.mark.parametrize("device, mq", [(RecordingDevice(), False), (ThreeQueueDevice(), True),
                                        (FourQueueDevice(), True)],
                         ids=["two-queues", "three-queues", "four-queues"])
def test_multiqueue_is_offered_above_two_queues_and_get_queue_num_counts_them(
        tmp_path: Path, device, mq: bool) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.request(m.GetFeatures())
        reply = await fe.request(m.GetProtocolFeatures())
        assert isinstance(reply, m.ProtocolFeaturesReply)
        assert bool(reply.features & PF.MQ) is mq
        if mq:
            await fe.request(m.SetProtocolFeatures(int(PF.MQ | PF.REPLY_ACK)))
            count = await fe.request(m.GetQueueNum())
            assert isinstance(count, m.QueueNumReply)
            assert count.num_queues == device.num_queues

    serve(tmp_path, device, body)


def test_set_config_hands_offset_and_bytes_to_the_device(tmp_path: Path) -> None:
    class ConfigDevice(RecordingDevice):
        protocol_features = PF.CONFIG

        def __init__(self) -> None:
            super().__init__()
            self.writes: list[tuple[int, bytes]] = []

        def set_config(self, offset: int, data: bytes) -> int:
            self.writes.append((offset, bytes(data)))
            return 0

    device = ConfigDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.request(m.GetFeatures())
        await fe.request(m.SetFeatures(fe.conn.negotiate_features(-1)))
        await fe.request(m.GetProtocolFeatures())
        await fe.request(m.SetProtocolFeatures(int(fe.conn.negotiate_protocol_features(
            PF.REPLY_ACK | PF.CONFIG))))
        ack = await fe.request(m.SetConfig(6, b"\x01\x02", need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok

    serve(tmp_path, device, body)
    assert device.writes == [(6, b"\x01\x02")]


def test_ring_of_a_front_end_that_never_sets_features_runs_from_its_kick(
        tmp_path: Path, ram: Ram) -> None:
    device = RecordingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.request(m.SetOwner())
        kick, _ = await set_up_ring(fe, ram)
        ram.map[DATA:DATA + 6] = b"legacy"
        ram.desc(0, DATA, 6)
        ram.publish(0)
        os.eventfd_write(kick, 1)
        await until(lambda: device.payloads == [b"legacy"])
        os.close(kick)

    serve(tmp_path, device, body)


# ---- how a session ends ------------------------------------------------------------------------


def test_front_end_hanging_up_is_the_reason_given(tmp_path: Path) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        session = server.session
        fe.sock.close()
        await until(lambda: session is not None and session.closed.done())

    assert serve(tmp_path, RecordingDevice(), body) == ["front-end closed the connection"]


def test_front_end_resetting_the_connection_is_a_hang_up_too(tmp_path: Path) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        session = server.session
        await send(fe, m.GetFeatures())  # its reply stays unread: the close is a reset
        await asyncio.sleep(0.1)
        fe.sock.close()
        await until(lambda: session is not None and session.closed.done())

    assert serve(tmp_path, RecordingDevice(), body) == ["front-end closed the connection"]


def test_vring_index_out_of_range_drops_the_connection_and_its_fd(tmp_path: Path) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        before = eventfds_open()
        fe = await connect()
        await fe.negotiate()
        call = os.eventfd(0, os.EFD_NONBLOCK)
        await send(fe, m.SetVringCall(5, call))
        await assert_dropped(fe)
        assert eventfds_open() == before + 1  # ours only: the back-end closed its copy
        os.close(call)

    assert serve(tmp_path, RecordingDevice(), body) == [
        "protocol error: vring index 5 out of range: this device has 2 queues"]


def test_message_with_too_many_fds_drops_the_connection_and_closes_them(tmp_path: Path) -> None:
    from pymvm.vhost.user.backend import MAX_FDS

    async def body(server: VhostUserServer, connect) -> None:
        before = eventfds_open()
        fe = await connect()
        await fe.negotiate()
        fds = [os.eventfd(0) for _ in range(MAX_FDS + 4)]
        data, _ = fe.conn.send(m.GetFeatures())
        fe.sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  struct.pack(f"{len(fds)}i", *fds))])
        await assert_dropped(fe)
        await asyncio.sleep(0.05)
        assert eventfds_open() == before + len(fds)  # ours only
        for fd in fds:
            os.close(fd)

    assert serve(tmp_path, RecordingDevice(), body) == [
        f"protocol error: message carried more than {MAX_FDS} fds (ancillary data truncated)"]


class BrokenDevice(RecordingDevice):
    def set_features(self, acked: int) -> None:
        raise RuntimeError("device bug")

    def reset(self) -> None:
        raise RuntimeError("reset bug")


def test_device_failing_in_a_handler_costs_one_connection_not_the_server(
        tmp_path: Path, ram: Ram) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.request(m.GetFeatures())
        await fe.request(m.SetOwner())
        await fe.request(m.SetMemTable((ram.region(),), (ram.fd,)))
        await fe.request(m.GetFeatures())  # the table has been taken
        assert ram.mappings() == 2
        await send(fe, m.SetFeatures(0))
        await assert_dropped(fe)
        assert ram.mappings() == 1  # closed in full although the device's reset failed too
        again = await connect()
        assert isinstance(await again.request(m.GetFeatures()), m.FeaturesReply)

    reasons = serve(tmp_path, BrokenDevice(), body)
    assert reasons[0] == "internal error: RuntimeError('device bug')"


def test_socket_path_taken_by_a_file_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    path.write_text("not a socket")
    server = VhostUserServer(str(path), RecordingDevice())
    with pytest.raises(VhostUserBackendError) as refused:
        server.listen()
    assert str(refused.value) == (f"{path} exists and is not a socket: choose another --socket "
                                  "path")
    assert path.read_text() == "not a socket"


@pytest.fixture
def ram():
    r = Ram(0x40000, gpa=GPA, uva=UVA)
    yield r
    r.close()



# ---- client mode and a listener handed over ----------------------------------------------------


async def _front_end_answered(listener: socket.socket) -> socket.socket:
    """Accept the back-end's connection on ``listener`` and check it serves a request."""
    loop = asyncio.get_running_loop()
    conn, _ = await asyncio.wait_for(loop.sock_accept(listener), 5)
    conn.setblocking(False)
    assert isinstance(await Frontend(conn).request(m.GetFeatures()), m.FeaturesReply)
    return conn


def test_client_mode_dials_a_front_end_that_listens_late_and_redials_after_it_hangs_up(
        tmp_path: Path) -> None:
    path = str(tmp_path / "fe.sock")

    async def main() -> None:
        server = VhostUserServer(path, RecordingDevice(), client=True, reconnect_delay=0.05)
        task = asyncio.create_task(server.serve_forever())
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await asyncio.sleep(0.2)  # no socket file yet: the back-end keeps trying
            listener.bind(path)
            await asyncio.sleep(0.2)  # bound, not listening: refused, and tried again
            listener.listen(1)
            listener.setblocking(False)
            for served in (1, 2):
                conn = await _front_end_answered(listener)
                assert server.sessions_served == served
                conn.close()  # the front-end goes away: the back-end dials again
            assert not task.done()
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            listener.close()

    asyncio.run(main())
    assert os.path.exists(path)  # the front-end's socket file: not the back-end's to remove


def test_client_mode_gives_up_on_a_path_it_can_never_reach_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    path = str(blocker / "fe.sock")
    server = VhostUserServer(path, RecordingDevice(), client=True, reconnect_delay=0.05)
    with pytest.raises(VhostUserBackendError) as refused:
        asyncio.run(asyncio.wait_for(server.serve_forever(), 5))
    assert str(refused.value) == f"cannot connect to {path}: Not a directory"


def test_server_serves_on_a_listening_socket_it_is_handed_without_binding_its_own(
        tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # blocking, as handed over
    listener.bind(path)
    listener.listen(1)

    async def main() -> None:
        server = VhostUserServer(path, RecordingDevice(), listener=listener)
        server.listen()  # listens already: nothing to bind
        task = asyncio.create_task(server.serve_forever())
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, path), 5)
            reply = await Frontend(sock).request(m.GetFeatures())
            assert isinstance(reply, m.FeaturesReply)
            assert server.sessions_served == 1
        finally:
            sock.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert listener.fileno() == -1  # closed with the server


def test_disabled_ring_leaves_its_kicks_to_the_eventfd(tmp_path: Path, ram: Ram) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        kick, call = await start_ring(fe, ram, ram.uva)
        ack = await fe.request(m.SetVringEnable(0, False, need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok
        os.eventfd_write(kick, 1)
        await asyncio.sleep(0.2)
        assert os.eventfd_read(kick) == 1  # nobody watches a stopped ring's kick
        os.close(kick)
        os.close(call)

    serve(tmp_path, RecordingDevice(), body)


def test_sessions_open_when_the_server_stops_are_closed_as_back_end_shutting_down(
        tmp_path: Path) -> None:
    async def cancelled(server: VhostUserServer, connect) -> None:
        await (await connect()).negotiate()  # the session is still open when the task is cancelled

    async def closed(server: VhostUserServer, connect) -> None:
        await (await connect()).negotiate()
        server.close()
        server.close()  # idempotent

    assert serve(tmp_path, RecordingDevice(), cancelled) == ["back-end shutting down"]
    assert serve(tmp_path, RecordingDevice(), closed) == ["back-end shutting down"]


def test_server_close_after_its_socket_file_was_removed_does_not_fail(tmp_path: Path) -> None:
    path = tmp_path / "vu.sock"
    server = VhostUserServer(str(path), RecordingDevice())
    server.listen()
    path.unlink()
    server.close()
    server.close()


def test_listen_in_client_mode_makes_no_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "fe.sock"
    server = VhostUserServer(str(path), RecordingDevice(), client=True)
    server.listen()
    assert not path.exists()
    server.close()


def test_socket_in_a_missing_directory_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "vu.sock"
    with pytest.raises(VhostUserBackendError) as refused:
        VhostUserServer(str(path), RecordingDevice()).listen()
    assert str(refused.value) == f"cannot listen on {path}: No such file or directory"


def test_server_refuses_unsealable_guest_memory_unless_told_otherwise(tmp_path: Path) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await fe.negotiate()
        fd = memfd(0x10000, sealable=False)
        await send(fe, m.SetMemTable((region(),), (fd,), need_reply=True))
        os.close(fd)
        await assert_dropped(fe)

    (reason,) = serve(tmp_path, RecordingDevice(), body)  # allow_unsealed_memory by default: no
    assert "a memfd that cannot be sealed" in reason


def test_new_inflight_region_asked_for_while_a_tracked_ring_runs_keeps_the_session(
        tmp_path: Path, ram: Ram) -> None:
    """The running ring still records into the old region (its queue holds a view of it), so
    that mapping cannot be closed yet; the back-end hands out the new region and goes on."""
    device = HoldingDevice()

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await inflight_session(fe)
        first = await inflight_region(fe)
        os.close(first.fd)
        kick, call = await start_ring(fe, ram, ram.uva)
        ram.desc(3, DATA, 16)
        ram.publish(3)
        os.eventfd_write(kick, 1)
        await until(lambda: device.held == [3])
        second = await inflight_region(fe)
        os.close(second.fd)
        base = await fe.request(m.GetVringBase(0))  # answered: the session goes on
        assert isinstance(base, m.VringBaseReply) and base.num == 1
        for fd in (kick, call):
            os.close(fd)

    assert serve(tmp_path, device, body) == ["back-end shutting down"]  # only when it stops


@pytest.mark.parametrize("queues, size", [(0, 8), (3, 8), (1, 0), (1, 32769)])
def test_get_inflight_fd_outside_the_device_names_the_request_in_the_disconnect_reason(
        tmp_path: Path, queues: int, size: int) -> None:
    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await inflight_session(fe)
        await send(fe, m.GetInflightFd(num_queues=queues, queue_size=size))
        await assert_dropped(fe)

    assert serve(tmp_path, InflightDevice(), body) == [
        (f"protocol error: GET_INFLIGHT_FD for {queues} queues of {size}: "
         f"this device has 2 queues of at most 32768 entries")]


def test_indirect_desc_alone_set_while_a_ring_runs_is_followed(tmp_path: Path, ram: Ram) -> None:
    """INDIRECT_DESC acked without EVENT_IDX (the bit next to it) while the ring runs."""
    from pymvm.devices.virtio.constants import (
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_INDIRECT_DESC,
    )
    from pymvm.devices.virtio.queue import VRING_DESC_F_INDIRECT

    device = FeatureRecordingDevice()
    plain = 1 << VIRTIO_F_VERSION_1 | m.PROTOCOL_FEATURES_FLAG
    indirect = plain | 1 << VIRTIO_RING_F_INDIRECT_DESC
    table = DATA + 0x1000

    async def body(server: VhostUserServer, connect) -> None:
        fe = await connect()
        await own_with_reply_ack(fe, plain)
        kick, call = await start_ring(fe, ram, ram.uva)
        ack = await fe.request(m.SetFeatures(indirect, need_reply=True))
        assert isinstance(ack, m.Ack) and ack.ok
        ram.map[DATA:DATA + 8] = b"indirect"
        struct.pack_into("<QIHH", ram.map, table, ram.gpa + DATA, 8, 0, 0)
        struct.pack_into("<QIHH", ram.map, DESC, ram.gpa + table, 16, VRING_DESC_F_INDIRECT, 0)
        ram.publish(0)
        os.eventfd_write(kick, 1)
        await until(lambda: len(device.payloads) == 1)
        for fd in (kick, call):
            os.close(fd)

    serve(tmp_path, device, body)
    assert device.acked == [plain, indirect]
    assert device.payloads == [b"indirect"]
