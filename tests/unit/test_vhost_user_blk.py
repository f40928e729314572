"""The built-in vhost-user-blk back-end: request parsing against hostile chains, requests
served through the vhost-user server on a real image file, GET_CONFIG, and the inflight
region a restarted back-end resubmits from."""

from __future__ import annotations

import mmap
import os
import struct
import threading
from pathlib import Path

import pytest

from pymvm.devices.virtio import blk as b
from pymvm.devices.virtio.queue import (
    VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT,
    VRING_DESC_F_WRITE,
    DescriptorChain,
)
from pymvm.vhost.backends.blk import BlkBackend, BlkRequest, Rejected, parse_request
from pymvm.vhost.user import inflight as inf
from pymvm.vhost.user import messages as m
from pymvm.vhost.user.errors import VhostUserRequestFailed
from pymvm.vhost.user.messages import ProtocolFeature as PF
from pymvm.vhost.user.protocol import NEED_DATA
from tests.unit.test_vhost_user_backend import (
    AVAIL,
    DATA,
    MEM_GPA,
    QSIZE,
    USED,
    GuestRam,
    run_server,
    start_queue0,
    until,
)

NEXT, WRITE = VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
CAPACITY = 64  # sectors of the test image: 32 KiB


def hdr(rtype: int, sector: int = 0) -> bytes:
    return b.REQUEST_HEADER.pack(rtype, 0, sector)


def chain(readable: list[bytes], writable: list[int]) -> DescriptorChain:
    """A chain of fresh buffers: ``readable`` contents, ``writable`` sizes."""
    return DescriptorChain(0, [memoryview(bytearray(r)) for r in readable],
                           [memoryview(bytearray(n)) for n in writable])


# ---------------------------------------------------------------------------------------------
# Request parsing: every hostile shape gets a status, none reaches the image


def test_read_request_is_parsed_with_data_and_status_split_off_the_writable_buffers() -> None:
    req = parse_request(chain([hdr(b.VIRTIO_BLK_T_IN, 3)], [1024, 1]), CAPACITY, False)
    assert isinstance(req, BlkRequest)
    assert (req.type, req.sector, req.length) == (b.VIRTIO_BLK_T_IN, 3, 1024)
    assert [v.nbytes for v in req.data] == [1024] and req.status.nbytes == 1


def test_status_byte_sharing_the_data_buffer_is_its_last_byte() -> None:
    c = chain([hdr(b.VIRTIO_BLK_T_IN)], [513])
    req = parse_request(c, CAPACITY, False)
    assert isinstance(req, BlkRequest) and req.length == 512
    req.status[0] = 7
    assert c.writable[0][512] == 7


def test_header_split_over_two_buffers_is_reassembled() -> None:
    raw = hdr(b.VIRTIO_BLK_T_OUT, 5)
    req = parse_request(chain([raw[:5], raw[5:] + b"x" * 512], [1]), CAPACITY, False)
    assert isinstance(req, BlkRequest) and req.sector == 5 and req.length == 512
    assert b"".join(bytes(v) for v in req.data) == b"x" * 512


@pytest.mark.parametrize("readable,writable,read_only,status,why", [
    ([b"\0" * 15], [1], False, b.VIRTIO_BLK_S_IOERR, "short header"),
    ([], [1], False, b.VIRTIO_BLK_S_IOERR, "no header at all"),
    ([hdr(b.VIRTIO_BLK_T_IN, CAPACITY)], [513], False, b.VIRTIO_BLK_S_IOERR, "read past the end"),
    ([hdr(b.VIRTIO_BLK_T_IN, CAPACITY - 1)], [1025], False, b.VIRTIO_BLK_S_IOERR, "read crossing the end"),
    ([hdr(b.VIRTIO_BLK_T_IN, 2**64 - 1)], [513], False, b.VIRTIO_BLK_S_IOERR, "sector near 2^64"),
    ([hdr(b.VIRTIO_BLK_T_OUT, 2**64 - 1) + b"x" * 512], [1], False, b.VIRTIO_BLK_S_IOERR, "write wrapping"),
    ([hdr(b.VIRTIO_BLK_T_IN)], [101], False, b.VIRTIO_BLK_S_IOERR, "partial sector"),
    ([hdr(b.VIRTIO_BLK_T_IN) + b"x" * 512], [513], False, b.VIRTIO_BLK_S_IOERR, "read carrying data"),
    ([hdr(b.VIRTIO_BLK_T_OUT) + b"x" * 512], [513], False, b.VIRTIO_BLK_S_IOERR, "write into the device-writable side"),
    ([hdr(b.VIRTIO_BLK_T_OUT) + b"x" * 512], [1], True, b.VIRTIO_BLK_S_IOERR, "write to a read-only disk"),
    ([hdr(b.VIRTIO_BLK_T_DISCARD) + b.DISCARD_SEGMENT.pack(0, 8, 0)], [1], True, b.VIRTIO_BLK_S_IOERR, "discard on read-only"),
    ([hdr(99)], [1], False, b.VIRTIO_BLK_S_UNSUPP, "unknown type"),
    ([hdr(b.VIRTIO_BLK_T_DISCARD) + b.DISCARD_SEGMENT.pack(0, 8, 1)], [1], False, b.VIRTIO_BLK_S_UNSUPP, "discard with unmap flag"),
    ([hdr(b.VIRTIO_BLK_T_WRITE_ZEROES) + b.DISCARD_SEGMENT.pack(0, 8, 6)], [1], False, b.VIRTIO_BLK_S_UNSUPP, "unknown wz flags"),
    ([hdr(b.VIRTIO_BLK_T_DISCARD) + b.DISCARD_SEGMENT.pack(2**64 - 4, 8, 0)], [1], False, b.VIRTIO_BLK_S_IOERR, "discard range overflow"),
    ([hdr(b.VIRTIO_BLK_T_WRITE_ZEROES) + b.DISCARD_SEGMENT.pack(CAPACITY - 1, 2, 0)], [1], False, b.VIRTIO_BLK_S_IOERR, "wz past the end"),
    ([hdr(b.VIRTIO_BLK_T_DISCARD) + b"\0" * 10], [1], False, b.VIRTIO_BLK_S_IOERR, "ragged discard payload"),
    ([hdr(b.VIRTIO_BLK_T_DISCARD)], [1], False, b.VIRTIO_BLK_S_IOERR, "discard without a segment"),
    ([hdr(b.VIRTIO_BLK_T_DISCARD) + b.DISCARD_SEGMENT.pack(0, 8, 0) * 2], [1], False, b.VIRTIO_BLK_S_UNSUPP, "two segments"),
])
def test_hostile_request_is_rejected_with_a_status(readable, writable, read_only, status, why) -> None:
    result = parse_request(chain(readable, writable), CAPACITY, read_only)
    assert isinstance(result, Rejected), why
    assert result.status == status, why


def test_chain_without_a_writable_status_byte_cannot_be_answered() -> None:
    assert parse_request(chain([hdr(b.VIRTIO_BLK_T_IN), b"\0"], []), CAPACITY, False) is None


def test_last_sector_of_the_disk_is_addressable() -> None:
    req = parse_request(chain([hdr(b.VIRTIO_BLK_T_IN, CAPACITY - 1)], [513]), CAPACITY, False)
    assert isinstance(req, BlkRequest)


# ---------------------------------------------------------------------------------------------
# Served through the vhost-user server, on a real file


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (CAPACITY * 2))
    return path


class BlkDriver:
    """Requests on queue 0 of GuestRam, two descriptors each (slot i: descriptors 2i, 2i+1),
    header at DATA + 0x2000 * i and data after it."""

    def __init__(self, ram: GuestRam) -> None:
        self.ram = ram

    def submit(self, rtype: int, sector: int, *, out: bytes = b"", in_len: int = 0,
               slot: int = 0, extra: bytes = b"") -> int:
        """Publish one request; returns the offset of its status byte."""
        base = DATA + 0x2000 * slot
        d = 2 * slot
        self.ram.map[base : base + 16] = hdr(rtype, sector)
        if in_len:  # header | data + status (the status is the last writable byte)
            status = base + 16 + in_len
            self.ram.desc(d, base, 16, NEXT, d + 1)
            self.ram.desc(d + 1, base + 16, in_len + 1, WRITE)
        else:  # header + payload | status
            payload = out or extra
            self.ram.map[base + 16 : base + 16 + len(payload)] = payload
            status = base + 0x1F00
            self.ram.desc(d, base, 16 + len(payload), NEXT, d + 1)
            self.ram.desc(d + 1, status, 1, WRITE)
        self.ram.map[status] = 0xFF
        self.ram.publish(d)
        return status

    def data(self, slot: int, length: int) -> bytes:
        base = DATA + 0x2000 * slot + 16
        return bytes(self.ram.map[base : base + length])


BLK_PROTOCOL = PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.CONFIG | PF.INFLIGHT_SHMFD | PF.MQ


async def negotiate(fe) -> PF:
    """The handshake with the protocol features a blk front-end uses; what was agreed."""
    await fe.request(m.GetFeatures())
    await fe.request(m.SetFeatures(fe.conn.negotiate_features(-1)))
    await fe.request(m.GetProtocolFeatures())
    agreed = fe.conn.negotiate_protocol_features(BLK_PROTOCOL)
    await fe.request(m.SetProtocolFeatures(int(agreed)))
    await fe.request(m.SetOwner())
    return agreed


async def request_with_fds(fe, msg: m.Request) -> m.Message:
    """A request whose reply carries fds (the test Frontend's sock_recv drops them)."""
    import array
    import asyncio
    import socket

    data, fds = fe.conn.send(msg)
    fe.sock.sendmsg([data])
    deadline = asyncio.get_running_loop().time() + 5
    while (event := fe.conn.next_event()) is NEED_DATA:
        try:
            chunk, anc, _, _ = fe.sock.recvmsg(4096, socket.CMSG_SPACE(4 * 8))
        except BlockingIOError:
            # A back-end that never answers fails the test now, not at pytest's timeout.
            assert asyncio.get_running_loop().time() < deadline, f"no reply to {msg!r}"
            await asyncio.sleep(0.01)
            continue
        got = array.array("i")
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got.frombytes(payload[: len(payload) - len(payload) % 4])
        fe.conn.receive_data(chunk, list(got))
    return event


def serve_blk(tmp_path: Path, image: Path, body, *, read_only: bool = False,
              inline_nowait: bool = True,
              serial: str = "pymvm-test") -> BlkBackend:
    fd = os.open(image, os.O_RDONLY if read_only else os.O_RDWR)
    device = BlkBackend(fd, image.stat().st_size, read_only=read_only, serial=serial, workers=4,
                        inline_nowait=inline_nowait)
    try:
        run_server(tmp_path, device, body)
    finally:
        device.close()
        os.close(fd)
    return device


def test_write_flush_read_get_id_through_the_server_reach_the_image(tmp_path: Path, image: Path) -> None:
    ram = GuestRam()
    drv = BlkDriver(ram)

    async def body(server, connect) -> None:
        fe = await connect()
        await negotiate(fe)
        kick, call = await start_queue0(fe, ram)
        s0 = drv.submit(b.VIRTIO_BLK_T_OUT, 4, out=b"W" * 1024, slot=0)
        s1 = drv.submit(b.VIRTIO_BLK_T_FLUSH, 0, slot=1)
        os.eventfd_write(kick, 1)
        await until(lambda: ram.used_idx() == 2)
        assert ram.map[s0] == ram.map[s1] == b.VIRTIO_BLK_S_OK
        s2 = drv.submit(b.VIRTIO_BLK_T_IN, 3, in_len=2048, slot=0)
        s3 = drv.submit(b.VIRTIO_BLK_T_GET_ID, 0, in_len=20, slot=1)
        os.eventfd_write(kick, 1)
        await until(lambda: ram.used_idx() == 4)
        assert ram.map[s2] == ram.map[s3] == b.VIRTIO_BLK_S_OK
        assert drv.data(0, 2048) == bytes(range(256)) * 2 + b"W" * 1024 + bytes(range(256)) * 2
        assert drv.data(1, 20) == b"pymvm-test".ljust(20, b"\0")
        assert os.eventfd_read(call) >= 1
        for fd in (kick, call):
            os.close(fd)

    try:
        serve_blk(tmp_path, image, body)
    finally:
        ram.close()
    data = image.read_bytes()
    assert data[4 * 512 : 6 * 512] == b"W" * 1024
    assert data[:512] == bytes(range(256)) * 2  # nothing else touched


def test_discard_and_write_zeroes_leave_zeros_in_the_range_only(tmp_path: Path, image: Path) -> None:
    ram = GuestRam()
    drv = BlkDriver(ram)

    async def body(server, connect) -> None:
        fe = await connect()
        await negotiate(fe)
        kick, call = await start_queue0(fe, ram)
        s0 = drv.submit(b.VIRTIO_BLK_T_DISCARD, 0, extra=b.DISCARD_SEGMENT.pack(8, 8, 0), slot=0)
        s1 = drv.submit(b.VIRTIO_BLK_T_WRITE_ZEROES, 0, extra=b.DISCARD_SEGMENT.pack(24, 2, 0), slot=1)
        os.eventfd_write(kick, 1)
        await until(lambda: ram.used_idx() == 2)
        assert ram.map[s0] == ram.map[s1] == b.VIRTIO_BLK_S_OK
        for fd in (kick, call):
            os.close(fd)

    try:
        serve_blk(tmp_path, image, body)
    finally:
        ram.close()
    data = image.read_bytes()
    pattern = bytes(range(256)) * 2
    assert data[8 * 512 : 16 * 512] == bytes(8 * 512)
    assert data[24 * 512 : 26 * 512] == bytes(1024)
    assert data[7 * 512 : 8 * 512] == pattern and data[16 * 512 : 17 * 512] == pattern
    assert data[26 * 512 : 27 * 512] == pattern
    assert len(data) == CAPACITY * 512


def test_hostile_requests_through_the_server_get_statuses_and_leave_the_image_alone(
        tmp_path: Path, image: Path) -> None:
    ram = GuestRam()
    drv = BlkDriver(ram)
    before = image.read_bytes()

    async def body(server, connect) -> None:
        fe = await connect()
        await negotiate(fe)
        kick, call = await start_queue0(fe, ram)
        s0 = drv.submit(b.VIRTIO_BLK_T_OUT, CAPACITY - 1, out=b"X" * 1024, slot=0)
        s1 = drv.submit(77, 0, slot=1)
        # A status byte in a device-readable buffer: handed back unused, nothing written.
        ram.map[DATA + 0x6000 : DATA + 0x6010] = hdr(b.VIRTIO_BLK_T_IN)
        ram.desc(4, DATA + 0x6000, 16, NEXT, 5)
        ram.desc(5, DATA + 0x6100, 1)
        ram.map[DATA + 0x6100] = 0xEE
        ram.publish(4)
        os.eventfd_write(kick, 1)
        await until(lambda: ram.used_idx() == 3)
        assert ram.map[s0] == b.VIRTIO_BLK_S_IOERR
        assert ram.map[s1] == b.VIRTIO_BLK_S_UNSUPP
        assert ram.map[DATA + 0x6100] == 0xEE
        used_heads = [struct.unpack_from("<II", ram.map, USED + 4 + 8 * i) for i in range(3)]
        assert (4, 0) in used_heads
        for fd in (kick, call):
            os.close(fd)

    try:
        serve_blk(tmp_path, image, body)
    finally:
        ram.close()
    assert image.read_bytes() == before


def test_read_only_disk_refuses_writes_and_offers_ro(tmp_path: Path, image: Path) -> None:
    ram = GuestRam()
    drv = BlkDriver(ram)
    before = image.read_bytes()

    async def body(server, connect) -> None:
        fe = await connect()
        features = await fe.request(m.GetFeatures())
        assert features.features >> b.VIRTIO_BLK_F_RO & 1
        assert not features.features >> b.VIRTIO_BLK_F_DISCARD & 1
        await fe.request(m.SetFeatures(fe.conn.negotiate_features(-1)))
        await fe.request(m.GetProtocolFeatures())
        await fe.request(m.SetProtocolFeatures(int(fe.conn.negotiate_protocol_features(PF.REPLY_ACK))))
        await fe.request(m.SetOwner())
        kick, call = await start_queue0(fe, ram)
        s0 = drv.submit(b.VIRTIO_BLK_T_OUT, 0, out=b"X" * 512, slot=0)
        os.eventfd_write(kick, 1)
        await until(lambda: ram.used_idx() == 1)
        assert ram.map[s0] == b.VIRTIO_BLK_S_IOERR
        for fd in (kick, call):
            os.close(fd)

    try:
        serve_blk(tmp_path, image, body, read_only=True)
    finally:
        ram.close()
    assert image.read_bytes() == before


def test_reads_that_would_block_run_in_worker_threads_several_at_once(
        tmp_path: Path, image: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's RWF_NOWAIT attempt says EAGAIN (data not cached): four reads then sit in
    pread in four workers at the same time; the loop waited for none of them."""
    ram = GuestRam()
    drv = BlkDriver(ram)
    barrier = threading.Barrier(4, timeout=5)
    threads: set[str] = set()
    real_preadv = os.preadv
    tries: list[str] = []

    def preadv(fd, views, offset, flags=0):
        if flags & os.RWF_NOWAIT:
            tries.append(threading.current_thread().name)
            raise BlockingIOError(11, "would block")
        threads.add(threading.current_thread().name)
        barrier.wait()  # breaks (and fails the reads) unless 4 run at once
        return real_preadv(fd, views, offset)

    monkeypatch.setattr(os, "preadv", preadv)

    async def body(server, connect) -> None:
        fe = await connect()
        await negotiate(fe)
        kick, call = await start_queue0(fe, ram)
        statuses = [drv.submit(b.VIRTIO_BLK_T_IN, i, in_len=512, slot=i) for i in range(4)]
        os.eventfd_write(kick, 1)
        await until(lambda: ram.used_idx() == 4)
        assert [ram.map[s] for s in statuses] == [b.VIRTIO_BLK_S_OK] * 4
        for fd in (kick, call):
            os.close(fd)

    try:
        device = serve_blk(tmp_path, image, body)
    finally:
        ram.close()
    assert len(threads) == 4 and all(t.startswith("blk-io") for t in threads)
    assert len(tries) == 4 and not any(t.startswith("blk-io") for t in tries)  # on the loop
    assert device.stats["inline"] == 0


def test_cached_reads_and_writes_complete_on_the_loop_without_a_worker(
        tmp_path: Path, image: Path) -> None:
    ram = GuestRam()
    drv = BlkDriver(ram)

    async def body(server, connect) -> None:
        fe = await connect()
        await negotiate(fe)
        kick, call = await start_queue0(fe, ram)
        s0 = drv.submit(b.VIRTIO_BLK_T_IN, 2, in_len=512, slot=0)
        s1 = drv.submit(b.VIRTIO_BLK_T_OUT, 3, out=b"Z" * 512, slot=1)
        os.eventfd_write(kick, 1)
        await until(lambda: ram.used_idx() == 2)
        assert ram.map[s0] == ram.map[s1] == b.VIRTIO_BLK_S_OK
        assert drv.data(0, 512) == bytes(range(256)) * 2
        for fd in (kick, call):
            os.close(fd)

    image.read_bytes()  # in the page cache
    try:
        device = serve_blk(tmp_path, image, body)
    finally:
        ram.close()
    assert device.stats["inline"] >= 1  # tmpfs and ext4 serve cached reads with RWF_NOWAIT
    assert image.read_bytes()[3 * 512 : 4 * 512] == b"Z" * 512


def test_get_config_answers_capacity_and_limits(tmp_path: Path, image: Path) -> None:
    async def body(server, connect) -> None:
        fe = await connect()
        await negotiate(fe)
        reply = await fe.request(m.GetConfig(0, b.CONFIG_SIZE))
        assert isinstance(reply, m.ConfigReply) and not reply.failed
        cfg = b.BlkConfig.unpack(reply.data)
        assert cfg.capacity == CAPACITY and cfg.blk_size == 512 and cfg.num_queues == 1
        assert cfg.seg_max > 0 and cfg.max_discard_seg == 1 and cfg.max_write_zeroes_seg == 1
        part = await fe.request(m.GetConfig(0, 8))
        assert struct.unpack("<Q", part.data)[0] == CAPACITY
        with pytest.raises(VhostUserRequestFailed):  # past the end: the empty failure reply
            await fe.request(m.GetConfig(b.CONFIG_SIZE - 4, 8))

    serve_blk(tmp_path, image, body)


def test_reads_that_republish_their_own_chain_get_one_ring_per_loop_turn(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile driver lays an IN request's data over its own avail ring and header: each
    read (done on the loop, from the page cache) publishes the chain again and points its
    header at the next sector, so one kick feeds 4000 requests through an 8-entry ring.
    The back-end takes at most one ring's worth per turn of its loop, serves the rest in
    later turns without another kick, and answers the front-end in between."""
    import asyncio

    count = 4000
    hdr_off, filler, status_off = DATA, DATA + 0x100, DATA + 0x1F00
    sectors = []
    for k in range(count):  # sector k: avail idx so one more chain is pending, next header
        idx = k + 2 if k < count - 1 else count
        sectors.append((struct.pack("<HH", 0, idx) + hdr(b.VIRTIO_BLK_T_IN, k + 1)).ljust(512, b"\0"))
    path = tmp_path / "feed.img"
    path.write_bytes(b"".join(sectors))
    real_preadv = os.preadv
    # Every read is served on the loop, as a file system with RWF_NOWAIT serves cached data.
    monkeypatch.setattr(os, "preadv", lambda fd, views, offset, flags=0: real_preadv(fd, views, offset))
    ram = GuestRam()
    per_call: list[int] = []

    async def body(server, connect) -> None:
        device = server.device
        real_kicked = device.queue_kicked

        def counting(vring) -> None:
            before = device.stats["requests"]
            real_kicked(vring)
            per_call.append(device.stats["requests"] - before)

        device.queue_kicked = counting
        fe = await connect()
        await negotiate(fe)
        kick, call = await start_queue0(fe, ram)
        ram.map[hdr_off : hdr_off + 16] = hdr(b.VIRTIO_BLK_T_IN, 0)
        ram.desc(0, hdr_off, 16, NEXT, 1)
        ram.desc(1, AVAIL, 4, WRITE | NEXT, 2)  # avail flags and idx
        ram.desc(2, hdr_off, 16, WRITE | NEXT, 3)  # its own header: the next sector
        ram.desc(3, filler, 512 - 20, WRITE | NEXT, 4)
        ram.desc(4, status_off, 1, WRITE)
        ram.publish(0)  # every ring slot names head 0
        os.eventfd_write(kick, 1)
        while ram.used_idx() == 0:
            await asyncio.sleep(0)
        reply = await fe.request(m.GetConfig(0, 8))
        answered_at = ram.used_idx()
        assert isinstance(reply, m.ConfigReply) and not reply.failed
        assert answered_at < count, "the front-end waited for the whole self-feeding run"
        await until(lambda: ram.used_idx() == count, timeout=60)
        assert ram.map[status_off] == b.VIRTIO_BLK_S_OK
        for fd in (kick, call):
            os.close(fd)

    try:
        device = serve_blk(tmp_path, path, body)
    finally:
        ram.close()
    assert device.stats["requests"] == count and device.stats["inline"] == count
    assert max(per_call) <= QSIZE, f"{max(per_call)} chains in one turn of the loop"


# ---------------------------------------------------------------------------------------------
# Inflight I/O tracking


def test_inflight_region_layout_matches_the_spec() -> None:
    assert inf.QUEUE_HEADER.size == 16 and inf.DESC_STATE.size == 16
    assert inf.queue_region_size(256) == 4160  # 16 + 16 * 256, rounded up to 64
    assert inf.queue_region_size(2) == 64
    raw = bytearray(inf.queue_region_size(8))
    q = inf.InflightQueue(memoryview(raw), 8)
    q.recover(5)
    features, version, desc_num, last_batch, used_idx = inf.QUEUE_HEADER.unpack_from(raw)
    assert (version, desc_num, used_idx) == (1, 8, 5)
    q.fetched(3)
    q.fetched(1)
    assert raw[16 + 16 * 3] == 1 and raw[16 + 16 * 1] == 1  # inflight flag at desc offset 0
    assert struct.unpack_from("<Q", raw, 16 + 16 * 3 + 8)[0] == 1  # counter at offset 8
    assert struct.unpack_from("<Q", raw, 16 + 16 * 1 + 8)[0] == 2
    q.begin_used(3)
    assert struct.unpack_from("<H", raw, 12)[0] == 3  # last_batch_head
    q.end_used(3, 6)
    assert raw[16 + 16 * 3] == 0 and struct.unpack_from("<H", raw, 14)[0] == 6


def test_recovery_resubmits_in_fetch_order_and_clears_a_published_completion() -> None:
    raw = bytearray(inf.queue_region_size(8))
    q = inf.InflightQueue(memoryview(raw), 8)
    q.recover(0)
    for head in (5, 2, 7):
        q.fetched(head)
    q.begin_used(2)  # the dead back-end published head 2 (used idx 0 -> 1), then died
    again = inf.InflightQueue(memoryview(raw), 8)
    recovery = again.recover(1)
    assert recovery.heads == (5, 7)
    assert recovery.next_avail == 1 + 2  # used + still in flight = everything fetched
    assert again.pending() == [5, 7]


def test_recovery_of_a_region_for_another_queue_size_starts_clean() -> None:
    raw = bytearray(inf.queue_region_size(16))
    q = inf.InflightQueue(memoryview(raw), 8)
    q.recover(0)
    q.fetched(1)
    other = inf.InflightQueue(memoryview(raw), 16)
    assert other.recover(9) == inf.Recovery((), 9)


def test_restarted_backend_resubmits_requests_left_in_the_inflight_region(
        tmp_path: Path, image: Path) -> None:
    """Connection 1 gets the region (GET_INFLIGHT_FD); the test marks two reads as fetched
    and unfinished, as a back-end killed mid-request leaves them; connection 2 is handed the
    region (SET_INFLIGHT_FD) and completes both without the driver publishing anything."""
    ram = GuestRam()
    drv = BlkDriver(ram)

    async def body(server, connect) -> None:
        fe = await connect()
        assert await negotiate(fe) & PF.INFLIGHT_SHMFD
        reply = await request_with_fds(fe, m.GetInflightFd(num_queues=1, queue_size=QSIZE))
        assert isinstance(reply, m.InflightFdReply)
        assert reply.mmap_size >= inf.region_size(1, QSIZE)
        region_fd = reply.fd
        fe.sock.close()
        await until(lambda: server.session is None or server.sessions_served == 2 or
                    server.session.closed.done())
        # The "dead" back-end had fetched the requests at heads 0 and 2 (avail idx 2).
        import mmap as mmap_mod
        region = mmap_mod.mmap(region_fd, reply.mmap_size)
        q = inf.InflightQueue(memoryview(region)[: inf.queue_region_size(QSIZE)], QSIZE)
        s0 = drv.submit(b.VIRTIO_BLK_T_IN, 1, in_len=512, slot=0)
        s1 = drv.submit(b.VIRTIO_BLK_T_IN, 2, in_len=512, slot=1)
        q.fetched(0)
        q.fetched(2)
        assert q.pending() == [0, 2]
        fe2 = await connect()
        await negotiate(fe2)
        await fe2.request(m.SetInflightFd(reply.mmap_size, 0, 1, QSIZE, region_fd))
        kick, call = await start_queue0(fe2, ram)  # SET_VRING_BASE 0 = the used idx
        await until(lambda: ram.used_idx() == 2)
        assert ram.map[s0] == ram.map[s1] == b.VIRTIO_BLK_S_OK
        assert drv.data(0, 512) == bytes(range(256)) * 2 and drv.data(1, 512) == bytes(range(256)) * 2
        assert q.pending() == [] and q.used_idx == 2
        base = await fe2.request(m.GetVringBase(0))
        assert base.num == 2  # resumed after the two resubmitted requests
        del q
        region.close()
        os.close(region_fd)
        for fd in (kick, call):
            os.close(fd)

    try:
        device = serve_blk(tmp_path, image, body)
    finally:
        ram.close()
    assert device.stats["resubmitted"] == 2


# ---------------------------------------------------------------------------------------------
# Requests read in bulk from an indirect table (BulkChain): preadv2/pwritev2 on an iovec array


def bulk_request(memory, rtype: int, sector: int, segments: list[tuple[int, int]]):
    """A Linux-shaped request (header, data segments, status) in an indirect table; the
    chain the queue pops (with bulk reading on) and the status byte's view."""
    from pymvm.devices.virtio.queue import VRING_DESC_F_INDIRECT, BulkChain, VirtQueue

    mem, memory_map = memory
    header, status, table = 0x4000, 0x4100, 0x3000
    mem[header : header + 16] = hdr(rtype, sector)
    mem[status] = 0xFF
    data_flags = WRITE if rtype == b.VIRTIO_BLK_T_IN else 0
    entries = [(header, 16, NEXT)] + [(a, n, data_flags | NEXT) for a, n in segments]
    entries.append((status, 1, WRITE))
    for i, (addr, length, flags) in enumerate(entries):
        struct.pack_into("<QIHH", mem, table + 16 * i, addr, length, flags,
                         i + 1 if flags & NEXT else 0)
    struct.pack_into("<QIHH", mem, 0, table, 16 * len(entries), VRING_DESC_F_INDIRECT, 0)
    struct.pack_into("<HHH", mem, 0x1000, 0, 1, 0)  # avail: idx 1, ring[0] = head 0
    queue = VirtQueue(memory_map, 8, 0, 0x1000, 0x2000, indirect=True)
    queue.bulk_indirect = 1
    chain = queue.pop_avail()
    assert isinstance(chain, BulkChain)
    return chain


@pytest.fixture
def guest_memory():

    from pymvm.devices.virtio.queue import GuestMemoryMap

    mem = mmap.mmap(-1, 1 << 20)
    memory_map = GuestMemoryMap([(0, memoryview(mem))])
    yield mem, memory_map
    memory_map.release()


def test_bulk_read_and_write_move_data_between_the_image_and_scattered_guest_buffers(
        tmp_path: Path, image: Path, guest_memory) -> None:
    mem, _ = guest_memory
    fd = os.open(image, os.O_RDWR)
    device = BlkBackend(fd, image.stat().st_size, workers=1, inline_nowait=False)
    try:
        segments = [(0x8000, 512), (0x5000, 1024), (0x9000, 512)]
        req = parse_request(bulk_request(guest_memory, b.VIRTIO_BLK_T_IN, 2, segments),
                            device.capacity, False)
        assert isinstance(req, BlkRequest) and req.iov is not None and req.length == 2048
        assert device._execute(req) == 2049 and mem[0x4100] == b.VIRTIO_BLK_S_OK
        expected = (bytes(range(256)) * 16)[:2048]  # sectors 2.. of the image
        got = mem[0x8000:0x8200] + mem[0x5000:0x5400] + mem[0x9000:0x9200]
        assert got == expected
        mem[0x8000:0x8200] = b"A" * 512
        mem[0x5000:0x5400] = b"B" * 1024
        req = parse_request(bulk_request(guest_memory, b.VIRTIO_BLK_T_OUT, 10, segments[:2]),
                            device.capacity, False)
        assert isinstance(req, BlkRequest) and req.iov is not None and req.length == 1536
        assert device._execute(req) == 1 and mem[0x4100] == b.VIRTIO_BLK_S_OK
    finally:
        device.close()
        os.close(fd)
    assert image.read_bytes()[10 * 512 : 13 * 512] == b"A" * 512 + b"B" * 1024


@pytest.mark.parametrize("rtype, sector, read_only, status", [
    (b.VIRTIO_BLK_T_IN, CAPACITY - 2, False, b.VIRTIO_BLK_S_IOERR),  # 4 sectors from 62
    (b.VIRTIO_BLK_T_OUT, 0, True, b.VIRTIO_BLK_S_IOERR),  # a write to a read-only disk
])
def test_bulk_requests_get_the_same_checks_as_any_other(
        guest_memory, rtype: int, sector: int, read_only: bool, status: int) -> None:
    chain = bulk_request(guest_memory, rtype, sector, [(0x8000, 1024), (0x5000, 1024)])
    rejected = parse_request(chain, CAPACITY, read_only)
    assert isinstance(rejected, Rejected) and rejected.status == status


def test_bulk_read_of_an_image_that_shrank_is_an_io_error(tmp_path: Path, guest_memory) -> None:
    path = tmp_path / "shrinks.img"
    path.write_bytes(bytes(64 * 512))
    fd = os.open(path, os.O_RDWR)
    device = BlkBackend(fd, 64 * 512, workers=1, inline_nowait=False)
    try:
        req = parse_request(bulk_request(guest_memory, b.VIRTIO_BLK_T_IN, 60, [(0x8000, 2048)]),
                            device.capacity, False)
        os.truncate(path, 61 * 512)  # one sector of the four is left
        assert device._execute(req) == 1
        assert guest_memory[0][0x4100] == b.VIRTIO_BLK_S_IOERR
    finally:
        device.close()
        os.close(fd)


@pytest.mark.parametrize("lengths, parts", [
    ([1016 << 10, 8 << 10], [2]),  # a 1 MiB write split 254 + 2 pages: one hand-off
    ([1016 << 10, 8 << 10, 0], [3]),  # ... and the flush after it
    ([4096] * 32, [8, 8, 8, 8]),  # 32 random 4 KiB requests: four workers at once
    ([512 << 10] * 2, [1, 1]),
    ([512] * 4, [1, 1, 1, 1]),
    ([0], [1]),
])
def test_a_kick_goes_to_the_workers_in_parts_of_about_equal_bytes(
        lengths: list[int], parts: list[int]) -> None:
    from pymvm.vhost.backends.blk import PARALLEL_BATCHES, split_by_bytes

    batch = [BlkRequest(i, b.VIRTIO_BLK_T_IN, 0, [], n, memoryview(bytearray(1)))
             for i, n in enumerate(lengths)]
    runs = split_by_bytes(batch, PARALLEL_BATCHES)
    assert [len(run) for run in runs] == parts
    assert [req for run in runs for req in run] == batch  # every request once, in order


# ---------------------------------------------------------------------------------------------
# 1 MiB requests as Linux lays them out, through the server: indirect tables of scattered
# pages (254 + 2, seg_max), iovecs made in bulk, completions returned by the workers


BIG_MEM = 3 << 20
PAGES = 0x100000  # data pages: [1 MiB, 3 MiB) of guest memory


class BigRam(GuestRam):
    """GuestRam with room for 1 MiB of scattered data pages."""

    def __init__(self) -> None:
        super().__init__(BIG_MEM, name="vhost-user-blk-test")

    def table(self, d: int, at: int, rtype: int, sector: int, pages: list[int], *,
              outside: int | None = None) -> int:
        """Descriptor ``d``: an indirect table at ``at`` (header, ``pages``, status); its
        status byte's offset. ``outside``: that page's descriptor points past the memory."""
        header, status = at + 0x1800, at + 0x1900
        self.map[header : header + 16] = hdr(rtype, sector)
        self.map[status] = 0xFF
        data = WRITE if rtype == b.VIRTIO_BLK_T_IN else 0
        entries = [(header, 16, NEXT)] + [(p, 4096, data | NEXT) for p in pages]
        entries.append((status, 1, WRITE))
        for i, (offset, length, flags) in enumerate(entries):
            gpa = MEM_GPA + BIG_MEM - 2048 if i - 1 == outside else MEM_GPA + offset
            struct.pack_into("<QIHH", self.map, at + 16 * i, gpa, length, flags,
                             i + 1 if flags & NEXT else 0)
        self.desc(d, at, 16 * len(entries), VRING_DESC_F_INDIRECT)
        return status

    def used(self, slot: int) -> tuple[int, int]:
        return struct.unpack_from("<II", self.map, USED + 4 + 8 * (slot % QSIZE))

    def pages(self, pages: list[int]) -> bytes:
        return b"".join(self.map[p : p + 4096] for p in pages)


@pytest.fixture
def big_image(tmp_path: Path) -> Path:
    path = tmp_path / "big.img"
    path.write_bytes(os.urandom(4 << 20))
    return path


@pytest.mark.parametrize("inline_nowait, split", [(False, 254), (True, 254), (False, 256)])
def test_one_mib_read_and_write_in_one_or_two_chains_land_at_their_scattered_guest_pages(
        tmp_path: Path, big_image: Path, inline_nowait: bool, split: int) -> None:
    """1 MiB of 256 scattered pages as Linux sends it: one chain (seg_max 510, the built-in
    back-end's) or 254 + 2 (seg_max 254)."""
    import random

    ram = BigRam()
    pages = [PAGES + 4096 * i for i in random.Random(3).sample(range(512), 256)]
    untouched = sorted(set(range(PAGES, PAGES + (2 << 20), 4096)) - set(pages))[:8]
    for p in untouched:
        ram.map[p : p + 4096] = b"\xee" * 4096
    written = os.urandom(1 << 20)
    parts = [part for part in (pages[:split], pages[split:]) if part]

    async def request(kick: int, rtype: int, sector: int) -> None:
        statuses = [ram.table(d, 0x4000 + 0x2000 * d, rtype, sector + 8 * sum(map(len, parts[:d])),
                              part) for d, part in enumerate(parts)]
        first = ram.used_idx()
        for d in range(len(parts)):
            ram.publish(d)
        os.eventfd_write(kick, 1)
        await until(lambda: ram.used_idx() == first + len(parts))
        assert [ram.map[s] for s in statuses] == [b.VIRTIO_BLK_S_OK] * len(parts)
        data = 4096 if rtype == b.VIRTIO_BLK_T_IN else 0
        assert sorted(ram.used(first + d) for d in range(len(parts))) == [
            (d, data * len(part) + 1) for d, part in enumerate(parts)]

    async def body(server, connect) -> None:
        fe = await connect()
        await negotiate(fe)
        kick, call = await start_queue0(fe, ram)
        for i, p in enumerate(pages):
            ram.map[p : p + 4096] = written[4096 * i : 4096 * (i + 1)]
        await request(kick, b.VIRTIO_BLK_T_OUT, 2048)
        for p in pages:
            ram.map[p : p + 4096] = bytes(4096)
        await request(kick, b.VIRTIO_BLK_T_IN, 4096)
        assert os.eventfd_read(call) >= 1
        for fd in (kick, call):
            os.close(fd)

    try:
        device = serve_blk(tmp_path, big_image, body, inline_nowait=inline_nowait)
        data = big_image.read_bytes()
        assert data[2048 * 512 : 4096 * 512] == written
        assert ram.pages(pages) == data[4096 * 512 : 6144 * 512]
        assert all(ram.map[p : p + 4096] == b"\xee" * 4096 for p in untouched)
    finally:
        ram.close()
    if not inline_nowait:
        assert device.stats["inline"] == 0


def test_one_mib_request_with_a_page_outside_guest_memory_is_refused_and_the_next_served(
        tmp_path: Path, big_image: Path) -> None:
    ram = BigRam()
    pages = [PAGES + 4096 * i for i in range(256)]
    before = big_image.read_bytes()

    async def body(server, connect) -> None:
        fe = await connect()
        await negotiate(fe)
        kick, call = await start_queue0(fe, ram)
        s0 = ram.table(0, 0x4000, b.VIRTIO_BLK_T_OUT, 0, pages[:254], outside=100)
        s1 = ram.table(1, 0x6000, b.VIRTIO_BLK_T_IN, 0, pages[:254], outside=253)
        s2 = ram.table(2, 0x8000, b.VIRTIO_BLK_T_IN, 0, pages[254:])
        for d in range(3):
            ram.publish(d)
        os.eventfd_write(kick, 1)
        await until(lambda: ram.used_idx() == 3)
        # The two with a page 2 KiB before the end of memory (4 KiB long) are handed back
        # unused, their status bytes untouched; the last one is served.
        assert ram.used(0) == (0, 0) and ram.used(1) == (1, 0)
        assert ram.map[s0] == ram.map[s1] == 0xFF
        assert ram.used(2) == (2, 2 * 4096 + 1) and ram.map[s2] == b.VIRTIO_BLK_S_OK
        for fd in (kick, call):
            os.close(fd)

    try:
        serve_blk(tmp_path, big_image, body, inline_nowait=False)
        assert ram.pages(pages[254:]) == before[: 2 * 4096]
    finally:
        ram.close()
    assert big_image.read_bytes() == before


def test_bulk_request_uses_the_table_as_checked_not_as_the_guest_rewrites_it(
        tmp_path: Path, image: Path, guest_memory) -> None:
    """The iovecs come from the one copy of the table that was checked: pointing an entry
    elsewhere (outside guest memory, say) after the chain was popped changes nothing."""
    mem, _ = guest_memory
    fd = os.open(image, os.O_RDWR)
    device = BlkBackend(fd, image.stat().st_size, workers=1, inline_nowait=False)
    try:
        chain = bulk_request(guest_memory, b.VIRTIO_BLK_T_IN, 0, [(0x8000, 512), (0x9000, 512)])
        struct.pack_into("<Q", mem, 0x3000 + 16 * 2, 1 << 40)  # the second data entry
        req = parse_request(chain, device.capacity, False)
        assert isinstance(req, BlkRequest)
        assert device._execute(req) == 1025 and mem[0x4100] == b.VIRTIO_BLK_S_OK
        assert mem[0x9000:0x9200] == bytes(range(256)) * 2
    finally:
        device.close()
        os.close(fd)


@pytest.mark.parametrize("to_host", [0x7F00_0000_0000, -0x10_0000, 0])
def test_iovecs_from_a_table_are_host_addresses_and_lengths_only(to_host: int) -> None:
    from pymvm.vhost.backends.blk import iovecs

    entries = [(0x10_0000 + 0x3000 * i, 4096 - i, NEXT | WRITE, i + 1) for i in range(5)]
    table = b"".join(struct.pack("<QIHH", *e) for e in entries)
    got = struct.unpack("<6Q", iovecs(table, 1, 4, to_host))
    assert got == tuple(x for a, n, _, _ in entries[1:4] for x in (a + to_host, n))


def test_stopping_a_ring_waits_for_its_batches_in_the_workers_to_be_returned(
        tmp_path: Path, image: Path) -> None:
    """queue_stopped (GET_VRING_BASE, a memory change) returns only once every batch a
    worker holds for that ring is back in the used ring; another ring's does not hold it."""
    import types

    fd = os.open(image, os.O_RDWR)
    device = BlkBackend(fd, image.stat().st_size, workers=2, inline_nowait=False)
    release = threading.Event()
    events: list[str] = []

    def ring(index: int):
        vring = types.SimpleNamespace(index=index, lock=threading.Lock(), queue=object())
        vring.put_used = lambda head, used: events.append(f"used {index}:{head}:{used}")
        vring.signal_used = lambda: events.append(f"signal {index}")
        return vring

    def execute(req):
        if req.head == 7:
            assert release.wait(5)
        return 1

    device._execute = execute
    held, other = ring(0), ring(1)
    try:
        device._dispatch(held, [BlkRequest(7, b.VIRTIO_BLK_T_OUT, 0, [], 512, memoryview(bytearray(1)),
                                           vring=held, queue=held.queue)])
        device.queue_stopped(other)  # nothing of ring 1's is out: returns at once
        stopper = threading.Thread(target=lambda: (device.queue_stopped(held), events.append("stopped")))
        stopper.start()
        stopper.join(0.3)
        assert stopper.is_alive() and events == []
        release.set()
        stopper.join(5)
        assert events == ["used 0:7:1", "signal 0", "stopped"]
    finally:
        release.set()
        device.close()
        os.close(fd)
